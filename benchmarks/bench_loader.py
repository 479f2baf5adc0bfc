"""Is data loading ever the bottleneck? Loader tokens/s against the tiny model's training tokens/s.

Feeds (8, 256) batches from the bundled corpus (prepared if missing) through a trained
byte-level BPE of 4,096 ids (the tiny preset's) and through qwen3, and times forward+backward
of the tiny preset on the same batch shape. Also prints the compression (bytes per token) of
both tokenizers on the validation shard.

    python benchmarks/bench_loader.py [--data DIR] [--batches 300] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.data.corpus import prepare_default_corpus
from loopedlm.data.loader import ParquetTokenLoader, iter_texts
from loopedlm.data.tokenizer import load_tokenizer
from loopedlm.data.tokenizer_training import bytes_per_token, train_tokenizer


def loader_tokens_per_second(data, tokenizer, batch: int, seq: int, n_batches: int) -> float:
    """Tokens/s of a fresh loader (row-group reads and tokenization included)."""
    loader = ParquetTokenLoader(data, tokenizer, batch, seq)
    start = time.perf_counter()
    for _ in range(n_batches):
        loader.next_batch()
    return n_batches * batch * seq / (time.perf_counter() - start)


def training_tokens_per_second(batch: int, seq: int, steps: int) -> float:
    """Tokens/s of forward+backward of the tiny preset (CPU, fp32), after one warm-up step."""
    model = LoopedGPT.from_config(ModelConfig.preset("tiny"), seed=0)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq))
    model(idx, idx).backward()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(idx, idx).backward()
    return steps * batch * seq / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="corpus folder (default: bundled)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or prepare_default_corpus()
    batch, seq = 8, 256
    print(f"corpus {data}; batch {batch} x seq {seq}; torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    bpe = train_tokenizer(iter_texts(data, "train"), 4096)
    print(f"trained BPE-{bpe.vocab_size} in {time.perf_counter() - start:.1f}s")
    qwen3 = load_tokenizer("qwen3")
    for tok in (bpe, qwen3):
        label = f"{tok.name}-{tok.vocab_size}" if tok.name == "qwen3" else f"bpe-{tok.vocab_size}"
        ratio = bytes_per_token(tok, iter_texts(data, "val"))
        rate = loader_tokens_per_second(data, tok, batch, seq, args.batches)
        print(f"{label:>14}: {ratio:.3f} bytes/token on val; loader {rate:,.0f} tokens/s")
        if tok is bpe:
            bpe_rate = rate

    train_rate = training_tokens_per_second(batch, seq, args.steps)
    print(f"tiny preset forward+backward: {train_rate:,.0f} tokens/s")
    print(f"loader / training = {bpe_rate / train_rate:.0f}x "
          f"({'loading is not' if bpe_rate > train_rate else 'LOADING IS'} the bottleneck)")


if __name__ == "__main__":
    main()
