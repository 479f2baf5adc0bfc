"""Tokenizers: round trips, the byte table, save/load, the offline Qwen3 vocabulary, errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopedlm.data.tokenizer import BOS_TOKEN, QWEN3_VOCAB_SIZE, Tokenizer, load_tokenizer
from loopedlm.data.tokenizer_training import (
    bytes_per_token,
    split_compression,
    train_tokenizer,
    train_tokenizer_on_corpus,
)

EDGE_CASES = [
    "",
    "Hello, world!",
    "emoji 👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "combining: e\u0301 a\u0300 n\u0303 (decomposed) vs é (composed)",
    "windows\r\nline\r\nends\r\n",
    " " * 1000,
    "\t\t\n\n\n   \n" * 50,
    "mixed ٱلْعَرَبِيَّة עברית русский ελληνικά",
    "null \x00 and control \x07\x1b chars",
    "zero\u200bwidth\u200djoin\ufeffbom",
    "special strings as text: <|bos|> <|endoftext|> <|im_start|>",
    "digits 1234567890 3.14159 1e-10",
    "a" * 5000,
]

CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "日本語のテキスト 👍 emoji e\u0301",
] * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def qwen3() -> Tokenizer:
    return load_tokenizer("qwen3")


def expected_text(tok: Tokenizer, text: str) -> str:
    # qwen3 NFC-normalises like Qwen's own tokenizer.json; the trained BPE keeps text as is
    return unicodedata.normalize("NFC", text) if tok.name == "qwen3" else text


@pytest.mark.parametrize("which", ["bpe", "qwen3"])
@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip_and_byte_table_on_edge_cases(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text)
    assert tok.decode(ids) == expected_text(tok, text)
    table = tok.token_bytes()
    assert int(table[ids].sum()) == len(expected_text(tok, text).encode("utf-8"))
    assert not set(ids) & tok.special_ids  # special strings in text stay text


@pytest.mark.parametrize("which", ["bpe", "qwen3"])
def test_round_trip_on_random_text(request, which):
    tok = request.getfixturevalue(which)
    table = tok.token_bytes()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.text(max_size=200))
    def check(text):
        ids = tok.encode(text)
        assert tok.decode(ids) == expected_text(tok, text)
        assert int(table[ids].sum()) == len(tok.decode(ids).encode("utf-8"))

    check()


@pytest.mark.parametrize("which", ["bpe", "qwen3"])
def test_token_bytes_table(request, which):
    tok = request.getfixturevalue(which)
    table = tok.token_bytes()
    assert table.dtype == torch.long and table.shape == (tok.vocab_size,)
    zero = set(torch.nonzero(table == 0).flatten().tolist())
    assert zero == tok.special_ids and tok.bos_id in zero
    assert int(table.min()) == 0 and int(table[table > 0].min()) == 1


@pytest.mark.parametrize("which", ["bpe", "qwen3"])
def test_batch_encoding_matches_single(request, which):
    tok = request.getfixturevalue(which)
    texts = EDGE_CASES[:8]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    flat = tok.encode_documents(texts).tolist()
    expected = [i for t in texts for i in [tok.bos_id, *tok.encode(t)]]
    assert flat == expected
    assert tok.encode_batch([]) == [] and len(tok.encode_documents([])) == 0


def test_qwen3_is_the_real_vocabulary(qwen3):
    assert qwen3.vocab_size == QWEN3_VOCAB_SIZE
    # docs/design.md#training-recipe: BOS is <|im_start|> (151644), as the FLT authors' get_bos_token_id
    assert qwen3.bos_id == 151_644 and qwen3.decode([qwen3.bos_id]) == "<|im_start|>"
    assert len(qwen3.special_ids) == QWEN3_VOCAB_SIZE - 151_643
    # Qwen's published ids for this string (the vocabulary is the real one, not a look-alike)
    assert qwen3.encode("Hello, world!") == [9707, 11, 1879, 0]


def _reference_bpe(qwen3, text: str) -> list[int]:
    """Textbook byte-level BPE (lowest-rank merge first) over Qwen's pre-tokenisation."""
    import quicktok
    from tokenizers import Regex, pre_tokenizers

    enc = quicktok.get_encoding("qwen3")  # the byte ranks the tokenizer is built on
    ranks = {enc.decode_single_token_bytes(i): i for i in range(151_643)}
    split = pre_tokenizers.Split(Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated")
    ids = []
    for piece, _ in split.pre_tokenize_str(unicodedata.normalize("NFC", text)):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1], 1 << 30), i) for i in range(len(parts) - 1)]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def test_qwen3_matches_reference_bpe(qwen3):
    texts = ["The quick brown fox jumps over the lazy dog's 12345 kennels.\n\n  Indented",
             "Ünïcödé café naïve 日本語 👍🏽 e\u0301", "x = f(a, b)  # comment\r\n\ttab"]
    for text in texts:
        assert qwen3.encode(text) == _reference_bpe(qwen3, text)


def test_qwen3_works_without_network(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n is not permitted here: {probe.stderr.decode().strip()}")
    code = ("import socket\n"
            "try:\n    socket.create_connection(('pypi.org', 443), timeout=2); print('ONLINE')\n"
            "except OSError:\n    pass\n"
            "from loopedlm.data.tokenizer import load_tokenizer\n"
            "t = load_tokenizer('qwen3'); ids = t.encode('Hello, world!')\n"
            "print(t.vocab_size, ids, t.decode(ids))\n")
    result = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ONLINE" not in result.stdout
    assert result.stdout.strip() == f"{QWEN3_VOCAB_SIZE} [9707, 11, 1879, 0] Hello, world!"


@pytest.mark.parametrize("which", ["bpe", "qwen3"])
def test_save_and_load(request, which, tmp_path):
    tok = request.getfixturevalue(which)
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert (again.vocab_size, again.bos_id, again.special_ids) == (
        tok.vocab_size, tok.bos_id, tok.special_ids)
    for text in EDGE_CASES:
        assert again.encode(text) == tok.encode(text)
    assert torch.equal(again.token_bytes(), tok.token_bytes())
    # a run folder holding tokenizer/ is accepted too
    tok.save(tmp_path / "run" / "tokenizer")
    assert load_tokenizer(tmp_path / "run").vocab_size == tok.vocab_size


def test_qwen3_folder_keeps_the_bos_it_was_saved_with(qwen3, tmp_path):
    """A run saved before the BOS became <|im_start|> keeps feeding its model <|endoftext|>."""
    import json

    from loopedlm.data.tokenizer import META_FILE, QWEN3_LEGACY_BOS_TOKEN, Qwen3Tokenizer

    qwen3.save(tmp_path / "new")
    assert load_tokenizer(tmp_path / "new").bos_id == 151_644
    Qwen3Tokenizer(QWEN3_LEGACY_BOS_TOKEN).save(tmp_path / "old")
    assert load_tokenizer(tmp_path / "old").bos_id == 151_643
    # what an older loopedlm wrote: the recorded BOS is honoured ...
    (tmp_path / "v0").mkdir()
    meta = {"kind": "qwen3", "vocab_size": QWEN3_VOCAB_SIZE, "bos_token": "<|endoftext|>"}
    (tmp_path / "v0" / META_FILE).write_text(json.dumps(meta))
    old = load_tokenizer(tmp_path / "v0")
    assert old.bos_id == 151_643
    assert old.encode_documents(["a", "b"]).tolist() == [151_643, 64, 151_643, 65]
    # ... and a folder with no record at all is read as the old BOS
    del meta["bos_token"]
    (tmp_path / "v0" / META_FILE).write_text(json.dumps(meta))
    assert load_tokenizer(tmp_path / "v0").bos_id == 151_643
    meta["bos_token"] = "<|bos|>"
    (tmp_path / "v0" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape("bos_token='<|bos|>' is not a special")):
        load_tokenizer(tmp_path / "v0")


def test_trained_vocabulary_size_and_bos():
    tok = train_tokenizer(CORPUS, 300)
    assert tok.vocab_size == 300
    assert tok.decode([tok.bos_id]) == BOS_TOKEN and tok.special_ids == {tok.bos_id}
    # a larger vocabulary compresses at least as well on its own training text
    bigger = train_tokenizer(CORPUS, 500)
    assert bytes_per_token(bigger, CORPUS) >= bytes_per_token(tok, CORPUS)


@pytest.mark.parametrize("size", [0, 100, 256, 257 - 1, 3.5, True])
def test_vocabulary_too_small_is_an_error(size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, size)


def test_bad_input_errors(bpe, qwen3, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], 300)
    with pytest.raises(FileNotFoundError, match="qwen4"):
        load_tokenizer("qwen4")
    with pytest.raises(ValueError, match="not a loopedlm tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "loopedlm_tokenizer.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="sentencepiece"):
        load_tokenizer(tmp_path)
    for tok in (bpe, qwen3):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([tok.vocab_size])
        with pytest.raises(ValueError, match="not valid Unicode"):
            tok.encode("lone surrogate \ud800")
        with pytest.raises(ValueError, match="not valid Unicode"):
            tok.encode_batch(["fine", "bad \udfff"])
        with pytest.raises(ValueError, match="single string"):
            tok.encode_batch("a string")


def test_training_on_a_corpus_reads_only_its_train_split(tmp_path):
    """The validation shard is held out: a word that only it holds gets no merges, and the
    compression reported on it is measured on exactly its documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": CORPUS}), data / "shard_00000.parquet")
    held_out = ["zyzzyva quixotic zyzzyva " * 50] * 4
    pq.write_table(pa.table({"text": held_out}), data / "shard_00001.parquet")
    tok, saved = train_tokenizer_on_corpus(data, 1000, tmp_path / "tok")
    assert saved == tmp_path / "tok" and load_tokenizer(saved).vocab_size == tok.vocab_size
    assert len(tok.encode(" zyzzyva")) >= len("zyzzyva")  # no merge learnt from the val shard
    assert split_compression(tok, data, "val") == bytes_per_token(tok, held_out)
    assert split_compression(tok, data, "train") == bytes_per_token(tok, CORPUS)


def test_cli_train_and_info(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loopedlm.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": CORPUS[i::3]}), data / f"shard_{i:05d}.parquet")
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out
    assert load_tokenizer(tmp_path / "tok").vocab_size == 300
    assert main(["tokenizer", "info", str(tmp_path / "tok"), "--data", str(data)]) == 0
    assert "vocab size:  300" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "10",
                 "--out", str(tmp_path / "tok2")]) == 2
    assert "vocab_size" in capsys.readouterr().err and not (tmp_path / "tok2").exists()


# ---- incremental decoding (a stream's text) -------------------------------------------------
class _Bytes:
    """One token per byte, decoded as UTF-8 with replacement (invalid runs included)."""

    vocab_size = 256

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class _Metaspace:
    """SentencePiece-style pieces: a leading '▁' is a space, dropped at the text's start."""

    pieces = ["▁the", "▁cat", "s", "▁", "at", ".", "▁日本", "語", "<s>"]
    vocab_size = len(pieces)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


class _Reversed:
    """Not additive at all: the whole text reversed."""

    vocab_size = 256

    def decode(self, ids):
        return _Bytes().decode(ids)[::-1]


@pytest.mark.parametrize("which", ["bpe", "qwen3", "bytes", "words", "metaspace", "reversed"])
def test_incremental_text_is_the_whole_decode_at_every_token(request, which):
    """A stream's text, decoded from its tail only, equals decoding every token so far, after
    each token: multi-byte characters split over tokens, invalid bytes, special tokens, a
    word vocabulary's spaces, SentencePiece's leading space, and a tokenizer that is not
    additive at all (decoded whole)."""
    from loopedlm.data.tokenizer import IncrementalText, WordTokenizer

    tokenizers = {"bytes": _Bytes, "metaspace": _Metaspace, "reversed": _Reversed,
                  "words": lambda: WordTokenizer(["to", "be", "or", "not"])}
    tok = tokenizers[which]() if which in tokenizers else request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(0)
    texts = [t for t in EDGE_CASES if t and len(t) < 200]
    for case in range(40):
        if case < len(texts) and hasattr(tok, "encode"):  # real text, and random ids
            ids = tok.encode(texts[case])
        else:
            ids = torch.randint(0, tok.vocab_size, (60,), generator=gen).tolist()
        stream = IncrementalText(tok)
        for n in range(1, len(ids) + 1):
            assert stream.text(ids[:n]) == tok.decode(ids[:n]), (which, case, n)


def test_incremental_text_decodes_each_token_a_bounded_number_of_times(bpe):
    """The point of it: a long stream decodes each token a few times, not once per later
    token (which made serving quadratic in the output length)."""
    from loopedlm.data.tokenizer import IncrementalText

    decoded = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return bpe.decode(ids)

    ids = bpe.encode(" ".join(["To be, or not to be, that is the question."] * 40))
    stream = IncrementalText(Counting())
    for n in range(1, len(ids) + 1):
        stream.text(ids[:n])
    assert len(ids) > 300 and sum(decoded) <= 4 * len(ids)
