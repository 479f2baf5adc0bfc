"""Fetching files: one release file of a pinned PyPI distribution (with pip, hash-checked,
its failures in one line) and a Parquet shard over HTTP (atomic, retried)."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from loopedlm.common.files import sha256_file
from loopedlm.data.loader import open_shard

logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download that failed: one line naming the package or file and what to do."""


class PackageUnavailable(DownloadError):
    """The package index has no such release (pip found the index, not the version)."""


def pip_download(requirement: str, filename: str, sha256: str, cache_dir: Path, *,
                 sdist: bool) -> Path:
    """`cache_dir/filename`: one release file of a pinned PyPI distribution, downloaded
    with pip (`--require-hashes`, no dependencies, nothing installed) unless a file with
    that sha256 is already there. pip, not a file URL: the user's index and mirror
    configuration (`pip config list`) then apply.

    The file is downloaded into a temporary folder beside its target and renamed there only
    once its sha256 is the pinned one. Raises PackageUnavailable when the index has no such
    release, DownloadError for any other failure (the index unreachable, a hash mismatch, a
    full disk, an interrupted download), each with a one-line message.
    """
    target = Path(cache_dir) / filename
    if target.exists() and sha256_file(target) == sha256:
        return target
    # a folder that cannot be made is a path the user gave (or LOOPEDLM_HOME): the CLI's
    # one line for an unusable path (exit 2), not a failed download
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-download-") as tmp:
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
            kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
                   "--require-hashes", "--disable-pip-version-check", "-r", str(requirements),
                   "-d", tmp, "--quiet"]
            logger.info("downloading %s with pip", requirement)
            result = subprocess.run(cmd, capture_output=True, text=True)
            files = list(Path(tmp).glob(filename))
            if result.returncode != 0 or not files:
                raise pip_failure(requirement, result.stderr)
            actual = sha256_file(files[0])
            if actual != sha256:  # pip checked it too; a file must never take the name unchecked
                raise DownloadError(_hash_message(requirement, actual, sha256))
            os.replace(files[0], target)
    except OSError as exc:
        raise DownloadError(f"could not write {requirement} into {target.parent}: "
                            f"{_os_error(exc)}") from None
    return target


def pip_failure(requirement: str, stderr: str) -> DownloadError:
    """The one-line error for a failed `pip download` of `requirement`, from pip's stderr
    (pip's own messages span many lines, and this machine's pip configuration may add
    warnings that say nothing about the failure)."""
    lines = [line.strip() for line in stderr.splitlines()
             if line.strip() and "is ignored" not in line]
    text = "\n".join(lines)
    if "No space left on device" in text or "Errno 28" in text:
        return DownloadError(f"no space left on device while downloading {requirement}: free "
                             f"space (in the cache folder and in TMPDIR) and run again")
    if "DO NOT MATCH THE HASHES" in text:
        got = re.search(r"Got\s+([0-9a-f]{64})", text)
        expected = re.search(r"Expected sha256\s+([0-9a-f]{64})", text)
        return DownloadError(_hash_message(requirement, got.group(1) if got else "?",
                                           expected.group(1) if expected else "?"))
    if re.search(r"NewConnectionError|Failed to establish|Name or service not known|"
                 r"Temporary failure in name resolution|ProxyError|timed out|"
                 r"Network is unreachable", text):
        return DownloadError(f"pip could not reach the package index for {requirement}: "
                             f"check the network and the index in `pip config list`, then "
                             f"run again")
    if re.search(r"IncompleteRead|Connection broken|ConnectionResetError", text):
        return DownloadError(f"the download of {requirement} was interrupted: run again")
    missing = re.search(r"Could not find a version .*\(from versions: ([^)]*)\)", text)
    if missing:
        versions = missing.group(1).strip()
        offered = ("it has no release of that package" if versions in ("", "none")
                   else f"it offers {versions} only")
        return PackageUnavailable(f"{requirement} is not on the package index ({offered})")
    errors = [line for line in lines if line.startswith("ERROR:")]
    last = (errors or lines or ["pip exited with an error"])[-1].removeprefix("ERROR:").strip()
    return DownloadError(f"pip could not download {requirement}: {last[:300]} (`pip download "
                         f"--no-deps {requirement}` shows pip's whole output)")


def _hash_message(requirement: str, actual: str, pinned: str) -> str:
    return (f"the downloaded {requirement} file has sha256 {actual[:16]}..., not the pinned "
            f"{pinned[:16]}...: an interrupted download or a different file; run again, and if "
            f"it persists check the index or mirror in `pip config list`")


def _os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device: free space and run again"
    return exc.strerror or str(exc)


def download_shard(url: str, target: Path, *, retries: int = 3, timeout: float = 60.0) -> Path:
    """Download the Parquet shard at `url` to `target` atomically (a `.part` file renamed
    when complete and readable as a shard with a text column)."""
    part = target.with_name(target.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
                expected = response.headers.get("Content-Length")
                shutil.copyfileobj(response, f, length=1 << 20)
            size = part.stat().st_size
            if expected is not None and size != int(expected):
                raise OSError(f"got {size} bytes of {expected}")
            open_shard(part)  # a corrupt or text-less file never takes the final name
            os.replace(part, target)
            return target
        except urllib.error.HTTPError as exc:
            part.unlink(missing_ok=True)
            if exc.code in (401, 403, 404):  # not transient: say which file
                raise ValueError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            part.unlink(missing_ok=True)
            error = exc
        if attempt < retries:
            logger.warning("download of %s failed (%s); retrying", url, error)
            time.sleep(min(2 ** attempt, 30) * 0.5)
    raise RuntimeError(f"could not download {url} after {retries} attempts: {error}")


__all__ = ["DownloadError", "PackageUnavailable", "pip_download", "pip_failure",
           "download_shard"]
