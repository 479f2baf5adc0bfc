"""Helpers shared by the training tests (a helper module, not a test file): a tiny Parquet
corpus with a trained BPE, the small training config that goes with it, an in-memory data
source whose global batch does not depend on the number of ranks (for the DDP equivalence
test), and the command line of the small training run (its fixtures, `corpus` and
`reference`, are in conftest.py)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from loopedlm.train.config import TrainConfig

MODEL = {"depth": 2, "d_model": 32, "n_head": 2, "sequence_len": 32, "n_loops": 2}


def make_corpus(folder: Path) -> tuple[Path, Path]:
    """A few hundred tiny pseudo-English documents as Parquet shards (last = val) and a
    300-token BPE trained on them. Returns (data_dir, tokenizer_dir)."""
    from loopedlm.data.corpus import write_shards
    from loopedlm.data.tokenizer_training import train_tokenizer

    data_dir, tok_dir = folder / "data", folder / "tok"
    if (tok_dir / "tokenizer.json").exists():
        return data_dir, tok_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ("the a king queen said to of and my lord good night day love sweet fair death "
             "life").split()
    docs = []
    for i in range(120):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize()
                     + "." for _ in range(rng.randint(3, 8))]
        docs.append((f"w{i % 5}", " ".join(sentences)))
    write_shards(docs, data_dir, 2, 0.1, 4)
    train_tokenizer((t for _, t in docs), 300).save(tok_dir)
    return data_dir, tok_dir


def small_config(run_dir: Path, data_dir: Path, tok_dir: Path, **overrides) -> TrainConfig:
    values = dict(run_dir=str(run_dir), data_dir=str(data_dir), tokenizer=str(tok_dir),
                  model=dict(MODEL), total_batch_tokens=256, device_batch_size=4, steps=6,
                  eval_every=3, eval_tokens=256, save_every=3, keep_last=2, device="cpu",
                  progress=False, sample_tokens=8)
    values.update(overrides)
    return TrainConfig(**values)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


class FakeTokenizer:
    """Enough of the Tokenizer contract for the in-memory data source."""

    vocab_size, bos_id, special_ids = 64, 0, {0}

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 63 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)

    def token_bytes(self) -> torch.Tensor:
        table = torch.ones(self.vocab_size, dtype=torch.long)
        table[0] = 0
        return table


class SyntheticLoader:
    """Row k of the global stream is an arithmetic sequence mod V (learnable); rank r of W
    with micro-batch B reads rows [pos + r*B, pos + (r+1)*B), so every world size sees the
    same global batch per step."""

    def __init__(self, batch_size, seq_len, rank, world_size, split, loop, vocab=64):
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self.offset = 0 if split == "train" else 10**6
        self.loop, self.vocab, self.pos = loop, vocab, 0

    def _row(self, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.offset + k)
        start, stride = torch.randint(1, self.vocab, (2,), generator=g).tolist()
        return 1 + (start + (stride % 5 + 1) * torch.arange(self.T + 1)) % (self.vocab - 1)

    def next_batch(self):
        if not self.loop and self.pos >= 4 * self.B * self.world:
            raise StopIteration
        first = self.pos + self.rank * self.B
        rows = torch.stack([self._row(first + i) for i in range(self.B)])
        self.pos += self.B * self.world
        return rows[:, :-1].clone(), rows[:, 1:].clone()

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class SyntheticData:
    data_dir = "synthetic"

    def loader(self, tokenizer, batch_size, seq_len, *, split, rank, world_size, device,
               loop=True):
        return SyntheticLoader(batch_size, seq_len, rank, world_size, split, loop)


def train_cli(run: Path, corpus, steps: int, resume: bool = False) -> list[str]:
    data_dir, tok_dir = corpus
    args = [sys.executable, "-m", "loopedlm.train", f"--run_dir={run}", f"--data_dir={data_dir}",
            f"--tokenizer={tok_dir}", "--model.depth=2", "--model.d_model=32", "--model.n_head=2",
            "--model.sequence_len=32", "--model.n_loops=2", "--total_batch_tokens=256",
            "--device_batch_size=4", f"--steps={steps}", "--eval_every=4", "--eval_tokens=256",
            "--save_every=2", "--keep_last=5", "--device=cpu", "--progress=false",
            "--sample_tokens=8", "--optim.muon_momentum_warmup_steps=300"]  # as small_config
    return args + (["--resume"] if resume else [])
