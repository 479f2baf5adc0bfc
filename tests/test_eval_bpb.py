"""Bits per byte and perplexity (docs/design.md#evaluation): the formula, exclusions, WikiText-2 layouts,
the validation shard."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from eval_helpers import ByteTokenizer, tiny_random_model

from loopedlm.evaluate.bpb import evaluate_bpb
from loopedlm.evaluate.perplexity import (
    evaluate_text,
    evaluate_val_shard,
    evaluate_wikitext,
    read_wikitext,
    token_windows,
)

TOK = ByteTokenizer()


def test_bpb_formula_excludes_special_and_ignored_targets():
    model = tiny_random_model(vocab_size=300, sequence_len=16)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 300, (3, 16), generator=g)
    targets = torch.randint(0, 300, (3, 16), generator=g)
    targets[0, :4] = -1  # ignored
    targets[1, 5] = 7  # special: 0 bytes
    token_bytes = torch.randint(1, 5, (300,), generator=g)
    token_bytes[7] = 0
    got = evaluate_bpb(model, [(inputs, targets)], token_bytes, n_loops=2)
    with torch.no_grad():
        logits = model(inputs, n_loops=2)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0),
                             reduction="none")
    keep = (targets.flatten() >= 0) & (token_bytes[targets.flatten().clamp(min=0)] > 0)
    nats = float(losses[keep].sum())
    n_bytes = float(token_bytes[targets.flatten()[keep]].sum())
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nats / int(keep.sum())), rel=1e-5)
    assert got["tokens"] == int(keep.sum()) == 3 * 16 - 4 - 1


def test_bpb_of_a_uniform_model_on_single_byte_tokens_is_log2_vocab():
    class Uniform(torch.nn.Module):
        def forward(self, idx, n_loops=None):
            return torch.zeros(*idx.shape, 64)

    inputs = torch.randint(0, 64, (2, 10))
    got = evaluate_bpb(Uniform(), [(inputs, inputs)], torch.ones(64, dtype=torch.long))
    assert got["bpb"] == pytest.approx(math.log2(64))
    assert got["ppl"] == pytest.approx(64)


def test_all_targets_excluded_is_an_error():
    model = tiny_random_model(vocab_size=300, sequence_len=8)
    x = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="no counted target"):
        evaluate_bpb(model, [(x, torch.full_like(x, -1))], torch.ones(300, dtype=torch.long))


def test_token_windows_predict_every_token_once():
    tokens = list(range(1, 24))
    seen = []
    for inputs, targets in token_windows(tokens, seq_len=5, batch_size=2):
        for row_in, row_t in zip(inputs.tolist(), targets.tolist(), strict=True):
            for x, y in zip(row_in, row_t, strict=True):
                if y >= 0:
                    assert tokens.index(y) == tokens.index(x) + 1
                    seen.append(y)
    assert seen == tokens[1:]


WIKI = " = Robert Boulter = \n \n Robert Boulter is an English film and television actor . \n"


def test_wikitext_raw_and_parquet_layouts_agree(tmp_path):
    raw_dir = tmp_path / "wikitext-2-raw"
    raw_dir.mkdir()
    (raw_dir / "wiki.valid.raw").write_text(WIKI * 3, encoding="utf-8")
    pq_dir = tmp_path / "hf" / "wikitext-2-raw-v1"
    pq_dir.mkdir(parents=True)
    lines = (WIKI * 3).splitlines(keepends=True)
    pq.write_table(pa.table({"text": lines}), pq_dir / "validation-00000-of-00001.parquet")
    assert read_wikitext(raw_dir) == read_wikitext(pq_dir) == WIKI * 3
    assert read_wikitext(tmp_path / "hf") == WIKI * 3  # the folder above the layout
    model = tiny_random_model(sequence_len=32)
    a = evaluate_wikitext(model, TOK, raw_dir, n_loops=2, batch_size=4)
    b = evaluate_wikitext(model, TOK, pq_dir / "validation-00000-of-00001.parquet", n_loops=2)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    assert a["tokens"] == len((WIKI * 3).encode())  # every byte predicted once
    # loops matter: the same (random, non-zero) weights differ at another loop count
    randomize_(model, std=0.1)
    c2, c5 = (evaluate_text(model, TOK, WIKI * 3, n_loops=n)["ppl"] for n in (2, 5))
    assert c2 != pytest.approx(c5, rel=1e-6)


def test_wikitext_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_wikitext(tmp_path / "nope.raw")
    with pytest.raises(FileNotFoundError, match="no WikiText-2 validation file"):
        read_wikitext(tmp_path)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "validation-0.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        read_wikitext(tmp_path)
    (tmp_path / "empty.raw").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_wikitext(tmp_path / "empty.raw")


def test_val_shard(tmp_path):
    data = pytest.importorskip("loopedlm.data.loader")
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(40)]
    for s, chunk in enumerate([docs[:20], docs[20:30], docs[30:]]):
        pq.write_table(pa.table({"text": chunk}), tmp_path / f"shard_{s:05d}.parquet",
                       row_group_size=5)
    assert data.split_shards(tmp_path, "val")  # the last shard is the validation split
    model = tiny_random_model(sequence_len=32)
    r = evaluate_val_shard(model, TOK, tmp_path, n_loops=2, batch_size=4)
    val_bytes = sum(len(d.encode()) for d in docs[30:])
    # BOS targets (0 bytes) are excluded; each packed row's first token is context only
    assert r["bytes"] == r["tokens"]
    assert 0.9 * val_bytes < r["tokens"] <= val_bytes
    assert 0 < r["bpb"] < 20 and r["ppl"] == pytest.approx(2 ** (r["bpb"]), rel=1e-6)


def test_byte_tokenizer_satisfies_the_contract():
    tok = ByteTokenizer()
    text = "héllo, wörld"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    assert int(tok.token_bytes()[tok.bos_id]) == 0
