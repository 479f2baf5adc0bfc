"""Training data: Parquet shards of text, tokenized on the fly and packed into batches.

Layout (FineWeb-Edu's, as nanochat): a folder of `*.parquet` shards with a `text` column,
read in name order; the last shard is the validation split, the others are training data
(docs/design.md#training-recipe). A *row group* is the unit of work: each DDP rank reads
the row groups whose global index `g` (counted over the split's shards in order) has
`g % world_size == rank`, so ranks never see the same document.

`ParquetTokenLoader` tokenizes a row group at a time (one multi-threaded `encode_documents`
call), puts BOS before every document, concatenates everything into one token stream and cuts
it into `(B, T+1)` rows; `inputs = rows[:, :-1]`, `targets = rows[:, 1:]`. Documents run across
row boundaries and batches (nanochat-style packing, no padding). Its state is where the next
unread token lies (epoch, which of this rank's row groups, how many of its tokens are already
used), so a restored loader yields exactly the batches an uninterrupted one would.

The corpora themselves are built by `loopedlm.data.corpus`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from loopedlm.common.validation import is_int

logger = logging.getLogger(__name__)

TEXT_COLUMN = "text"
SPLITS = ("train", "val")
STATE_VERSION = 1


# --- shards and row groups ----------------------------------------------------------------


def list_shards(data_dir: str | Path) -> list[Path]:
    """The `*.parquet` files of `data_dir` in name order (the last one is validation)."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder {data_dir} does not exist (run `loopedlm data "
                                f"prepare` for the bundled corpus, or point to Parquet shards)")
    if not data_dir.is_dir():
        raise ValueError(f"data folder {data_dir} is a file, not a folder of Parquet shards")
    shards = sorted(p for p in data_dir.glob("*.parquet") if p.is_file())
    if not shards:
        raise ValueError(f"data folder {data_dir} holds no *.parquet shards")
    return shards


def split_shards(data_dir: str | Path, split: str) -> list[Path]:
    """Shards of one split: `train` = all but the last, `val` = the last (docs/design.md#training-recipe)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise ValueError(f"data folder {data_dir} holds {len(shards)} shard; at least 2 are "
                         f"needed (the last one is the validation split)")
    return shards[:-1] if split == "train" else shards[-1:]


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard and check it has a usable `text` column; errors name the file."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"{path} is not a readable Parquet file (damaged or truncated?): "
                         f"{reason}") from None
    schema = pf.schema_arrow
    if TEXT_COLUMN not in schema.names:
        raise ValueError(f"{path} has no '{TEXT_COLUMN}' column (columns: "
                         f"{', '.join(schema.names) or 'none'})")
    kind = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ValueError(f"{path}: column '{TEXT_COLUMN}' holds {kind}, not text (string)")
    return pf


def row_groups(shards: list[Path]) -> list[tuple[Path, int]]:
    """(shard, row-group index) for every row group of `shards`, in global order."""
    units = []
    for path in shards:
        pf = open_shard(path)
        units.extend((path, i) for i in range(pf.num_row_groups))
    return units


def read_row_group(path: Path, index: int, parquet_file: pq.ParquetFile | None = None,
                   ) -> list[str]:
    """The non-empty documents of one row group (null and empty texts are skipped)."""
    try:
        pf = parquet_file if parquet_file is not None else open_shard(path)
        table = pf.read_row_group(index, columns=[TEXT_COLUMN])
    except (pa.ArrowException, OSError) as exc:  # a damaged page is an OSError in pyarrow
        reason = " ".join(str(exc).split())
        raise ValueError(f"{path}: row group {index} could not be read (damaged or truncated "
                         f"shard?): {reason}") from None
    column = table.column(TEXT_COLUMN)
    try:
        values = column.to_pylist()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: row group {index} holds text that is not valid UTF-8 "
                         f"({exc.reason})") from None
    texts = []
    for row, value in enumerate(values):
        if isinstance(value, bytes):  # a binary `text` column: must still be UTF-8
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: row group {index}, row {row} is not valid UTF-8 "
                                 f"({exc.reason} at byte {exc.start})") from None
        if value:
            texts.append(value)
    if len(texts) < len(values):
        logger.debug("%s row group %d: skipped %d empty documents", path, index,
                     len(values) - len(texts))
    return texts


def iter_texts(data_dir: str | Path, split: str) -> Iterator[str]:
    """Every non-empty document of a split, in order (one pass, one process)."""
    for path, index in row_groups(split_shards(data_dir, split)):
        yield from read_row_group(path, index)


# --- the loader ---------------------------------------------------------------------------


class ParquetTokenLoader:
    """Packed `(B, T)` input/target batches from Parquet shards, resumable (module docstring).

    `loop=True` cycles the split forever, counting epochs. With `loop=False` (one pass, e.g.
    over `val`) the last batch is completed with padding whose targets are -1 (ignored by the
    loss), and the next call raises StopIteration.

    Each rank has its own state; under DDP save every rank's `state_dict()` (e.g. gathered
    into a list) and give each rank back its own (`load_state_dict` also accepts the list).
    """

    def __init__(self, data_dir: str | Path, tokenizer: Any, batch_size: int, seq_len: int, *,
                 split: str = "train", rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", state: dict | list | None = None,
                 loop: bool = True) -> None:
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                            ("world_size", world_size)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be in 0..{world_size - 1} (world_size "
                             f"{world_size})")
        self.data_dir = Path(data_dir)
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.split, self.rank, self.world_size = split, rank, world_size
        self.device = torch.device(device)
        self.loop = loop
        self._shards = split_shards(self.data_dir, split)
        units = row_groups(self._shards)
        # ranks read disjoint row groups, round-robin over the global index
        self._mine = units[rank::world_size]
        if not self._mine:
            raise ValueError(f"the {split} split of {self.data_dir} has {len(units)} row groups, "
                             f"fewer than world_size={world_size}: rank {rank} would get none "
                             f"(write shards with more, smaller row groups)")
        self._n_units = len(units)
        self._fingerprint = [p.name for p in self._shards]
        # the unread token stream: chunks (epoch, cursor, tokens) and the head chunk's offset
        self._chunks: list[tuple[int, int, np.ndarray]] = []
        self._head_offset = 0
        self._next_read = (0, 0)  # (epoch, cursor into self._mine) of the next row group
        self._finished = False
        self._files: dict[Path, pq.ParquetFile] = {}
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ stream
    @property
    def epoch(self) -> int:
        """How many full passes over this rank's row groups precede the next unread token."""
        return self._chunks[0][0] if self._chunks else self._next_read[0]

    def _buffered(self) -> int:
        return sum(len(t) for _, _, t in self._chunks) - self._head_offset

    def _read_next(self) -> bool:
        """Tokenize the next row group into the buffer; False at the end of a one-pass split."""
        epoch, cursor = self._next_read
        if cursor >= len(self._mine):
            if not self.loop:
                return False
            epoch, cursor = epoch + 1, 0
        path, index = self._mine[cursor]
        if path not in self._files:
            self._files = {path: open_shard(path)}  # one open shard at a time
        tokens = self.tokenizer.encode_documents(read_row_group(path, index, self._files[path]))
        self._chunks.append((epoch, cursor, tokens))
        self._next_read = (epoch, cursor + 1)
        return True

    def _take(self, n: int) -> np.ndarray:
        """Remove and return the next `n` buffered tokens (fewer at the end of the data)."""
        parts, need = [], n
        while need > 0 and self._chunks:
            tokens = self._chunks[0][2]
            part = tokens[self._head_offset:self._head_offset + need]
            parts.append(part)
            need -= len(part)
            self._head_offset += len(part)
            if self._head_offset >= len(tokens):
                self._chunks.pop(0)
                self._head_offset = 0
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `(inputs, targets)`, LongTensors of shape (B, T) on `device`."""
        B, T = self.batch_size, self.seq_len
        need = B * (T + 1)
        empty_reads = 0
        while self._buffered() < need:
            before = self._buffered()
            if not self._read_next():
                break
            empty_reads = empty_reads + 1 if self._buffered() == before else 0
            if empty_reads > len(self._mine):  # a whole epoch without a token
                raise ValueError(f"the {self.split} split of {self.data_dir} holds no "
                                 f"non-empty documents for rank {self.rank}")
        if self._finished or self._buffered() == 0:
            self._finished = True
            raise StopIteration
        tokens = self._take(need)
        rows = np.full(need, -1, dtype=np.int64)
        rows[:len(tokens)] = tokens
        rows = torch.from_numpy(rows).view(B, T + 1)
        inputs, targets = rows[:, :-1].clone(), rows[:, 1:].clone()
        if len(tokens) < need:  # end of a one-pass split: pad; padded targets are ignored
            inputs[inputs < 0] = self.tokenizer.bos_id
            self._finished = True
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def __iter__(self) -> ParquetTokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the next unread token (module docstring)."""
        if self._chunks:
            epoch, cursor, _ = self._chunks[0]
            offset = self._head_offset
        else:
            (epoch, cursor), offset = self._next_read, 0
        return {"version": STATE_VERSION, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "n_row_groups": self._n_units,
                "shards": self._fingerprint, "vocab_size": int(self.tokenizer.vocab_size),
                "epoch": epoch, "cursor": cursor,
                "offset": offset, "finished": self._finished}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from a `state_dict()` of this rank (or a list of every rank's states)."""
        if isinstance(state, list):
            if len(state) != self.world_size:
                raise ValueError(f"loader state holds {len(state)} ranks' states but "
                                 f"world_size is {self.world_size}")
            state = state[self.rank]
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a loader state of version {STATE_VERSION}: {state!r:.200}")
        expected = {"split": self.split, "rank": self.rank, "world_size": self.world_size,
                    "n_row_groups": self._n_units, "shards": self._fingerprint,
                    "vocab_size": int(self.tokenizer.vocab_size)}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r} but "
                                 f"this loader has {key}={value!r}: the batches can not be "
                                 f"resumed exactly")
        epoch, cursor, offset = int(state["epoch"]), int(state["cursor"]), int(state["offset"])
        if not 0 <= cursor <= len(self._mine) or epoch < 0 or offset < 0:
            raise ValueError(f"loader state position (epoch {epoch}, cursor {cursor}, offset "
                             f"{offset}) is out of range for {len(self._mine)} row groups")
        self._chunks, self._head_offset = [], 0
        self._next_read = (epoch, cursor)
        self._finished = bool(state.get("finished", False))
        if offset:
            if not self._read_next():
                raise ValueError("loader state points past the end of the data")
            if offset >= len(self._chunks[0][2]):
                raise ValueError(f"loader state offset {offset} is beyond the "
                                 f"{len(self._chunks[0][2])} tokens of its row group: was it "
                                 f"saved with another tokenizer?")
            self._head_offset = offset


__all__ = ["ParquetTokenLoader", "iter_texts", "list_shards", "split_shards", "open_shard",
           "row_groups", "read_row_group"]
