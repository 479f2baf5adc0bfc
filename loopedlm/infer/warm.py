"""Compiled decode steps kept across runs (docs/design.md#decoding): which step variants this
machine has packaged or compiled before, whether compiling one pays, and the process that
builds one for the next run: an AOTInductor package (`loopedlm.infer.packaged`, the first
choice: it loads in milliseconds) or, where a package cannot be built, torch.compile's
on-disk caches.

On a CPU the compiled decode step (inductor's C++ wrapper) runs about three times as fast as
the eager one, but compiling it costs 40-70 s with cold caches and about 4-10 s once
torch.compile's on-disk caches hold it (`benchmarks/bench_decode.py --sections compile`).
So the engine's `compile="auto"` on a CPU:

- compiles a step variant (at once, in the step that finds it pays: seconds) only when
  its compile is warm on disk (a marker written here says so) and the steps still to run
  repay it (`compile_pays`);
- otherwise, once a variant has run `AUTO_COMPILE_AFTER` steps, has a separate process at
  low priority compile it into the on-disk caches (`loopedlm.infer.engine.warm_main`), so
  that later runs find it warm. A process, not a thread: a compile holds the GIL for most
  of its time, and a cold one on a worker thread slowed decoding in the same process 30x.

`LOOPEDLM_COMPILE_WARMUP=0` turns the warming process off. The markers live beside the
caches they describe (`$TORCHINDUCTOR_CACHE_DIR/loopedlm_warm`), so clearing the caches
clears them too. A warming process first deletes the packages and markers that no run has
built or loaded for 30 days (`prune`): each change to loopedlm's source makes a new set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopedlm.common.paths import use_compile_cache

log = logging.getLogger(__name__)

WARMUP_ENV = "LOOPEDLM_COMPILE_WARMUP"
# a compiled step's time as a share of the eager one's (bench_decode.py, tiny preset, one
# thread, the C++ wrapper: 0.30-0.35 at N=12, 0.26-0.38 at N=1), taken at the high end so
# that a compile is not started where it would barely pay
COMPILED_SHARE = 0.4
# a warm compile's seconds until one has been measured on this machine (5-10 s measured)
DEFAULT_WARM_SECONDS = 10.0
# the warming process: `loopedlm.infer.engine.warm_main` (the engine compiles; this module,
# which the engine imports, only names it)
PROCESS = "import sys; from loopedlm.infer.engine import warm_main; sys.exit(warm_main())"
# a lock older than this belongs to a warming process that died: it may be taken over
STALE_LOCK_SECONDS = 3600.0
# a package, marker or log not built, loaded or written for this long is deleted by the next
# warming process (`prune`): every change to loopedlm's source or torch makes a new set
PRUNE_AFTER_SECONDS = 30 * 24 * 3600.0


def compile_pays(steps: float, eager_seconds: float, compile_seconds: float) -> bool:
    """Whether compiling a step variant pays: `steps` more steps of it, `eager_seconds` each
    eagerly, would save more than the compile's `compile_seconds` (a compiled step taking
    COMPILED_SHARE of an eager one)."""
    return steps * eager_seconds * (1.0 - COMPILED_SHARE) > compile_seconds


@functools.cache
def source_digest() -> str:
    """A digest of loopedlm's source: the compiled graph follows from it, so a marker written
    by other code says nothing."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class WarmSpec:
    """What a process needs to compile one step variant of an engine: the model's shape (its
    config; the weights do not matter to a compile), the engine's settings and the variant
    (`StepKey` fields, the key length 0: a dynamic size)."""

    config: dict[str, Any]
    dtype: str
    max_batch: int
    max_loops: int
    cache_slots: int | None
    slot_policy: str
    share_first_layer: bool
    variant: dict[str, Any]
    compile_options: dict[str, Any] = field(default_factory=dict)
    short_len: bool = False  # max_len 1: a size torch.compile specializes
    # an AOTInductor package (`loopedlm.infer.packaged`) rather than torch.compile's caches:
    # built for the engine's cache length and its inputs' exact shapes
    package: bool = False
    max_len: int | None = None
    shapes: list[list[int]] | None = None

    def signature(self) -> str:
        """The marker's name: this spec, the torch version, loopedlm's source and the CPU's
        kind (a package built for AVX-512 must not be loaded where only AVX2 runs, by a
        LOOPEDLM_HOME shared between machines)."""
        import torch

        text = json.dumps({"spec": dataclasses.asdict(self), "torch": torch.__version__,
                           "source": source_digest(), "machine": platform.machine(),
                           "cpu": torch.backends.cpu.get_cpu_capability()},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> WarmSpec:
        return cls(**json.loads(text))


def markers_dir() -> Path:
    return use_compile_cache() / "loopedlm_warm"


def package_path(spec: WarmSpec) -> Path:
    """Where the package of a `spec.package` spec lives (beside its marker)."""
    return markers_dir() / f"{spec.signature()}.pt2"


def package_state(spec: WarmSpec) -> str | None:
    """A package spec's state on this machine: "ready" (built and on disk), "failed" (its
    build failed here: the step runs without one), or None (never built)."""
    try:
        failed = json.loads((markers_dir() / f"{spec.signature()}.json").read_text()).get("failed")
    except (OSError, ValueError, AttributeError):
        return None
    if failed:
        return "failed"
    return "ready" if package_path(spec).is_file() else None


def warm_seconds(spec: WarmSpec) -> float | None:
    """The seconds a compile of `spec` takes with warm caches, if this machine compiled it
    before (DEFAULT_WARM_SECONDS until one was measured); None if it did not."""
    path = markers_dir() / f"{spec.signature()}.json"
    try:
        seconds = json.loads(path.read_text()).get("warm_seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return DEFAULT_WARM_SECONDS if not isinstance(seconds, int | float) else float(seconds)


def record(spec: WarmSpec, warm_seconds: float | None = None, failed: bool = False) -> None:
    """Mark `spec` compiled on this machine (with a warm compile's seconds, once measured), or
    its compile `failed`; written to a temporary file and renamed, so a reader never sees
    half a marker."""
    folder = markers_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.signature()}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"warm_seconds": warm_seconds, "failed": failed,
                               "spec": dataclasses.asdict(spec),
                               "written": time.time()}, default=str))
    os.replace(tmp, path)


def prune(max_age: float = PRUNE_AFTER_SECONDS, now: float | None = None) -> int:
    """Delete what this folder holds of the variants none of whose files (the package, its
    marker, the warming log) was written or used for `max_age` seconds (a package's time is
    touched each time one is loaded: `touch`); a lock is left alone. The files deleted.
    Never raises: a file another process removes or holds is skipped."""
    now = time.time() if now is None else now
    newest: dict[str, float] = {}
    files: dict[str, list[Path]] = {}
    try:
        for path in markers_dir().iterdir():
            if path.suffix in (".pt2", ".json", ".log") and ".tmp" not in path.name:
                stem = path.name.split(".")[0]
                with contextlib.suppress(OSError):
                    newest[stem] = max(newest.get(stem, 0.0), path.stat().st_mtime)
                    files.setdefault(stem, []).append(path)
    except OSError:
        return 0
    deleted = 0
    for stem, paths in files.items():
        if now - newest[stem] > max_age:
            for path in paths:
                with contextlib.suppress(OSError):
                    path.unlink()
                    deleted += 1
    return deleted


def touch(path: Path) -> None:
    """Mark a package used now (what `prune` keeps); never raises."""
    with contextlib.suppress(OSError):
        os.utime(path)


def warming_enabled() -> bool:
    return os.environ.get(WARMUP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def start_warming(spec: WarmSpec) -> bool:
    """Start a low-priority process that compiles `spec` into the on-disk caches, unless
    warming is off (LOOPEDLM_COMPILE_WARMUP=0), the spec is warm already or a process is
    warming it or another spec. Whether one was started. Never raises: decoding goes on."""
    if not warming_enabled() or warm_seconds(spec) is not None:
        return False
    folder = markers_dir()
    lock = folder / f"{spec.signature()}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # one warming process at a time on a machine (a server has many step variants): the
        # engine asks again every AUTO_COMPILE_AFTER steps, so the next one starts later
        if any(time.time() - other.stat().st_mtime < STALE_LOCK_SECONDS
               for other in folder.glob("*.lock") if other != lock):
            return False
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.time() - lock.stat().st_mtime < STALE_LOCK_SECONDS:
                return False
            lock.unlink(missing_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(folder / f"{spec.signature()}.log", "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-c", PROCESS, str(lock)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        assert process.stdin is not None
        process.stdin.write(spec.to_json().encode())
        process.stdin.close()
    except (OSError, ValueError) as error:
        log.info("decode engine: could not start the compile-warming process: %s", error)
        lock.unlink(missing_ok=True)
        return False
    log.info("decode engine: compiling a decode step for later runs in a background process "
             "(pid %d, low priority; %s=0 turns this off)", process.pid, WARMUP_ENV)
    return True
