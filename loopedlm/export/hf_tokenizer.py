"""The tokenizer of an exported model, as files that `transformers`' AutoTokenizer loads:
`tokenizer.json` (HF `tokenizers`) and `tokenizer_config.json`.

`tokenizer(text)` gives exactly the ids loopedlm feeds the model: BOS, then the text's
tokens (a post-processor adds the BOS, so lm-eval's `hf` model sees what loopedlm's adapter
does). BOS, end-of-text and padding are three distinct tokens:

- trained BPE: BOS is `<|bos|>`; it has no other special token, so `<|eos|>` and `<|pad|>`
  are added after the vocabulary. The model never saw them: as input it reads them as BOS
  (modeling_loopedlm.py `embed`), which is what ends a document in training.
- qwen3: BOS is the run's (`<|im_start|>`, as the FLT authors); end-of-text is
  `<|endoftext|>` (`<|im_end|>` when the run's BOS is `<|endoftext|>`) and padding
  `<|fim_pad|>`, all tokens of the Qwen3 vocabulary. Its `tokenizer.json` is built from the
  vocabulary bundled in `quicktok-v1` (no download): the byte-level BPE merges are recovered
  from the token ranks, as Qwen's own `tokenizer.json` has them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopedlm.data.tokenizer import (
    BOS_TOKEN,
    HF_FILE,
    BPETokenizer,
    Qwen3Tokenizer,
    Tokenizer,
    byte_decoder,
)

# Qwen2/Qwen3's pre-tokenisation (their tokenizer.json): single digits
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
EOS_TOKEN, PAD_TOKEN = "<|eos|>", "<|pad|>"  # added to a trained BPE
QWEN3_EOS, QWEN3_EOS_IF_BOS, QWEN3_PAD = "<|endoftext|>", "<|im_end|>", "<|fim_pad|>"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class SpecialTokens:
    """BOS, end-of-text and padding: strings and ids (distinct). `added` are the tokens that
    the exported tokenizer adds after the vocabulary (id, string)."""

    bos: str
    bos_id: int
    eos: str
    eos_id: int
    pad: str
    pad_id: int
    added: tuple[tuple[int, str], ...] = ()


def special_tokens(tokenizer: Tokenizer, vocab_size: int) -> SpecialTokens:
    """The special tokens of `tokenizer`'s export (see the module docstring)."""
    if isinstance(tokenizer, Qwen3Tokenizer):
        eos = QWEN3_EOS if tokenizer.bos_token != QWEN3_EOS else QWEN3_EOS_IF_BOS
        ids = qwen3_special_ids()
        return SpecialTokens(tokenizer.bos_token, tokenizer.bos_id, eos, ids[eos], QWEN3_PAD,
                             ids[QWEN3_PAD])
    if isinstance(tokenizer, BPETokenizer):
        eos_id, pad_id = tokenizer.vocab_size, tokenizer.vocab_size + 1
        return SpecialTokens(BOS_TOKEN, tokenizer.bos_id, EOS_TOKEN, eos_id, PAD_TOKEN, pad_id,
                             added=((eos_id, EOS_TOKEN), (pad_id, PAD_TOKEN)))
    raise ValueError(f"tokenizer {tokenizer.name!r} cannot be exported: only loopedlm's trained "
                     f"BPE and qwen3 can")


def qwen3_special_ids() -> dict[str, int]:
    import quicktok

    enc = quicktok.get_encoding("qwen3")
    return {tok: int(enc.encode_single_token(tok)) for tok in enc.special_tokens_set}


def write_hf_tokenizer(tokenizer: Tokenizer, special: SpecialTokens, folder: Path,
                       model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json into `folder`; `model_max_length` is the
    longest input the model takes (its RoPE table)."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing

    hf = qwen3_hf_tokenizer() if isinstance(tokenizer, Qwen3Tokenizer) else bpe_hf_tokenizer(tokenizer)
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False)
                           for _, token in special.added])
    for token_id, token in special.added:
        if hf.token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {hf.token_to_id(token)}, expected {token_id}")
    hf.post_processor = TemplateProcessing(single=f"{special.bos} $A",
                                           pair=f"{special.bos} $A {special.bos} $B",
                                           special_tokens=[(special.bos, special.bos_id)])
    # one JSON layout whatever the tokenizers version: sorted keys, as every other file
    data = json.loads(hf.to_str())
    (folder / HF_FILE).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
                                  + "\n", encoding="utf-8")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.bos, "eos_token": special.eos, "pad_token": special.pad,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids
        "padding_side": "left",  # batched generation pads on the left
    }
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")


def bpe_hf_tokenizer(tokenizer: BPETokenizer) -> Any:
    """The trained BPE as an HF `tokenizers` object (through its saved file)."""
    import tempfile

    from tokenizers import Tokenizer as HFTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return HFTokenizer.from_file(str(Path(tmp) / HF_FILE))


def bpe_merges(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merges of a byte-level BPE given as tiktoken-style ranks (token i = ranks[i]):
    token i is the merge of the two parts left when BPE runs on its bytes with the merges
    of rank < i only."""
    rank = {token: i for i, token in enumerate(ranks)}
    merges = []
    for i, token in enumerate(ranks):
        if len(token) < 2:
            continue
        parts = [token[j:j + 1] for j in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [rank.get(parts[j] + parts[j + 1], i) for j in range(len(parts) - 1)]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= i:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {i} ({token!r}) is not a merge of two earlier tokens")
        merges.append((parts[0], parts[1]))
    return merges


def qwen3_hf_tokenizer() -> Any:
    """Qwen3's tokenizer (151,643 BPE tokens + 26 special tokens) as an HF `tokenizers`
    object built from quicktok's bundled ranks: NFC, Qwen's split pattern, byte-level BPE."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(qwen3_tokenizer_json())


@functools.lru_cache(maxsize=1)
def qwen3_tokenizer_json() -> str:
    """`qwen3_hf_tokenizer` as JSON, built once per process (recovering the merges takes
    seconds)."""
    import quicktok
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    enc = quicktok.get_encoding("qwen3")
    specials = qwen3_special_ids()
    n_bpe = min(specials.values())
    ranks = [bytes(enc.decode_single_token_bytes(i)) for i in range(n_bpe)]
    to_text = {b: c for c, b in byte_decoder().items()}  # byte -> its printable character

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    vocab = {text(token): i for i, token in enumerate(ranks)}
    merges = [(text(a), text(b)) for a, b in bpe_merges(ranks)]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                ignore_merges=False))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                           for tok, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    for tok, token_id in specials.items():
        if hf.token_to_id(tok) != token_id:
            raise RuntimeError(f"qwen3 special token {tok} got id {hf.token_to_id(tok)}, "
                               f"expected {token_id}")
    return hf.to_str()


__all__ = ["SpecialTokens", "special_tokens", "write_hf_tokenizer", "bpe_merges",
           "qwen3_hf_tokenizer"]
