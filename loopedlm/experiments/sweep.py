"""`loopedlm sweep SWEEP.toml`: run a grid of training runs (and their evaluations), resumably.

A sweep file names a base training recipe, settings shared by every run, a grid
(Cartesian product) and/or an explicit list of runs, and seeds:

    [sweep]
    experiment = "loop_scaling"     # which report section draws it (see loopedlm.experiments.report)
    recipe = "tiny"                 # base training recipe (recipes/NAME.toml or a path)
    seeds = [0]
    [train]                         # settings for every run (same keys as `loopedlm train`)
    steps = 200
    [grid]                          # every combination becomes a run
    "model.loop_mode" = ["lt", "lti", "ltai", "flt"]
    "model.n_loops" = [3, 6, 9]
    [[runs]]                        # and/or explicit runs
    "model.loop_mode" = "flt_res"
    # [[grid]] (several tables) gives several grids, run in order. A grid or run that
    # sets `seed` itself runs with those seeds instead of [sweep] seeds.
    [eval]                          # optional: evaluate each finished run
    loops = [1, 3, 6]               # or "trained" (the run's own loop count)
    args = ["--tasks", "none"]      # extra `loopedlm eval` arguments

Train settings on the command line (`loopedlm sweep SWEEP --steps=2 --model.n_loops=2`,
the `--key=value` syntax of `loopedlm train`) apply to every run: above the sweep's
[train] section and the recipe, below what a grid or run sets (a grid's values define
its runs and their names, so they always win). `--steps=2` thus gives a smoke run of a
whole sweep. `run_dir`, `resume` and `seed` belong to the sweep and cannot be set so.
The settings are part of the manifest's command, not of the run names: a finished run
is skipped even when the settings have changed since (use another --out).

Each run lives in SWEEP_DIR/<name>/ and is skipped when it has finished; an interrupted
run resumes from its last checkpoint. Runs execute as subprocesses so that one failure
does not stop the sweep: it is recorded in SWEEP_DIR/sweep.json. `--in-process` trains
in the sweep's own process instead, which saves the ~5 s of Python and torch start-up
per run that dominates a grid of tiny CPU runs (an exception still fails only its run).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopedlm.common.files import atomic_write_json
from loopedlm.common.overrides import flatten, parse_overrides
from loopedlm.common.paths import RECIPE_DIRS
from loopedlm.common.validation import ConfigError
from loopedlm.model.checkpoint import latest_training_checkpoint
from loopedlm.train.config import (
    SECTIONS,
    SHORTHANDS,
    build_config,
    check_setting_names,
    parse_train_args,
)
from loopedlm.train.trainer import FAILURE_EXIT_CODES, train

log = logging.getLogger(__name__)

SWEEP_SECTIONS = {"sweep", "train", "grid", "runs", "eval"}
# train settings a sweep sets for each run itself
SWEEP_OWNED_SETTINGS = ("run_dir", "resume", "seed")
SWEEP_KEYS = {"experiment", "recipe", "seeds", "name", "description"}
EVAL_KEYS = {"loops", "args"}


@dataclass
class RunSpec:
    """One training run of a sweep: its folder name and its `--key=value` settings."""

    name: str
    settings: dict[str, Any]

    def train_args(self) -> list[str]:
        return [f"--{k}={_format(v)}" for k, v in self.settings.items()]


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # TOML basic string: the train parser reads it back exactly
    return json.dumps(value)


def _short(key: str) -> str:
    return key.rpartition(".")[2]


@dataclass
class Sweep:
    path: Path
    experiment: str = "custom"
    recipe: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0])
    train: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, from the command line

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        path = _find_sweep(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
        unknown = set(data) - SWEEP_SECTIONS
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: "
                             f"{sorted(SWEEP_SECTIONS)}")
        head = data.get("sweep", {})
        if set(head) - SWEEP_KEYS:
            raise ValueError(f"{path}: unknown [sweep] key(s) {sorted(set(head) - SWEEP_KEYS)}; "
                             f"allowed: {sorted(SWEEP_KEYS)}")
        if set(data.get("eval", {})) - EVAL_KEYS:
            raise ValueError(f"{path}: unknown [eval] key(s) "
                             f"{sorted(set(data['eval']) - EVAL_KEYS)}; allowed: {sorted(EVAL_KEYS)}")
        grids = data.get("grid", {})
        for grid in grids if isinstance(grids, list) else [grids]:
            for key, values in grid.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{path}: grid[{key!r}]={values!r} must be a non-empty "
                                     "list")
        seeds = head.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"{path}: seeds={seeds!r} must be a non-empty list of integers")
        recipe = head.get("recipe", "tiny")
        if not Path(recipe).is_absolute() and (path.parent / recipe).is_file():
            recipe = str((path.parent / recipe).resolve())
        return cls(path=path, experiment=head.get("experiment", "custom"), recipe=recipe,
                   seeds=seeds, train=data.get("train", {}), grid=data.get("grid", {}),
                   runs=data.get("runs", []), eval=data.get("eval", {}),
                   description=head.get("description", ""))

    def expand(self) -> list[RunSpec]:
        """Every run: (grid products + explicit runs) x seeds, in a stable order; a variant
        that sets its own `seed` is not repeated over [sweep] seeds."""
        variants: list[dict[str, Any]] = []
        for grid in self.grid if isinstance(self.grid, list) else [self.grid]:
            if grid:
                variants += [dict(zip(grid, combo, strict=True))
                             for combo in itertools.product(*grid.values())]
        variants += [dict(run) for run in self.runs]
        if not variants:
            variants = [{}]
        specs, seen = [], set()
        for variant in variants:
            seeds = [variant.pop("seed")] if "seed" in variant else self.seeds
            for seed in seeds:
                parts = [f"{_short(k)}={v}" for k, v in variant.items()]
                name = ",".join(parts + [f"seed={seed}"])
                if name in seen:
                    continue
                seen.add(name)
                specs.append(RunSpec(name, {**self.train, **self.overrides, **variant,
                                            "seed": seed}))
        return specs


def train_overrides(settings: Sequence[str]) -> dict[str, Any]:
    """`--key=value` train settings (the syntax of `loopedlm train`) -> the dotted keys of
    `Sweep.overrides`; a ConfigError names an unknown setting or one the sweep owns."""
    _, nested = parse_overrides(settings, sections=tuple(SECTIONS), shorthands=SHORTHANDS)
    check_setting_names(nested)
    flat = flatten(nested)
    for key in flat:
        if key in SWEEP_OWNED_SETTINGS:
            raise ConfigError(f"--{key} is set by the sweep for each run: not allowed here "
                              "(seeds: [sweep] seeds; folders: --out)")
    return flat


def _find_sweep(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = RECIPE_DIRS[0] / "sweeps" / f"{path}.toml"
    if named.is_file():
        return named
    raise FileNotFoundError(f"sweep file {path} does not exist (nor recipes/sweeps/{path}.toml)")


def run_finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    try:
        return json.loads(summary.read_text()).get("status") in ("completed", "collapsed")
    except json.JSONDecodeError:
        return False


def _run(cmd: list[str], log_file: Path) -> int:
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)


def _train_in_process(cmd: list[str], log_file: Path) -> int:
    """`loopedlm train` of `cmd` in this process, its logs into `log_file`; returns the
    exit code the command would give."""
    root = logging.getLogger()
    saved = root.handlers[:]
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}  (in process)\n")
        f.flush()
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.handlers = [handler]
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                recipe, overrides = parse_train_args(cmd[cmd.index("train") + 1:])
                train(build_config(recipe, overrides))
            return 0
        except tuple(FAILURE_EXIT_CODES) as exc:
            log.error("training stopped: %s", exc)
            return FAILURE_EXIT_CODES[type(exc)]
        except Exception:  # one run's failure is recorded, not fatal to the sweep
            log.exception("training failed")
            return 1
        finally:
            root.handlers = saved


def run_sweep(sweep: Sweep, out_dir: str | Path, *, dry_run: bool = False,
              only: str | None = None, in_process: bool = False) -> list[dict[str, Any]]:
    """Run every not-yet-finished run of the sweep; returns a status row per run.
    `in_process` trains in this process rather than in a subprocess per run. The manifest
    (SWEEP_DIR/sweep.json) lists every run from the start ("pending" until reached), so a
    report of a sweep cut short still sees every finished run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    specs = [s for s in sweep.expand() if only is None or only in s.name]
    for spec in specs:
        run_dir = out_dir / spec.name
        train_cmd = [sys.executable, "-m", "loopedlm", "train", sweep.recipe,
                     f"--run_dir={_format(str(run_dir))}", "--progress=false", *spec.train_args()]
        if latest_training_checkpoint(run_dir) is not None:
            # continue from the last checkpoint; a run killed before its first one restarts
            train_cmd.append("--resume=true")
        rows.append({"name": spec.name, "settings": spec.settings, "train_cmd": train_cmd,
                     "eval_cmd": _eval_command(sweep, spec, run_dir),
                     "status": "planned" if dry_run else "pending"})
    if dry_run:
        return rows
    flags = " --in-process" if in_process else ""
    _write_manifest(sweep, out_dir, rows, flags)
    for i, (spec, row) in enumerate(zip(specs, rows, strict=True), 1):
        run_dir, train_cmd, eval_cmd = out_dir / spec.name, row["train_cmd"], row["eval_cmd"]
        t0 = time.time()
        if run_finished(run_dir):
            row["status"] = "skipped (finished)"
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            log.info("[%d/%d] training %s", i, len(specs), spec.name)
            code = (_train_in_process if in_process else _run)(train_cmd,
                                                                out_dir / f"{spec.name}.log")
            summary = run_dir / "summary.json"
            # a collapse is a result of the experiment, not a failure of the sweep
            row["status"] = (json.loads(summary.read_text())["status"] if run_finished(run_dir)
                             else f"failed ({code})")
        if eval_cmd and run_finished(run_dir) and not (run_dir / "eval" / "results.json").exists():
            log.info("[%d/%d] evaluating %s", i, len(specs), spec.name)
            code = _run(eval_cmd, out_dir / f"{spec.name}.log")
            row["eval_status"] = "evaluated" if code == 0 else f"eval failed ({code})"
        row["seconds"] = round(time.time() - t0, 1)
        _write_manifest(sweep, out_dir, rows, flags)
    return rows


def _eval_command(sweep: Sweep, spec: RunSpec, run_dir: Path) -> list[str] | None:
    if not sweep.eval:
        return None
    loops = sweep.eval.get("loops", "trained")
    if loops == "trained":
        trained = spec.settings.get("model.n_loops")
        loops = [trained] if trained is not None else None
    cmd = [sys.executable, "-m", "loopedlm", "eval", str(run_dir), "--out", str(run_dir / "eval")]
    if loops:
        cmd += ["--n-loops", ",".join(str(n) for n in loops)]
    return cmd + [str(a) for a in sweep.eval.get("args", [])]


def _write_manifest(sweep: Sweep, out_dir: Path, rows: list[dict[str, Any]],
                    flags: str = "") -> None:
    settings = "".join(f" --{k}={_format(v)}" for k, v in sweep.overrides.items())
    manifest = {"sweep_file": str(sweep.path.resolve()), "experiment": sweep.experiment,
                "description": sweep.description, "recipe": sweep.recipe,
                "command": f"loopedlm sweep {sweep.path} --out {out_dir}{flags}{settings}",
                "runs": rows}
    atomic_write_json(out_dir / "sweep.json", manifest)


__all__ = ["RunSpec", "Sweep", "train_overrides", "run_finished", "run_sweep"]
