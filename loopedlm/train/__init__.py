"""Training: the train config and its `--key=value` overrides, the trainer, the
Muon+AdamW optimiser, variable-loop sampling, parallelism (torchrun/DDP, activation
checkpointing) and the stability diagnostics (norms, MFU, the collapse detector).
`python -m loopedlm.train` (what torchrun runs) is `loopedlm train`."""
