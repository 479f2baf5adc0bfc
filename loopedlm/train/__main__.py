"""`python -m loopedlm.train ...` (and `torchrun ... -m loopedlm.train ...`) is
`loopedlm train ...`."""

import sys

from loopedlm.cli.train import main

sys.exit(main())
