"""Synthetic reasoning tasks where depth is the bottleneck (issue 28): `loopedlm data
synthetic TASK` writes them as Parquet shards that `loopedlm train` reads unchanged.

Each document is one line of whitespace-separated words from a small fixed vocabulary
(`WordTokenizer`, saved in the data folder's `tokenizer/`, which training picks up), and
holds *queries*: positions whose next word is an answer that takes `hops` lookups to find.
Nothing else in a document is predictable beyond its format, so the loss on the answers
is what training learns from; the answers are many per document (supervision at many
positions, not one answer at the end).

Tasks (`TASKS`):

- `chain` (variable chains): assignments such as `v7 = 4  v12 = v7  v3 = v12`, shuffled,
  then queries `? v3 4` (the value of `v3`: 3 hops). Every digit is the value of one
  root variable, every query's root is drawn uniformly afresh, and queried variables are
  leaves of the assignment trees (`ChainTask`): the digits in view, and the answers
  already given, say nothing about the next answer, so a guess is right 1 time in 10.
- `phop` (p-hop induction, Sanford et al. 2024; Saunshi et al. 2025): a marker `h3` (p = 3)
  and a random sequence of letters; after a prefix, every second letter x is followed by
  its answer: hop(i) is the position after the most recent earlier occurrence of the
  letter at i, and the answer is the letter at hop^p(i). Half the positions are answers,
  every one p hops deep; a guess is right with probability 1 / alphabet.
- `perm` (pointer chasing): a marker `hK`, a random cyclic permutation of 16 letters as
  shuffled arrow words `a>f`, then 8 distinct letters each followed by the letter K
  arrows on (`PermTask`).
- `pointer`: the same, with each arrow written as two words `A b`, so that every hop is
  the same induction step (`PointerTask`).
- `compose` (in-weights function composition): 4 fixed random permutations `f1..f4` of 32
  symbols, the same in every document, and queries `x f3 f1 f1 = y`, the functions applied
  in turn (`ComposeTask`): they live in the weights, so a hop is a memorised lookup, not a
  search of the context.
- `reach` (1-D flood fill): a row of cells (source `S`, wall `#`, open `a b c d`) with
  asked cells `?`, each followed by `y` when the nearest marker to its left is a source
  (`ReachTask`); the difficulty is that marker's distance. Made for models whose every
  layer sees a short window, where only more loops carry a marker farther.

Documents are exactly `seq_len` words (padded with `.`), so with the BOS the loader
prepends, training rows of `sequence_len = seq_len` hold one whole document each: none is
cut at a row boundary (the loader packs rows of seq_len + 1 tokens).

A training `data_dir` of `synthetic:TASK` is TASK's data set with the default settings,
written on first use (`prepare_synthetic`), so a recipe needs no path.

Layout of the folder: `shard_00000.parquet ...` (training, in curriculum order: the
loader reads row groups in order) and the last shard, the validation split; `eval/hops_XX
.parquet`, the held-out test sets, one per difficulty (every query of a document there
has exactly that many hops; difficulties beyond the training range never occur in
training); `tokenizer/`; `manifest.json` (the settings and counts). Every document is a
pure function of (seed, split, index), and no validation or test document occurs in the
training split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from loopedlm.common.paths import loopedlm_home
from loopedlm.common.validation import check, check_choice, is_int
from loopedlm.data.synthetic_tasks import (
    HOP_MIXES,
    TASKS,
    ChainTask,
    ComposeTask,
    PermTask,
    PHopTask,
    PointerTask,
    Query,
    ReachTask,
)

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
EVAL_DIR = "eval"
TOKENIZER_DIR = "tokenizer"
DOCS_PER_ROW_GROUP = 64


# ---- the data set ------------------------------------------------------------------------
@dataclass
class SyntheticConfig:
    """What `loopedlm data synthetic TASK` writes (each field is one command-line flag).

    hops: the training range of the difficulty knob (lo, hi); hop_mix: how training hop
    counts are drawn from it, "uniform" or "inverse" (odds 1/h: the short lookups that
    teach the lookup itself stay common); eval_hops: the held-out difficulties (one test
    set each; those above `hops` never occur in training).
    curriculum: the fraction of the training documents over which the largest hop count
    grows from lo to hi, in equal steps (0: no curriculum); the loader reads the documents
    in order, so training follows it. task_options: the task's own fields (`ChainTask`,
    `PHopTask`, `PermTask`, `PointerTask`, `ComposeTask`, `ReachTask`). seq_len: words per
    document (None: the task's `default_seq_len()`: 128, 64 for compose and reach, or for perm and
    pointer exactly one unpadded document). For `reach`, "hops" is the distance in cells.
    """

    task: str = "chain"
    seq_len: int | None = None
    hops: tuple[int, int] = (1, 8)
    hop_mix: str = "uniform"
    eval_hops: tuple[int, ...] = tuple(range(1, 13))
    train_docs: int = 100_000
    val_docs: int = 512
    eval_docs: int = 64
    curriculum: float = 0.1
    seed: int = 0
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hops = tuple(self.hops)
        self.eval_hops = tuple(self.eval_hops)
        if self.seq_len is None and self.task in TASKS:
            self.seq_len = self.make_task().default_seq_len()
        self.validate()

    def validate(self) -> None:
        check_choice("task", self.task, tuple(TASKS))
        check_choice("hop_mix", self.hop_mix, HOP_MIXES)
        check(is_int(self.seq_len) and self.seq_len >= 1, "seq_len", self.seq_len,
              "an integer >= 1")
        lo_hi = self.hops
        check(len(lo_hi) == 2 and all(is_int(h) for h in lo_hi) and 1 <= lo_hi[0] <= lo_hi[1],
              "hops", "-".join(map(str, lo_hi)), "a range LO-HI of integers with 1 <= LO <= HI")
        check(len(self.eval_hops) >= 1 and all(is_int(h) and h >= 1 for h in self.eval_hops),
              "eval_hops", ",".join(map(str, self.eval_hops)), "hop counts >= 1")
        for name in ("train_docs", "val_docs", "eval_docs"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, value, "an integer >= 1")
        check(isinstance(self.curriculum, int | float) and 0 <= self.curriculum <= 1,
              "curriculum", self.curriculum, "a fraction in [0, 1]")
        check(is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        task = self.make_task()
        longest = max(self.hops[1], *self.eval_hops)
        if self.seq_len < task.min_length(longest):
            raise ValueError(f"seq_len={self.seq_len} is too short for {self.task} documents "
                             f"with {longest} hops: at least {task.min_length(longest)} words")

    def make_task(self) -> ChainTask | PHopTask | PermTask | PointerTask | ComposeTask \
            | ReachTask:
        cls = TASKS[self.task]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(self.task_options) - known)
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not an option of the {self.task} task "
                             f"(allowed: {', '.join(sorted(known))})")
        task = cls(**self.task_options)
        task.validate()
        return task

    def max_hops_at(self, index: int) -> int:
        """The largest hop count of training document `index` (the curriculum)."""
        lo, hi = self.hops
        ramp = self.curriculum * self.train_docs
        if ramp <= 0 or index >= ramp:
            return hi
        return lo + int(index / ramp * (hi - lo + 1))

    def hop_weights(self, max_hops: int) -> list[float]:
        """The odds of 1..max_hops hops in a training document (`hop_mix`)."""
        return [1.0 / h if self.hop_mix == "inverse" else 1.0 for h in range(1, max_hops + 1)]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["hops"], data["eval_hops"] = list(self.hops), list(self.eval_hops)
        return data


def _rng(seed: int, split: str, index: int) -> random.Random:
    # one stream per document, so any document can be rebuilt alone
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def documents(config: SyntheticConfig, split: str, count: int | None = None,
              hops: int | None = None) -> Iterator[str]:
    """The documents of `split` ("train", "val" or "eval"; `hops`: the test set's
    difficulty), as text."""
    task = config.make_task()
    count = {"train": config.train_docs, "val": config.val_docs,
             "eval": config.eval_docs}[split] if count is None else count
    for index in range(count):
        rng = _rng(config.seed, split if hops is None else f"{split}{hops}", index)
        if split in ("train", "val"):
            top = config.max_hops_at(index) if split == "train" else config.hops[1]
            words = task.document(rng, top, config.seq_len, weights=config.hop_weights(top))
        else:
            words = task.document(rng, config.hops[1], config.seq_len, query_hops=hops)
        yield " ".join(words)


def default_synthetic_dir(task: str) -> Path:
    """Where `loopedlm data synthetic TASK` writes by default."""
    return loopedlm_home() / "data" / "synthetic" / task


DATA_DIR_PREFIX = "synthetic:"  # a training `data_dir` of "synthetic:TASK"


def synthetic_spec_dir(data_dir: str) -> Path | None:
    """The folder a `data_dir` of "synthetic:TASK" names (`default_synthetic_dir(TASK)`),
    or None for any other value."""
    if not data_dir.startswith(DATA_DIR_PREFIX):
        return None
    task = data_dir[len(DATA_DIR_PREFIX):]
    check_choice("data_dir task", task, tuple(TASKS))
    return default_synthetic_dir(task)


def prepare_synthetic(data_dir: str) -> Path:
    """`data_dir` = "synthetic:TASK": TASK's data set with the default settings
    (`SyntheticConfig`), written on first use into `default_synthetic_dir(TASK)`."""
    folder = synthetic_spec_dir(data_dir)
    if folder is None:
        raise ValueError(f"data_dir={data_dir!r} is not {DATA_DIR_PREFIX}TASK")
    return write_synthetic(SyntheticConfig(task=data_dir[len(DATA_DIR_PREFIX):]), folder)


def _write(texts: list[str], path: Path) -> None:
    from loopedlm.data.loader import TEXT_COLUMN  # (torch: see write_synthetic)

    pq.write_table(pa.table({TEXT_COLUMN: texts}), path, row_group_size=DOCS_PER_ROW_GROUP)


def write_synthetic(config: SyntheticConfig, out_dir: str | Path | None = None, *,
                    n_train_shards: int = 4, overwrite: bool = False) -> Path:
    """Write the data set of `config` (module docstring) into `out_dir` (default
    `default_synthetic_dir(task)`), atomically; returns the folder. A folder that already
    holds this exact data set is returned as it is."""
    out = Path(out_dir) if out_dir is not None else default_synthetic_dir(config.task)
    manifest_path = out / MANIFEST_FILE
    if manifest_path.exists() and not overwrite:
        if json.loads(manifest_path.read_text()).get("config") == config.to_dict():
            return out
        raise ValueError(f"{out} already holds a synthetic data set made with other settings "
                         f"(see its {MANIFEST_FILE}): choose another --out or pass --overwrite")
    if out.exists() and not manifest_path.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a synthetic data set (no {MANIFEST_FILE}); "
                         f"remove it or choose another --out")
    # imported here, not at the top: the CLI reads SyntheticConfig's defaults for `loopedlm
    # data --help`, which must not import torch (the tokenizer and loader modules do)
    from loopedlm.data.tokenizer import WordTokenizer

    task = config.make_task()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        train = list(documents(config, "train"))
        seen = set(train)
        val = [t for t in documents(config, "val") if t not in seen]
        shards = [train[i * len(train) // n_train_shards:(i + 1) * len(train) // n_train_shards]
                  for i in range(n_train_shards)]
        for i, part in enumerate([p for p in shards if p] + [val]):
            _write(part, tmp / f"shard_{i:05d}.parquet")
        (tmp / EVAL_DIR).mkdir()
        tests = {}
        for hops in config.eval_hops:
            texts = [t for t in documents(config, "eval", hops=hops) if t not in seen]
            name = f"hops_{hops:02d}.parquet"
            _write(texts, tmp / EVAL_DIR / name)
            tests[name] = {"hops": hops, "documents": len(texts),
                           "queries": sum(len(task.queries(t.split())) for t in texts),
                           "held_out": hops > config.hops[1]}
        tokenizer = WordTokenizer(task.words(), name=f"{config.task}-words")
        tokenizer.save(tmp / TOKENIZER_DIR)
        manifest = {"format": 1, "task": config.task, "config": config.to_dict(),
                    "train_documents": len(train), "val_documents": len(val),
                    "shards": len([p for p in shards if p]) + 1, "sequence_len": config.seq_len,
                    "vocab_size": tokenizer.vocab_size, "eval": tests}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d training documents (%d shards), %d validation documents and %d test "
                "sets to %s", len(train), manifest["shards"] - 1, len(val), len(tests), out)
    return out


def read_synthetic_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a synthetic data set; ValueError when `data_dir` is not one."""
    path = Path(data_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("task") not in TASKS:
        raise ValueError(f"{data_dir} is not a synthetic data set (no {MANIFEST_FILE} naming a "
                         f"task; make one with `loopedlm data synthetic TASK`)")
    return manifest


def load_config(manifest: dict[str, Any]) -> SyntheticConfig:
    """The `SyntheticConfig` a manifest records."""
    return SyntheticConfig(**manifest["config"])


__all__ = ["Query", "ChainTask", "PHopTask", "PermTask", "PointerTask", "ComposeTask",
           "ReachTask", "TASKS",
           "SyntheticConfig", "documents",
           "default_synthetic_dir", "synthetic_spec_dir", "prepare_synthetic",
           "write_synthetic", "read_synthetic_manifest", "load_config",
           "MANIFEST_FILE", "EVAL_DIR", "TOKENIZER_DIR"]
