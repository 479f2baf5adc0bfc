"""Synthetic reasoning tasks (issue 28): the generator, its fixed-word tokenizer, the
exact-answer evaluator and the command line, end to end on a tiny run."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_model

from loopedlm.cli import main
from loopedlm.data.synthetic import (
    EVAL_DIR,
    TASKS,
    SyntheticConfig,
    documents,
    read_synthetic_manifest,
    write_synthetic,
)
from loopedlm.data.tokenizer import WordTokenizer, load_tokenizer
from loopedlm.evaluate.synthetic import evaluate_synthetic, per_loop_logits

SMALL = dict(seq_len=96, hops=(1, 4), eval_hops=(1, 2, 3, 4, 6), train_docs=64, val_docs=8,
             eval_docs=6)


def config(task: str = "chain", **overrides) -> SyntheticConfig:
    values = dict(SMALL, task=task)
    if task == "phop":
        values["task_options"] = {"alphabet": 6, "prefix": 24}
    if task in ("perm", "pointer"):
        values["task_options"] = {"alphabet": 6, "asked": 5}
    if task == "compose":
        values["task_options"] = {"alphabet": 6, "functions": 3}
    if task == "reach":
        values["task_options"] = {"open_kinds": 2}
    values.update(overrides)
    return SyntheticConfig(**values)


# ---- independent solvers: what the answer of each query must be --------------------------
def solve_chain(words: list[str]) -> list[tuple[int, str, int]]:
    """(answer index, answer, hops) of every `? var value` of a chain document."""
    program = {}
    end = words.index("?")
    for k in range(0, end, 3):
        lhs, eq, rhs = words[k:k + 3]
        assert eq == "=" and lhs not in program  # each variable is assigned once
        program[lhs] = rhs
    out = []
    for k in range(end, len(words) - 2, 3):
        if words[k] != "?":
            break
        var, steps = words[k + 1], 0
        while not var.isdigit():
            var, steps = program[var], steps + 1
        out.append((k + 2, var, steps))
    return out


def solve_phop(words: list[str], prefix: int) -> list[tuple[int, str, int]]:
    """(answer index, answer, p) of every pair after the prefix of a p-hop document."""
    p = int(words[0][1:])
    seq = words[1:]

    def hop(i):  # the position after the most recent earlier occurrence of seq[i]
        earlier = [j for j in range(i) if seq[j] == seq[i]]
        return earlier[-1] + 1 if earlier else None

    out = []
    for i in range(prefix, len(seq) - 1, 2):
        j = i
        for _ in range(p):
            j = hop(j) if j is not None else None
        if j is not None:
            out.append((i + 2, seq[j], p))
    return out


def solve_perm(words: list[str]) -> list[tuple[int, str, int]]:
    """(answer index, answer, K) of every letter after the arrows of a perm document."""
    k = int(words[0][1:])
    arrows = [w for w in words if ">" in w]
    following = dict(w.split(">") for w in arrows)
    assert words[1:1 + len(arrows)] == arrows and len(following) == len(arrows)
    # one cycle through every letter: following the arrows from any letter visits all
    seen, letter = [], arrows[0][0]
    for _ in range(len(arrows)):
        seen.append(letter)
        letter = following[letter]
    assert sorted(seen) == sorted(following) and letter == seen[0]
    out = []
    asked = []
    for i in range(1 + len(arrows), len(words) - 1, 2):
        if words[i] == ".":
            break
        asked.append(words[i])
        answer = words[i]
        for _ in range(k):
            answer = following[answer]
        out.append((i + 1, answer, k))
    assert len(set(asked)) == len(asked)  # each letter asked once: no answer to copy
    return out


def solve_pointer(words: list[str]) -> list[tuple[int, str, int]]:
    """(answer index, answer, K) of every letter after the `|` of a pointer document: the
    same cycle as perm's, each arrow written `A b`."""
    end = words.index("|")
    arrows = [f"{words[k].lower()}>{words[k + 1]}" for k in range(1, end, 2)]
    assert all(words[k].isupper() and words[k + 1].islower() for k in range(1, end, 2))
    asked = [w for w in words[end + 1::2] if w != "."]
    assert all(w.isupper() for w in asked)
    as_perm = [words[0], *arrows] + [w for a in asked for w in (a.lower(), "?")]
    return [(end + 2 + 2 * k, answer, hops)
            for k, (_, answer, hops) in enumerate(solve_perm(as_perm))]


def compose_functions(texts: list[str]) -> dict[str, dict[str, str]]:
    """The functions of a compose data set, read off its 1-hop queries (each `x g = y` says
    g(x) = y), checked to be functions: the documents must agree on them."""
    table: dict[str, dict[str, str]] = {}
    for text in texts:
        words = text.split()
        for k in range(len(words) - 3):
            if words[k + 2] == "=" and words[k].startswith("s"):  # x g = y
                f = table.setdefault(words[k + 1], {})
                assert f.setdefault(words[k], words[k + 3]) == words[k + 3]
    return table


COMPOSE_TABLE: dict[str, dict[str, str]] = {}  # read off the test config's training set


def solve_compose(words: list[str]) -> list[tuple[int, str, int]]:
    """(answer index, answer, K) of every `x g1 ... gK = y` of a compose document: the
    functions (read off the training documents' 1-hop answers) applied in turn."""
    out = []
    starts = []
    k = 0
    while k < len(words) and words[k] != ".":
        x, end = words[k], words.index("=", k)
        starts.append(x)
        for g in words[k + 1:end]:
            x = COMPOSE_TABLE[g][x]
        out.append((end + 1, x, end - k - 1))
        k = end + 2
    assert all(w == "." for w in words[k:])
    assert len(set(starts)) == len(starts)  # each symbol asked once: no answer to copy
    return out


def solve_reach(words: list[str]) -> list[tuple[int, str, int]]:
    """(answer index, answer, distance) of every `? y|n` of a reach document: flood the row
    from each source rightwards until a wall; every run starts with a marker."""
    reached, out, last_marker = [], [], None
    for k, word in enumerate(words):
        if word in ("S", "#"):
            last_marker = k
        flooded = word == "S" or (word != "#" and bool(reached) and reached[-1])
        reached.append(flooded)
        if word == "?":
            assert last_marker is not None and words[k + 1] in ("y", "n")
            out.append((k + 1, "y" if flooded else "n", k - last_marker))
    return out


def solve(task: str, words: list[str]) -> list[tuple[int, str, int]]:
    if task == "compose" and not COMPOSE_TABLE:
        COMPOSE_TABLE.update(compose_functions(list(documents(config("compose",
                                                                      train_docs=200),
                                                               "train"))))
    solvers = {"chain": solve_chain, "perm": solve_perm, "pointer": solve_pointer,
               "compose": solve_compose, "reach": solve_reach}
    return solvers.get(task, lambda w: solve_phop(w, 24))(words)


# ---- the generator -----------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(TASKS))
def test_documents_are_a_function_of_the_seed(task):
    first = list(documents(config(task), "train"))
    assert first == list(documents(config(task), "train"))
    assert first != list(documents(config(task, seed=1), "train"))
    # any one document can be rebuilt alone, and a test set is its own stream
    assert list(documents(config(task), "eval", 3, hops=2)) == \
        list(documents(config(task), "eval", 3, hops=2))
    assert list(documents(config(task), "eval", 3, hops=2)) != \
        list(documents(config(task), "eval", 3, hops=3))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_answer_follows_from_the_document(task):
    cfg = config(task)
    made = cfg.make_task()
    texts = list(documents(cfg, "train")) + [t for h in cfg.eval_hops
                                             for t in documents(cfg, "eval", hops=h)]
    for text in texts:
        words = text.split()
        assert len(words) == cfg.seq_len
        expected = solve(task, words)
        assert expected, text  # every document asks something
        for (index, answer, hops), query in zip(expected, made.queries(words), strict=True):
            assert words[index] == answer == query.answer
            assert (query.index, query.hops) == (index, hops)
            if task in ("perm", "pointer"):  # the letters not ruled out (the one asked,
                earlier = {a for i, a, _ in expected if i < index}  # the earlier answers)
                ruled_out = earlier | {words[index - 1].lower()}
                assert query.guess == pytest.approx(1 / (6 - len(ruled_out)))
            elif task == "reach":  # the marker is a source or a wall with odds 1/2
                assert query.guess == 0.5
            elif hops > 1 or task in ("phop", "compose"):  # the root (or letter) is drawn uniformly
                assert query.guess == pytest.approx(0.1 if task == "chain" else 1 / 6)
            else:  # each root is asked once at most: the digits of roots not asked yet
                assert 0.1 <= query.guess <= 1


def test_perm_documents_fill_their_default_length_with_half_the_letters_asked():
    cfg = SyntheticConfig(task="perm", train_docs=4, val_docs=1, eval_docs=2)
    assert cfg.seq_len == 1 + 16 + 2 * 8  # no padding
    for text in documents(cfg, "eval", hops=12):
        words = text.split()
        assert "." not in words and len(solve_perm(words)) == 8
        # K hops around one 16-cycle never land on the letter asked
        assert all(words[i - 1] != answer for i, answer, _ in solve_perm(words))


def test_compose_applies_fixed_cycles_named_in_the_query():
    cfg = config("compose", train_docs=200)
    table = compose_functions(list(documents(cfg, "train")))
    # three functions, every symbol's image seen, each one cycle through all six symbols,
    # and they are the task's own
    assert sorted(table) == ["f1", "f2", "f3"]
    for f in table.values():
        seen, symbol = [], "s0"
        for _ in range(6):
            seen.append(symbol)
            symbol = f[symbol]
        assert symbol == "s0" and sorted(seen) == sorted(f)
    assert cfg.make_task().table == table
    # the same in a data set of another seed (documents differ, functions do not) ...
    other = config("compose", train_docs=200, seed=3)
    assert compose_functions(list(documents(other, "train"))) == table
    assert list(documents(other, "train")) != list(documents(cfg, "train"))
    # ... and others with another function_seed
    assert config("compose", task_options={"alphabet": 6, "functions": 3,
                                            "function_seed": 1}).make_task().table != table
    # the default documents: 64 words, about 8 queries; the functions word is random
    default = SyntheticConfig(task="compose", train_docs=50)
    queries = [q for t in documents(default, "train")
               for q in default.make_task().queries(t.split())]
    assert default.seq_len == 64 and 6 * 50 <= len(queries) <= 16 * 50
    assert all(q.guess == 1 / 32 for q in queries)
    with pytest.raises(ValueError, match="functions"):
        SyntheticConfig(task="compose", task_options={"functions": 0})


def test_reach_answers_hand_checked_and_no_answer_tells_the_next():
    task = SyntheticConfig(task="reach", train_docs=4, val_docs=1, eval_docs=1).make_task()
    words = "S b a d ? y # c ? n S ? y # ? n . .".split()
    assert [(q.index, q.answer, q.hops) for q in task.queries(words)] == \
        [(5, "y", 4), (9, "n", 2), (12, "y", 1), (15, "n", 1)]
    # a row that starts open is walled at its start
    assert [(q.answer, q.hops) for q in task.queries("a ? n".split())] == [("n", 2)]
    cfg = config("reach", train_docs=200)
    answers = []
    for text in documents(cfg, "train"):
        words = text.split()
        # a marker between any two questions: the answer in view never tells the next one
        asks = [i for i, w in enumerate(words) if w == "?"]
        for a, b in zip(asks, asks[1:], strict=False):
            assert {"S", "#"} & set(words[a + 2:b])
        assert set(words) <= {"a", "b", "S", "#", "?", "y", "n", "."}
        assert all(x != y or x not in "ab" for x, y in zip(words, words[1:], strict=False))
        answers += [a for _, a, _ in solve_reach(words)]
    assert 0.45 < answers.count("y") / len(answers) < 0.55  # a fair coin: guess 1/2
    with pytest.raises(ValueError, match="open_kinds"):
        SyntheticConfig(task="reach", task_options={"open_kinds": 0})


def test_chain_queries_are_leaves_of_distinct_paths():
    """No queried variable is an ancestor of another one (but a root, whose digit the
    program states anyway): no answer shortens a lookup."""
    for text in documents(config(), "train"):
        words = text.split()
        program = {words[k]: words[k + 2] for k in range(0, words.index("?"), 3)}
        asked = {words[index - 1] for index, _, _ in solve_chain(words)}
        for var in asked:
            node = program[var]
            while node in program:
                assert node not in asked or program[node].isdigit(), (var, node, text)
                node = program[node]
        digits = sorted(v for v in program.values() if v.isdigit())
        assert digits in ([str(d) for d in range(10)], [str(d) for d in range(10)
                                                         for _ in range(2)])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_test_sets_have_exactly_their_hops_and_training_stays_in_range(task):
    cfg = config(task)
    for hops in cfg.eval_hops:
        for text in documents(cfg, "eval", hops=hops):
            assert {h for _, _, h in solve(task, text.split())} == {hops}
    train_hops = {h for t in documents(cfg, "train") for _, _, h in solve(task, t.split())}
    assert train_hops <= set(range(1, 5)) and max(train_hops) == 4


def test_curriculum_grows_the_largest_hop_count():
    cfg = config(curriculum=0.5, train_docs=200)
    largest = [max(h for _, _, h in solve_chain(t.split())) for t in documents(cfg, "train")]
    assert max(largest[:25]) == 1 and max(largest[100:]) == 4
    assert [cfg.max_hops_at(i) for i in (0, 24, 25, 50, 75, 99, 100, 199)] == \
        [1, 1, 2, 3, 4, 4, 4, 4]
    assert config(curriculum=0).max_hops_at(0) == 4


@pytest.mark.parametrize("task", sorted(TASKS))
def test_written_splits_are_disjoint_and_readable(task, tmp_path):
    cfg = config(task)
    out = write_synthetic(cfg, tmp_path / "data")
    shards = sorted(out.glob("*.parquet"))
    texts = [pq.read_table(p).column("text").to_pylist() for p in shards]
    train, val = {t for part in texts[:-1] for t in part}, set(texts[-1])
    tests = {p.name: pq.read_table(p).column("text").to_pylist()
             for p in sorted((out / EVAL_DIR).glob("*.parquet"))}
    assert sum(len(part) for part in texts[:-1]) == cfg.train_docs
    assert not train & val
    for name, docs in tests.items():
        assert docs and not train & set(docs) and not val & set(docs), name
    manifest = read_synthetic_manifest(out)
    assert manifest["eval"]["hops_06.parquet"]["held_out"] is True
    assert manifest["eval"]["hops_04.parquet"]["held_out"] is False
    # the same settings again: nothing to do; other settings: refused unless overwritten
    assert write_synthetic(cfg, out) == out
    with pytest.raises(ValueError, match="other settings"):
        write_synthetic(config(task, seed=5), out)
    write_synthetic(config(task, seed=5), out, overwrite=True)
    assert read_synthetic_manifest(out)["config"]["seed"] == 5
    tok = load_tokenizer(out / "tokenizer")
    ids = tok.encode(texts[0][0])
    assert tok.decode(ids) == texts[0][0] and tok.unk_id not in ids


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="task"):
        SyntheticConfig(task="sudoku")
    with pytest.raises(ValueError, match="hops"):
        SyntheticConfig(hops=(0, 3))
    with pytest.raises(ValueError, match="seq_len=20 is too short"):
        SyntheticConfig(seq_len=20)
    with pytest.raises(ValueError, match="'alphabet' is not an option of the chain task"):
        SyntheticConfig(task_options={"alphabet": 4})


# ---- the fixed-word tokenizer ------------------------------------------------------------
def test_word_tokenizer_round_trip_and_save(tmp_path, caplog):
    tok = WordTokenizer(["a", "b", "=", "7"])
    text = "a = 7 b = a"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.bos_id not in ids
    assert tok.encode_documents([text, "b"]).tolist() == [0, *ids, 0, tok.encode("b")[0]]
    assert tok.token_bytes().tolist() == [0, 0, 2, 2, 2, 2]  # word + its space; specials 0
    again = load_tokenizer(tok.save(tmp_path / "tok"))
    assert isinstance(again, WordTokenizer) and again.encode(text) == ids
    with caplog.at_level(logging.WARNING):
        assert tok.encode("a The") == [tok.encode("a")[0], tok.unk_id]
    assert "'The'" in caplog.text
    with pytest.raises(ValueError, match="appears twice"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="can not be a token"):
        WordTokenizer(["a b"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([99])


# ---- the evaluator -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flt", "lt"])
def test_per_loop_logits_are_the_forward_at_each_loop_count(mode):
    model = tiny_model(loop_mode=mode, n_loops=3)
    idx = torch.randint(0, 61, (2, 12))
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 11])
    per_loop = per_loop_logits(model, idx, 4, rows, cols)
    for t in range(1, 5):  # the head on 3 rows, not on all: float rounding may differ
        torch.testing.assert_close(per_loop[t - 1], model(idx, n_loops=t)[rows, cols],
                                   rtol=1e-5, atol=1e-5)


class Oracle(torch.nn.Module):
    """A stand-in model that knows every answer and finds it at loop `hops` (before, it
    answers a wrong word): its accuracy at N is exactly the share of queries with
    hops <= N."""

    def __init__(self, tokenizer, task, n_loops=2):
        super().__init__()
        self.tokenizer, self.task = tokenizer, task
        self.config = type("Config", (), {"n_loops": n_loops})()

    def prepare(self, idx):
        return idx

    def loop(self, idx, previous, loop):
        out = torch.zeros(*idx.shape, self.tokenizer.vocab_size)
        out[..., self.tokenizer.bos_id] = 1.0  # wrong everywhere by default
        for r, ids in enumerate(idx.tolist()):
            words = self.tokenizer.decode(ids[1:]).split()
            for index, answer, hops in solve_chain(words + ["."]):
                if loop + 1 >= hops:
                    out[r, index, :] = 0
                    out[r, index, self.tokenizer.encode(answer)[0]] = 1.0
        return out

    def logits(self, h):
        return h


def test_evaluator_scores_a_model_whose_answers_are_known(tmp_path):
    cfg = config(eval_hops=(1, 2, 3, 5))
    out = write_synthetic(cfg, tmp_path / "data")
    tok = load_tokenizer(out / "tokenizer")
    results = evaluate_synthetic(Oracle(tok, cfg.make_task()), tok, out, [1, 2, 3, 6])
    for hops in (1, 2, 3, 5):
        assert results["metrics"][f"synthetic/hops={hops}"] == {
            str(n): (1.0 if n >= hops else 0.0) for n in (1, 2, 3, 6)}
        assert results["first_correct"][str(hops)] == hops
        assert results["never_correct"][str(hops)] == 0
        # 10 roots asked once each at 1 hop: the mean of 1/10, 1/9, ..., 1/1
        assert results["guess"][str(hops)] == pytest.approx(
            0.1 if hops > 1 else sum(1 / k for k in range(1, 11)) / 10)
    assert results["curve"]["5"] == [0, 0, 0, 0, 1.0, 1.0]


def test_evaluator_on_a_real_model_matches_the_forward_and_the_engine(tmp_path):
    cfg = config(eval_hops=(1, 3))
    out = write_synthetic(cfg, tmp_path / "data")
    tok = load_tokenizer(out / "tokenizer")
    model = tiny_model(vocab_size=tok.vocab_size, sequence_len=cfg.seq_len, n_loops=2)
    results = evaluate_synthetic(model, tok, out, [1, 3], adaptive_thresholds=[0.0, 1e9])
    task = cfg.make_task()
    for hops in (1, 3):
        texts = pq.read_table(out / EVAL_DIR / f"hops_{hops:02d}.parquet").column(
            "text").to_pylist()
        for n in (1, 3):
            right = total = 0
            for text in texts:
                ids = [tok.bos_id] + tok.encode(text)
                logits = model(torch.tensor([ids[:-1]]), n_loops=n)[0]
                for q in task.queries(text.split()):
                    right += int(logits[q.index].argmax()) == ids[q.index + 1]
                    total += 1
            assert results["metrics"][f"synthetic/hops={hops}"][str(n)] == \
                pytest.approx(right / total)
        # threshold 0 never converges: every answer runs all 3 loops, exactly as the forward;
        # a huge one stops at the second loop, whose answer is the forward's at N=2
        exact, early = results["adaptive"]["0"][str(hops)], results["adaptive"]["1e+09"][str(hops)]
        assert exact["mean_loops"] == 3 and early["mean_loops"] == 2
        assert exact["accuracy"] == pytest.approx(results["curve"][str(hops)][2])
        assert early["accuracy"] == pytest.approx(results["curve"][str(hops)][1])


# ---- the command line, end to end --------------------------------------------------------
def test_cli_seq_len_defaults_to_the_tasks_own(tmp_path, capsys):
    """Regression: `--seq-len` defaulted to the default task's 128 words for every task."""
    out = tmp_path / "reach"
    assert main(["data", "synthetic", "reach", "--out", str(out), "--train-docs", "4",
                 "--val-docs", "1", "--eval-docs", "1"]) == 0
    assert read_synthetic_manifest(out)["sequence_len"] == 64
    assert "--sequence_len=64" in capsys.readouterr().out


def test_cli_data_train_eval_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synthetic", "chain", "--out", str(data), "--seq-len", "96",
                 "--hops", "1-3", "--eval-hops", "1-4", "--train-docs", "48",
                 "--val-docs", "8", "--eval-docs", "4"]) == 0
    assert "--sequence_len=96" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", f"--run_dir={run}", f"--data_dir={data}", "--sequence_len=96",
                 "--model.sequence_len=96", "--model.d_model=32", "--model.n_head=1",
                 "--model.n_loops=2", "--total_batch_tokens=384", "--device_batch_size=4",
                 "--steps=2", "--eval_tokens=384", "--device=cpu", "--progress=false",
                 "--sample_tokens=2"]) == 0
    assert json.loads((run / "tokenizer" / "loopedlm_tokenizer.json").read_text())["kind"] \
        == "words"  # "auto" takes the data set's own tokenizer
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--tasks", "synthetic", "--n-loops", "1,2,3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| hops | queries | guess | N=1 | N=2 | N=3 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["loops"] == [1, 2, 3] and results["hops"] == [1, 2, 3, 4]
    assert set(results["metrics"]) == {f"synthetic/hops={h}" for h in (1, 2, 3, 4)}
    for name in ("results.md", "synthetic_heatmap.png", "synthetic_first_correct.png"):
        assert (out / name).stat().st_size > 0
    # the per-loop view of a sample: every generated token, every loop up to --n-loops
    assert main(["sample", str(run), "--prompt", "v1 = 3 ? v1", "--max-tokens", "2",
                 "--temperature", "0", "--n-loops", "3", "--trace-loops",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "--- per-loop view" in printed
    tokens = sum(line.startswith("token ") for line in printed.splitlines())
    assert 1 <= tokens <= 2 and "token 1: " in printed  # (a BOS generated would stop it)
    assert [line.split()[:2] for line in printed.splitlines() if line.startswith("  loop")] \
        == [["loop", str(t)] for _ in range(tokens) for t in (1, 2, 3)]


# ---- the sweep report ----------------------------------------------------------------------
def test_report_section_reads_synthetic_results(tmp_path):
    """`loopedlm report` of a reasoning sweep: accuracy by mode, test-time loops, the first
    correct loop, adaptive exit and the verdict on the issue's target."""
    from loopedlm.experiments.report.write import write_report

    def curve(hops, gain):  # accuracy reaches 1 at loop `hops` for a model that uses loops
        return [min(1.0, 0.1 + gain * n / hops) for n in range(1, 17)]

    rows = []
    for name, settings, gain in [
            ("flt4", {"model.loop_mode": "flt", "model.n_loops": 4}, 1.0),
            ("lt4", {"model.loop_mode": "lt", "model.n_loops": 4}, 0.0),
            ("tt", {"model.loop_mode": "flt", "model.n_loops": 6, "loop_sampling": "fixed"},
             1.0),
            # another setting that the sweep varies names its own group (not a seed of flt4)
            ("ctl", {"model.loop_mode": "flt", "model.n_loops": 4,
                     "model.full_last_layer": True}, 0.0)]:
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"status": "completed", "step": 5}))
        results = {"loops": [1, 2, 8, 16], "trained_hops": [1, 8], "hops": [2, 8],
                   "curve": {str(h): curve(h, gain) for h in (2, 8)},
                   "guess": {"2": 0.1, "8": 0.1},
                   "first_correct": {"2": 2.0, "8": 8.0 if gain else None},
                   "adaptive": {"0.01": {"2": {"mean_loops": 3.0, "accuracy": 0.9},
                                         "8": {"mean_loops": 9.5, "accuracy": 0.8}}}}
        (run / "eval" / "results.json").write_text(json.dumps(results))
        rows.append({"name": name, "settings": {**settings, "seed": 0}})
    (tmp_path / "sweep.json").write_text(json.dumps({"experiment": "reasoning", "runs": rows}))
    text = write_report(tmp_path).read_text()
    assert "| flt N=4 | 1 | 1.0000 | 0.6000 | 0 |" in text  # hops 2 and 8 at trained N=4
    assert "| lt N=4 | 1 | 0.1000 | 0.1000 | 0 |" in text
    assert "| flt N=4, full_last_layer=True | 1 | 0.1000 | 0.1000 | 0 |" in text
    assert "| guessing | | 0.100 | 0.100 |" in text
    assert "**flt N=6: accuracy at each test-time loop count**" in text
    assert "- flt N=4: 0.350 at N=2 -> 1.000 at N=8 (+65.0 points): met" in text
    assert "- lt N=4: 0.100 at N=2 -> 0.100 at N=8 (+0.0 points): not met" in text
    assert "| flt N=4 | 0.01 | 3.00 (0.90) | 9.50 (0.80) |" in text
    for figure in ("reasoning_by_mode.png", "reasoning_test_time.png",
                   "reasoning_first_correct.png"):
        assert (tmp_path / figure).stat().st_size > 0
