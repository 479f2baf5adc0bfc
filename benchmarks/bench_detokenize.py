"""What a streamed token's text costs the server (the scheduler decodes each sequence's text
after every token): decoding every token so far, as before, against `IncrementalText`, which
decodes the tail since the text was last complete. A byte-level BPE of 4,096 tokens trained
here on Python's bundled documentation (`pydoc_data.topics`), and the offline Qwen3
vocabulary; outputs of 128, 512 and 2,048 tokens of held-out text.

    python benchmarks/bench_detokenize.py [--lengths 128 512 2048] [--repeats 3]

Prints, per tokenizer and length, the microseconds a token's text costs on average over a
whole stream (the median of the repeats), both ways, and their ratio."""

from __future__ import annotations

import argparse
import os
import pydoc_data.topics as topics
import statistics
import time

from loopedlm.data.tokenizer import IncrementalText, load_tokenizer
from loopedlm.data.tokenizer_training import train_tokenizer


def stream_seconds(decode_all: bool, tokenizer, ids: list[int]) -> float:
    """Seconds to produce the text after each of `ids` (a stream of len(ids) tokens)."""
    stream = IncrementalText(tokenizer)
    start = time.perf_counter()
    for n in range(1, len(ids) + 1):
        if decode_all:
            tokenizer.decode(ids[:n])
        else:
            stream.text(ids[:n])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    cut = int(0.9 * len(text))
    tokenizers = {"bpe-4096 (trained here)": train_tokenizer([text[:cut]], 4096),
                  "qwen3": load_tokenizer("qwen3")}
    print(f"{'tokenizer':<26} {'tokens':>6} {'decode all':>12} {'incremental':>12} {'ratio':>7}")
    for name, tokenizer in tokenizers.items():
        held_out = tokenizer.encode(text[cut:])
        for length in args.lengths:
            ids = held_out[:length]
            times = {kind: statistics.median(stream_seconds(kind, tokenizer, ids)
                                             for _ in range(args.repeats))
                     for kind in (True, False)}
            full, tail = (times[kind] / len(ids) * 1e6 for kind in (True, False))
            print(f"{name:<26} {len(ids):>6} {full:>9.1f} us {tail:>9.1f} us {full / tail:>6.1f}x",
                  flush=True)


if __name__ == "__main__":
    main()
