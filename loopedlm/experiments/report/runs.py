"""Reading a sweep: its manifest, and each run's settings, summary, log and evaluation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from loopedlm.train.run_log import read_log


def load_runs(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep's manifest (sweep.json) and one dict per run: name, settings, dir,
    summary, eval (None when absent) and log records."""
    manifest_path = sweep_dir / "sweep.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} does not exist: run `loopedlm sweep` first")
    manifest = json.loads(manifest_path.read_text())
    runs = []
    for row in manifest["runs"]:
        run_dir = sweep_dir / row["name"]
        run = {"name": row["name"], "settings": row["settings"], "dir": run_dir,
               "summary": _read_json(run_dir / "summary.json"),
               "eval": _read_json(run_dir / "eval" / "results.json"), "log": []}
        if (run_dir / "log.jsonl").exists():
            run["log"] = read_log(run_dir)
        runs.append(run)
    return manifest, runs


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def setting(run: dict[str, Any], key: str, default: Any = None) -> Any:
    """A run's value for `key` (e.g. 'model.n_loops'), falling back to its saved config."""
    if key in run["settings"]:
        return run["settings"][key]
    config = _read_json(run["dir"] / "config.json") or {}
    section, _, leaf = key.rpartition(".")
    node = config.get("train", config)
    if section:
        node = node.get(section, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and leaf in node:
        return node[leaf]
    if section == "model":
        model = config.get("model", {})
        return model.get(leaf, default)
    return default


def group_key(run: dict[str, Any]) -> tuple:
    """The run's settings except its seed: runs with equal keys are seeds of one setting."""
    return tuple(sorted((k, json.dumps(v)) for k, v in run["settings"].items() if k != "seed"))


def seed_groups(runs: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Runs grouped by `group_key`, in the order each group first appears."""
    groups: dict[tuple, list] = defaultdict(list)
    for run in runs:
        groups[group_key(run)].append(run)
    return groups


def label(run: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k.rpartition('.')[2]}={setting(run, k)}" for k in keys)


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["settings"] if k != "seed"})
    return [k for k in keys if len({json.dumps(r["settings"].get(k)) for r in runs}) > 1]


def val_bpb(run: dict[str, Any]) -> float | None:
    s = run["summary"]
    if s and s.get("status") == "completed" and s.get("val_bpb") is not None:
        return float(s["val_bpb"])
    return None


def collapsed(run: dict[str, Any]) -> bool:
    s = run["summary"] or {}
    return s.get("status") == "collapsed" or (s.get("collapse") or {}).get("status") not in (
        None, "ok", "stable")


def eval_metric(run: dict[str, Any], n_loops: int, metric: str) -> float | None:
    """A metric of eval/results.json (`metrics[name][str(n_loops)]`) or None if absent."""
    value = ((run["eval"] or {}).get("metrics", {}).get(metric) or {}).get(str(n_loops))
    return float(value) if isinstance(value, int | float) else None


def eval_loops(run: dict[str, Any]) -> list[int]:
    return sorted((run["eval"] or {}).get("loops", []))


def eval_metric_names(runs: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for metric in (run["eval"] or {}).get("metrics", {}):
            if metric not in names:
                names.append(metric)
    return names
