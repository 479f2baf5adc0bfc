"""What a training run reads: the default Parquet data source and the tokenizer (loaded,
or trained once on the corpus and cached), saved into the run folder."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from loopedlm.common.distributed import DistInfo, barrier
from loopedlm.common.paths import loopedlm_home
from loopedlm.data.corpus import prepare_default_corpus
from loopedlm.data.loader import ParquetTokenLoader, iter_texts, split_shards
from loopedlm.data.synthetic import DATA_DIR_PREFIX, prepare_synthetic
from loopedlm.data.tokenizer import load_tokenizer
from loopedlm.data.tokenizer_training import train_tokenizer
from loopedlm.model.config import QWEN3_VOCAB_SIZE

log = logging.getLogger(__name__)


class ParquetData:
    """The default data source: Parquet shards through loopedlm.data.loader ("": the
    bundled corpus; "synthetic:TASK": a synthetic reasoning task, loopedlm.data.synthetic)."""

    def __init__(self, data_dir: str):
        if data_dir.startswith(DATA_DIR_PREFIX):
            self.data_dir = prepare_synthetic(data_dir)
        elif data_dir:
            self.data_dir = Path(data_dir)
        else:
            self.data_dir = prepare_default_corpus()
        split_shards(self.data_dir, "val")  # a clear error now if unusable

    def texts(self):
        return iter_texts(self.data_dir, "train")

    def loader(self, tokenizer, batch_size: int, seq_len: int, *, split: str, rank: int,
               world_size: int, device, loop: bool = True):
        kwargs = {} if loop else {"loop": False}
        return ParquetTokenLoader(self.data_dir, tokenizer, batch_size, seq_len, split=split,
                                  rank=rank, world_size=world_size, device=device, **kwargs)


def _bpe_cache_folder(data_dir: Path, vocab_size: int) -> Path:
    """Where a BPE of `vocab_size` trained on `data_dir` is cached (keyed by the folder)."""
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    return loopedlm_home() / "tokenizers" / f"{Path(data_dir).name}-{key}-bpe{vocab_size}"


def _cached_bpe(data, vocab_size: int, info: DistInfo):
    """A BPE of `vocab_size` trained on `data` (rank 0 trains and caches it once)."""
    cache = _bpe_cache_folder(data.data_dir, vocab_size)
    if info.is_main and not (cache.is_dir() and any(cache.iterdir())):
        log.info("training a %d-token BPE tokenizer on %s (cached in %s)", vocab_size,
                 data.data_dir, cache)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        train_tokenizer(data.texts(), vocab_size).save(str(tmp))
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    barrier()
    return load_tokenizer(str(cache))


def resolve_tokenizer(spec: str, vocab_size: int, data: ParquetData, run_dir: Path,
                      info: DistInfo):
    """Load (or train and cache) the tokenizer and save it into RUN/tokenizer. "auto" is
    the data folder's own `tokenizer/` when it has one, else qwen3 for the Qwen3
    vocabulary size, else a BPE of `vocab_size` trained on the data."""
    saved = run_dir / "tokenizer"
    # every rank looks before rank 0 may write it (below), so none sees a half-written folder
    exists = saved.is_dir() and any(saved.iterdir())
    barrier()
    if exists:
        return load_tokenizer(str(saved))
    own = Path(getattr(data, "data_dir", "")) / "tokenizer"
    if spec == "auto" and own.is_dir():
        # a data set that brings its own tokenizer (loopedlm.data.synthetic's fixed words)
        spec = str(own)
    if spec == "auto":
        spec = "qwen3" if vocab_size == QWEN3_VOCAB_SIZE else f"bpe:{vocab_size}"
    if spec == "bpe":
        spec = f"bpe:{vocab_size}"
    if spec == "qwen3" or Path(spec).is_dir():
        tok = load_tokenizer(spec)
    else:
        tok = _cached_bpe(data, int(spec[4:]), info)
    if info.is_main:
        tok.save(str(saved))
    barrier()
    return tok


__all__ = ["ParquetData", "resolve_tokenizer"]
