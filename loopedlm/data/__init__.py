"""Data: the Parquet token loader, the bundled and downloadable corpora, and the
tokenizers (Qwen3's vocabulary offline, or a BPE trained on your data)."""
