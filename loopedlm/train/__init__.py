"""Training: `config` (TrainConfig, recipes, the `--key=value` overrides), `prepare` (the
checks before any compute, data and tokenizer via `inputs`), `trainer` (`train()` and the
step loop), `sizing` (horizon, FLOPs, gradient accumulation), `checkpointing` (exact
resume), `reporting` (log.jsonl, progress), `termination` (SIGTERM), the Muon+AdamW
`optim`iser, variable-loop `loop_sampling`, `parallel` (torchrun/DDP, activation
checkpointing) and the stability `diagnostics` (norms, MFU, the collapse detector).
`python -m loopedlm.train` (what torchrun runs) is `loopedlm train`."""
