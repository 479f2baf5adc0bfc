"""`python -m loopedlm ...` is the `loopedlm` command."""

import sys

from loopedlm.cli import main

sys.exit(main())
