"""External causal LMs in the evaluator: a Hugging Face model folder or a GGUF file.

`loopedlm eval` scores a looped model at several loop counts; standard baselines belong in
the same table. `load_external(path)` loads a `transformers` causal LM (a folder holding a
`config.json` with `model_type`, or a `.gguf` file, dequantised by `transformers` through
the `gguf` package) and wraps it in the two interfaces the evaluator calls:

- `HFCausalLM`: `model(idx) -> logits (B, T, vocab)` and a `config` with `vocab_size` and
  `sequence_len`. It has no loops: `n_loops` may only be 1 (or absent).
- `HFTokenizer`: loopedlm's `Tokenizer` contract (`encode_batch`, `decode`, `bos_id`,
  `vocab_size`, `special_ids`, `token_bytes`) over a `transformers` tokenizer.

`transformers`, `gguf` and `accelerate` (which `transformers` needs to load GGUF) are the
optional extra `loopedlm[external]`; nothing else in loopedlm imports them.

The evaluator puts one token before every prompt (position 0 is never scored). Models whose
tokenizer adds a BOS of its own get that one; models without one (GPT-2, SmolLM, Qwen) get
their document separator `<|endoftext|>`, the token that preceded every document in
pre-training; failing that, EOS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from loopedlm.data.tokenizer import Tokenizer, byte_decoder

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'loopedlm[external]'  (transformers, gguf, accelerate)"
MODEL_KINDS = ("loopedlm", "hf", "gguf")
ALLOWED_MODELS = ("a loopedlm run or checkpoint folder, a Hugging Face model folder "
                  "(config.json with model_type) or a .gguf file")
DOCUMENT_SEPARATOR = "<|endoftext|>"


def _is_hf_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    # a loopedlm checkpoint's config.json has a "model" section and no "model_type"
    return isinstance(data, dict) and "model_type" in data


def model_kind(path: str | Path) -> str:
    """Which loader `path` needs: "loopedlm", "hf" or "gguf". A path that is none of them
    raises FileNotFoundError / ValueError naming what is allowed."""
    from loopedlm.model.checkpoint import MODEL_FILE
    from loopedlm.model.hf_folder import is_exported_folder
    from loopedlm.model.public import public_model_type

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give {ALLOWED_MODELS}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise ValueError(f"{path} is a file but not a .gguf model: give {ALLOWED_MODELS}")
    if public_model_type(path) is not None:  # a public looped model (Ouro): loopedlm runs it
        return "loopedlm"
    if _is_hf_folder(path) and not is_exported_folder(path):  # `loopedlm export` folders are ours
        return "hf"
    if not (path / MODEL_FILE).exists() and not any(path.glob(f"checkpoints/*/{MODEL_FILE}")):
        raise ValueError(f"{path} is not a loopedlm run or checkpoint (no {MODEL_FILE}), nor a "
                         f"Hugging Face model folder (no config.json with model_type), nor a "
                         f".gguf file")
    return "loopedlm"


@dataclass(frozen=True)
class ExternalConfig:
    """What the evaluator reads from `model.config`."""

    vocab_size: int
    sequence_len: int
    name: str = ""


class HFCausalLM(nn.Module):
    """A `transformers` causal LM behind loopedlm's forward: `model(idx) -> logits`."""

    def __init__(self, hf_model: nn.Module, sequence_len: int, name: str = "") -> None:
        super().__init__()
        self.hf_model = hf_model
        vocab = getattr(hf_model.config, "vocab_size", None)
        if vocab is None:  # some configs keep it on the text sub-config
            vocab = hf_model.get_output_embeddings().weight.shape[0]
        self.config = ExternalConfig(int(vocab), int(sequence_len), name)

    def forward(self, idx: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T). Rows may be right-padded: in a causal
        model padding never reaches earlier positions, so no attention mask is needed."""
        if n_loops not in (None, 1):
            raise ValueError(f"n_loops={n_loops!r} does not apply to the external model "
                             f"{self.config.name}: it runs once (use --loops 1)")
        return self.hf_model(input_ids=idx, use_cache=False).logits


class HFTokenizer(Tokenizer):
    """loopedlm's `Tokenizer` contract over a `transformers` tokenizer."""

    def __init__(self, hf_tokenizer: Any, name: str = "hf", bos_id: int | None = None) -> None:
        self._tok = hf_tokenizer
        self.name = name
        self.vocab_size = len(hf_tokenizer)
        self.special_ids = {int(i) for i in hf_tokenizer.all_special_ids}
        self.bos_id = self._default_bos() if bos_id is None else int(bos_id)
        self._token_bytes: torch.Tensor | None = None

    def _default_bos(self) -> int:
        tok = self._tok
        own = tok("a", add_special_tokens=True)["input_ids"]
        if tok.bos_token_id is not None and own and own[0] == tok.bos_token_id:
            return int(tok.bos_token_id)  # the tokenizer adds it: the model was trained so
        vocab = tok.get_vocab()
        if DOCUMENT_SEPARATOR in vocab:
            return int(vocab[DOCUMENT_SEPARATOR])
        for candidate in (tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return int(candidate)
        raise ValueError(f"tokenizer {self.name} has no BOS, {DOCUMENT_SEPARATOR} or EOS token "
                         f"to start a prompt with")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise ValueError("encode_batch expects a list of strings, got a single string")
        # special-token strings inside text stay text (loopedlm's Tokenizer contract)
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False,
                                               split_special_tokens=True)["input_ids"]]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes of each token: byte-level BPE tokens map back through GPT-2's byte
        alphabet; SentencePiece tokens are `▁` for a space and `<0xNN>` for one byte."""
        if self._token_bytes is None:
            decoder = byte_decoder()
            backend = getattr(self._tok, "backend_tokenizer", None)
            byte_level = "ByteLevel" in repr(getattr(backend, "decoder", None))
            lengths = torch.zeros(self.vocab_size, dtype=torch.long)
            for i, token in enumerate(self._tok.convert_ids_to_tokens(range(self.vocab_size))):
                if i in self.special_ids or token is None:
                    continue
                if byte_level and all(c in decoder for c in token):
                    lengths[i] = len(token)  # one character per byte
                elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                    lengths[i] = 1
                else:
                    lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
            self._token_bytes = lengths
        return self._token_bytes.clone()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self._tok.save_pretrained(str(directory))
        return directory


def _import_transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError:
        raise ValueError(f"evaluating an external model needs the optional packages: "
                         f"{EXTRA_HINT}") from None
    return transformers


def load_external(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, bos_id: int | None = None,
                  ) -> tuple[HFCausalLM, HFTokenizer]:
    """(model, tokenizer) of a Hugging Face model folder or a `.gguf` file, in eval mode.

    A GGUF file is dequantised to `dtype` by `transformers` (through `gguf`); its tokenizer
    comes from the same file.
    """
    path = Path(path)
    kind = model_kind(path)
    if kind == "loopedlm":
        raise ValueError(f"{path} is a loopedlm run: load it with loopedlm.model.checkpoint.load_model")
    transformers = _import_transformers()
    if kind == "gguf":
        folder, extra = path.parent, {"gguf_file": path.name}
        try:  # transformers reads GGUF through gguf and loads it through accelerate
            import accelerate  # noqa: F401
            import gguf  # noqa: F401
        except ModuleNotFoundError:
            raise ValueError(f"loading a .gguf file needs the optional packages: "
                             f"{EXTRA_HINT}") from None
    else:
        folder, extra = path, {}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), **extra)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                                     **extra)
    except (OSError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} could not be loaded as a causal LM by transformers: "
                         f"{first}") from None
    hf_model.to(device).eval()
    sequence_len = getattr(hf_model.config, "max_position_embeddings", None) or 2048
    model = HFCausalLM(hf_model, sequence_len, name=str(path))
    tokenizer = HFTokenizer(tok, name=str(path), bos_id=bos_id)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"model's vocab_size is {model.config.vocab_size}")
    n_params = sum(p.numel() for p in hf_model.parameters())
    logger.info("external model %s: %s, %.1fM parameters, vocab %d, context %d, prompt token %d",
                path, type(hf_model).__name__, n_params / 1e6, model.config.vocab_size,
                sequence_len, tokenizer.bos_id)
    return model, tokenizer
