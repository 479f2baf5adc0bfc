"""Budget evaluation and `loopedlm eval`: every metric at every loop count, outputs, a failing
task keeps the others, bad input gives one clear error line."""

from __future__ import annotations

import json

import pytest
from eval_helpers import ByteTokenizer, tiny_random_model

from loopedlm.cli import main
from loopedlm.evaluate import budget
from loopedlm.evaluate.items import TaskSpec

WIKI = " = Valkyria Chronicles = \n \n The game began development in 2010 . \n" * 4


def synthetic_task(name):
    items = [{"query": f"Q{i}:", "choices": ["yes", "no"], "gold": i % 2} for i in range(6)]
    return TaskSpec(name, "multiple_choice", 1, " ", 0.5), items


def test_budget_outputs_every_metric_at_every_loop_count(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "load_task", synthetic_task)
    real = budget.evaluate_task

    def flaky(model, tok, spec, items, **kw):
        if spec.name == "bad":
            raise RuntimeError("boom")
        return real(model, tok, spec, items, **kw)

    monkeypatch.setattr(budget, "evaluate_task", flaky)
    wiki = tmp_path / "wiki.valid.raw"
    wiki.write_text(WIKI)
    model = tiny_random_model(sequence_len=64)
    results = budget.evaluate_budget(model, ByteTokenizer(), [1, 3], tasks=["piqa", "bad"],
                                     wikitext=wiki, max_examples=4)
    assert set(results["metrics"]["wikitext_ppl"]) == {"1", "3"}
    assert set(results["metrics"]["acc/piqa"]) == {"1", "3"}
    assert results["metrics"]["core"]["1"] == pytest.approx(
        results["tasks"]["piqa"]["1"]["centered"])
    assert [e["metric"] for e in results["errors"]] == ["task/bad", "task/bad"]
    paths = budget.write_budget_outputs(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["loops"] == [1, 3]
    md = paths["md"].read_text()
    assert "| metric | N=1 | N=3 |" in md and "CORE (1/22 tasks present)" in md and "boom" in md
    assert paths["png"].stat().st_size > 1000


def test_parse_loops():
    assert budget.parse_loops("1,3, 6,3") == [1, 3, 6]
    for bad, msg in [("0,3", "must be >= 1"), ("1,x", "'x' is not an integer"), ("", "not an integer")]:
        with pytest.raises(ValueError, match=msg):
            budget.parse_loops(bad)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tokmod = pytest.importorskip("loopedlm.data.tokenizer_training")
    from loopedlm.model.checkpoint import save_model

    root = tmp_path_factory.mktemp("run")
    tok = tokmod.train_tokenizer([WIKI, "The quick brown fox jumps over the lazy dog. " * 20], 300)
    tok.save(root / "tokenizer")
    model = tiny_random_model(vocab_size=tok.vocab_size, sequence_len=64)
    save_model(root / "checkpoints" / "step_000010", model, {"step": 10})
    (root / "wiki.valid.raw").write_text(WIKI)
    return root


def test_cli_eval_writes_the_budget_table(run_dir, tmp_path, capsys):
    rc = main(["eval", str(run_dir), "--n-loops", "1,2", "--tasks", "none", "--wikitext",
               str(run_dir / "wiki.valid.raw"), "--out", str(tmp_path / "ev")])
    assert rc == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["metrics"]["wikitext_ppl"]) == {"1", "2"}
    assert (tmp_path / "ev" / "budget.png").exists()
    assert "| wikitext_ppl |" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--n-loops", "0"], "loop count 0 is not allowed"),
    (["--tasks", "arc_easyy"], "did you mean 'arc_easy'"),
    (["--wikitext", "/nonexistent/wiki.raw"], "does not exist"),
])
def test_cli_bad_input(run_dir, capsys, args, message):
    assert main(["eval", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--tasks", "none"]) == 2
    assert "is not a loopedlm run or checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flag,expected", [("all", 6), ("4", 4)])
def test_cli_max_examples_all_evaluates_every_item(run_dir, tmp_path, monkeypatch, flag, expected):
    monkeypatch.setattr(budget, "load_task", synthetic_task)
    rc = main(["eval", str(run_dir), "--n-loops", "1", "--tasks", "piqa", "--max-examples", flag,
               "--out", str(tmp_path / "ev")])
    assert rc == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["tasks"]["piqa"]["1"]["n"] == expected
    assert results["settings"]["max_examples"] == (None if flag == "all" else expected)
    with pytest.raises(SystemExit):  # argparse: "0 must be >= 1"
        main(["eval", str(run_dir), "--max-examples", "0"])


def test_load_eval_target_of_a_run_and_its_outputs(run_dir, tmp_path, caplog):
    from loopedlm.evaluate.loading import load_eval_target

    with caplog.at_level("WARNING", logger="loopedlm.evaluate.loading"):
        target = load_eval_target(run_dir, [1, 2], device="cpu", data_dir=tmp_path / "absent")
    assert target.loops == [1, 2] and target.device == "cpu"
    assert target.folder == run_dir / "checkpoints" / "step_000010"
    assert target.default_out == target.folder / "eval"
    assert target.data_dir is None and "absent not found" in caplog.text  # skipped, said once
    results, paths = budget.run_budget_evaluation(
        target, tmp_path / "out", tasks=[], wikitext=run_dir / "wiki.valid.raw",
        max_examples=None, batch_size=2, val_batches=None)
    assert results["checkpoint"] == str(target.folder)
    assert set(results["metrics"]["wikitext_ppl"]) == {"1", "2"}
    assert results["settings"]["batch_size"] == 2
    assert json.loads(paths["json"].read_text())["metrics"] == results["metrics"]


# ---- the estimate printed before an evaluation, and the presets (issue 21) ---------------
def test_cli_eval_says_how_long_it_will_take_and_where_results_go(run_dir, capsys):
    assert main(["eval", str(run_dir), "--n-loops", "1,2", "--tasks", "none", "--wikitext",
                 str(run_dir / "wiki.valid.raw")]) == 0
    err = capsys.readouterr().err
    out_dir = run_dir / "checkpoints" / "step_000010" / "eval"  # the checkpoint's folder
    assert f"results -> {out_dir}" in err
    assert "estimated time on cpu: about " in err
    assert (out_dir / "results.json").exists()


@pytest.mark.parametrize("flags,tasks,max_examples", [
    ([], "core", 200),
    (["--preset", "quick"], "downstream", 20),
    (["--preset", "quick", "--max-examples", "3"], "downstream", 3),
    (["--preset", "quick", "--tasks", "piqa"], "piqa", 20),
])
def test_cli_eval_presets_fill_what_the_flags_do_not_say(run_dir, tmp_path, task_data_fixtures,
                                                          flags, tasks, max_examples):
    from loopedlm.evaluate.tasks import resolve_task_names

    assert main(["eval", str(run_dir), "--n-loops", "1", *flags, "--out", str(tmp_path)]) == 0
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    shipped = [t for t in resolve_task_names(tasks) if t not in ("winograd", "agi_eval_lsat_ar")]
    assert settings["tasks"] == shipped
    assert settings["max_examples"] == max_examples


def test_the_estimate_counts_the_tokens_that_are_scored(task_data_fixtures):
    from loopedlm.evaluate.estimate import estimate_evaluation, format_duration, seconds_per_token
    from loopedlm.evaluate.prompts import prepare_example, select_examples
    from loopedlm.evaluate.tasks import load_task

    model, tok = tiny_random_model(sequence_len=256), ByteTokenizer()  # no prompt is cropped
    tasks = {name: load_task(name) for name in ("piqa", "winogrande", "jeopardy")}
    scored = 0
    for spec, items in tasks.values():  # 3 examples each: every one is sampled
        evaluated = [items[i] for i in select_examples(len(items), None)]
        scored += sum(len(s) for pos in range(len(evaluated))
                      for s in prepare_example(evaluated, pos, spec, tok).sequences)
    estimate = estimate_evaluation(model, tok, [1, 4], tasks, max_examples=None, val_tokens=100)
    assert estimate.tokens_per_loop_count == scored + 100
    assert estimate.seconds > 0 and "tokens scored at each loop count" in estimate.describe()
    per_token = seconds_per_token(model, [1, 3, 12])
    assert 0 < per_token[1] <= per_token[3] <= per_token[12]  # a loop never costs less
    assert [format_duration(s) for s in (4.2, 600, 12_000)] == ["4 s", "10 min", "3 h 20 min"]
