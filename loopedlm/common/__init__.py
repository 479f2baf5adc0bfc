"""Shared foundations every other subpackage may use, and which use none of them:
`paths` (the one `LOOPEDLM_HOME` rule and the recipe folders), `files` (hashes, atomic
JSON writes), `distributed` (device choice and torchrun set-up), `validation` (the
checks and messages every config uses) and `overrides` (the one `--key=value` syntax)."""
