"""Models that leave loopedlm: `hf` writes a run as a Hugging Face folder (`loopedlm export`)
that `transformers` (trust_remote_code), its `generate()` and lm-evaluation-harness load at
any loop count; `hf_code/` holds the model code copied into that folder, `hf_tokenizer` its
tokenizer files, `model_card` its README.md and `run_record` what the card says about the run."""
