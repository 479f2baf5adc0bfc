"""Budget evaluation (docs/design.md#evaluation): one checkpoint, every metric at every loop
count, in one run.

The same weights run at each `n_loops` (the forward pass takes the loop count as an
argument). The results go to `results.json`, a Markdown table `results.md`, and
`budget.png`, metric against loop count (the paper's Figure 5). A metric that fails at some
loop count is recorded under `errors` and the others carry on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loopedlm.evaluate.core import core_metric, evaluate_task
from loopedlm.evaluate.loading import EvalTarget, val_settings
from loopedlm.evaluate.perplexity import evaluate_text, evaluate_val_shard, read_wikitext
from loopedlm.evaluate.tasks import (
    CORE_TASKS,
    DOWNSTREAM_TASKS,
    EVAL_BATCH_SIZE,
    EVAL_PRESETS,
    EVAL_VAL_BATCHES,
    load_task,
    paper_alias,
)

logger = logging.getLogger(__name__)

CORE_TASK_COUNT = len(CORE_TASKS)  # 22


def parse_loops(text: str | Sequence[int]) -> list[int]:
    """"1,3,6" -> [1, 3, 6]; every loop count must be an integer >= 1."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    loops = []
    for part in parts:
        try:
            n = int(str(part).strip())
        except ValueError:
            raise ValueError(f"loop count {str(part).strip()!r} is not an integer; give a comma "
                             f"list such as 1,3,6,9,12") from None
        if n < 1:
            raise ValueError(f"loop count {n} is not allowed: loop counts must be >= 1")
        if n not in loops:
            loops.append(n)
    if not loops:
        raise ValueError(f"no loop counts in {text!r}")
    return loops


def evaluate_budget(model: Any, tokenizer: Any, loops: Sequence[int], *,
                    tasks: Sequence[str] = (), data_dir: str | Path | None = None,
                    wikitext: str | Path | None = None,
                    max_examples: int | None = EVAL_PRESETS["full"]["max_examples"],
                    val_batches: int | None = EVAL_VAL_BATCHES, batch_size: int = EVAL_BATCH_SIZE,
                    val_batch_size: int | None = None, val_seq_len: int | None = None,
                    device: str = "cpu",
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate `model` at each loop count; returns the results dict written by
    `write_budget_outputs` (metrics[name][str(n_loops)] = value). The validation split is
    read in `val_batches` batches of `val_batch_size` (default `batch_size`) x `val_seq_len`
    (default the model's) tokens."""
    loops = parse_loops(list(loops))
    say = progress or logger.info
    results: dict[str, Any] = {
        "loops": loops, "metrics": {}, "tasks": {}, "cropped": {}, "errors": [], "wall_time_s": {},
        "settings": {"tasks": list(tasks), "max_examples": max_examples,
                     "val_batches": val_batches, "batch_size": batch_size,
                     "val_batch_size": val_batch_size or batch_size, "val_seq_len": val_seq_len,
                     "data_dir": str(data_dir) if data_dir else None,
                     "wikitext": str(wikitext) if wikitext else None},
    }
    loaded = _load_tasks(tasks, results)
    text = None if wikitext is None else _read_wikitext(wikitext, results)
    start_all = time.perf_counter()
    for n in loops:
        start = time.perf_counter()
        if data_dir is not None:
            _val_metrics(results, model, tokenizer, data_dir, n, say, device=device,
                         batch_size=val_batch_size or batch_size, seq_len=val_seq_len,
                         max_batches=val_batches)
        if text is not None:
            _wikitext_metrics(results, model, tokenizer, text, n, say, batch_size=batch_size,
                              device=device)
        _task_metrics(results, model, tokenizer, loaded, n, say, max_examples=max_examples,
                      device=device)
        results["wall_time_s"][str(n)] = time.perf_counter() - start
    results["total_wall_time_s"] = time.perf_counter() - start_all
    evaluated = {t for ts in results.get("core_tasks", {}).values() for t in ts}
    # only the CORE tasks that were asked for (none with --tasks none)
    results["core_missing"] = [t for t in CORE_TASKS if t in tasks and t not in evaluated]
    return results


def _record(results: dict[str, Any], metric: str, n: int, value: float) -> None:
    results["metrics"].setdefault(metric, {})[str(n)] = value


def _record_error(results: dict[str, Any], metric: str, n: int | None,
                  exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {exc}"
    logger.warning("%s%s failed: %s", metric, "" if n is None else f" at N={n}", msg)
    results["errors"].append({"metric": metric, "n_loops": n, "error": msg})


def _load_tasks(tasks: Sequence[str], results: dict[str, Any]) -> dict[str, tuple[Any, list]]:
    """Each task's (spec, items), loaded once to be reused at every loop count."""
    loaded = {}
    for name in tasks:
        try:
            loaded[name] = load_task(name)
        except (ValueError, FileNotFoundError, OSError) as exc:
            _record_error(results, f"task/{name}", None, exc)
    return loaded


def _read_wikitext(path: str | Path, results: dict[str, Any]) -> str | None:
    """The WikiText text, or None with why it could not be read recorded."""
    try:
        return read_wikitext(path)
    except (ValueError, FileNotFoundError) as exc:
        _record_error(results, "wikitext", None, exc)
        return None


def _val_metrics(results: dict[str, Any], model: Any, tokenizer: Any, data_dir: str | Path,
                 n: int, say: Callable[[str], None], **settings: Any) -> None:
    """val_bpb, val_ppl and val_tokens at N=n, from the validation shard of `data_dir`."""
    try:
        val = evaluate_val_shard(model, tokenizer, data_dir, n_loops=n, **settings)
        _record(results, "val_bpb", n, val["bpb"])
        _record(results, "val_ppl", n, val["ppl"])
        _record(results, "val_tokens", n, val["tokens"])
        say(f"N={n} val_bpb={val['bpb']:.4f} val_ppl={val['ppl']:.2f} "
            f"({val['tokens']} tokens)")
    except Exception as exc:  # noqa: BLE001 - one metric must not lose the others
        _record_error(results, "val", n, exc)


def _wikitext_metrics(results: dict[str, Any], model: Any, tokenizer: Any, text: str, n: int,
                      say: Callable[[str], None], **settings: Any) -> None:
    """wikitext_ppl and wikitext_bpb at N=n."""
    try:
        wt = evaluate_text(model, tokenizer, text, n_loops=n, **settings)
        _record(results, "wikitext_ppl", n, wt["ppl"])
        _record(results, "wikitext_bpb", n, wt["bpb"])
        say(f"N={n} wikitext_ppl={wt['ppl']:.2f}")
    except Exception as exc:  # noqa: BLE001
        _record_error(results, "wikitext", n, exc)


def _task_metrics(results: dict[str, Any], model: Any, tokenizer: Any,
                  loaded: dict[str, tuple[Any, list]], n: int, say: Callable[[str], None],
                  **settings: Any) -> None:
    """Each task's accuracy at N=n, and CORE over the CORE tasks among them."""
    task_results = {}
    for name, (spec, items) in loaded.items():
        try:
            r = evaluate_task(model, tokenizer, spec, items, n_loops=n, **settings)
            task_results[name] = r
            results["tasks"].setdefault(name, {})[str(n)] = r
            _record(results, f"acc/{name}", n, r["accuracy"])
            if r.get("truncated"):  # prompts longer than the RoPE table (the same at every N)
                results["cropped"][name] = {"examples": r["truncated"], "n": r["n"],
                                            "max_len": r.get("max_len")}
            say(f"N={n} {name}: acc={r['accuracy']:.4f} ({r['n']} examples)")
        except Exception as exc:  # noqa: BLE001
            _record_error(results, f"task/{name}", n, exc)
    core_results = {k: v for k, v in task_results.items() if k in CORE_TASKS}
    if core_results:
        _record(results, "core", n, core_metric(core_results))
        results.setdefault("core_tasks", {})[str(n)] = sorted(core_results)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _label(metric: str, results: dict[str, Any]) -> str:
    if metric == "core":
        counts = {len(v) for v in results.get("core_tasks", {}).values()}
        k = max(counts) if counts else 0
        return f"CORE ({k}/{CORE_TASK_COUNT} tasks present)" if k < CORE_TASK_COUNT else "CORE"
    if metric.startswith("acc/"):
        name = metric[4:]
        alias = paper_alias(name)
        return f"{name} acc" + (f" (paper: {alias})" if alias and alias != name else "")
    return metric


def _ordered_metrics(results: dict[str, Any]) -> list[str]:
    metrics = list(results["metrics"])
    head = [m for m in ("val_bpb", "val_ppl", "wikitext_ppl", "wikitext_bpb", "core")
            if m in metrics]
    downstream = [f"acc/{t}" for t in DOWNSTREAM_TASKS.values() if f"acc/{t}" in metrics]
    return head + downstream + [m for m in metrics if m not in head and m not in downstream]


def markdown_table(results: dict[str, Any]) -> str:
    """Metrics as rows, loop counts as columns."""
    loops = results["loops"]
    lines = ["| metric | " + " | ".join(f"N={n}" for n in loops) + " |",
             "|---|" + "---:|" * len(loops)]
    for metric in _ordered_metrics(results):
        values = results["metrics"][metric]
        lines.append(f"| {_label(metric, results)} | "
                     + " | ".join(_fmt(values.get(str(n))) for n in loops) + " |")
    out = "\n".join(lines) + "\n"
    if results.get("core_missing"):
        out += f"\nCORE tasks not evaluated: {', '.join(results['core_missing'])}\n"
    if results.get("tasks"):
        cropped = results.get("cropped") or {}
        out += ("\nPrompts cropped on the left (longer than the RoPE table): "
                + (", ".join(f"{name} {c['examples']}/{c['n']} examples (> {c['max_len']} tokens)"
                             for name, c in cropped.items()) or "none") + "\n")
    if results.get("errors"):
        out += "\nErrors:\n" + "".join(
            f"- {e['metric']}" + (f" (N={e['n_loops']})" if e["n_loops"] is not None else "")
            + f": {e['error']}\n" for e in results["errors"])
    times = results.get("wall_time_s", {})
    if times:
        out += "\nWall time (s): " + ", ".join(f"N={n}: {t:.1f}" for n, t in times.items()) + "\n"
    return out


def plot_budget(results: dict[str, Any], path: str | Path) -> Path:
    """One panel per metric, value against loop count (the paper's Figure 5)."""
    # matplotlib logs "generated new fontManager" at INFO when it builds its font cache:
    # keep that out of the evaluation's output
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _ordered_metrics(results)
    if not metrics:
        raise ValueError("no metric to plot: every metric failed or none was asked for")
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        values = results["metrics"][metric]
        xs = [n for n in results["loops"] if str(n) in values]
        ax.plot(xs, [values[str(n)] for n in xs], marker="o")
        ax.set_title(_label(metric, results), fontsize=9)
        ax.set_xlabel("loops N")
        ax.set_xticks(results["loops"])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_budget_evaluation(target: EvalTarget, out_dir: str | Path, *, tasks: Sequence[str],
                          wikitext: str | Path | None, max_examples: int | None,
                          batch_size: int | None, val_batches: int | None
                          ) -> tuple[dict[str, Any], dict[str, Path]]:
    """What `loopedlm eval` does once the model is loaded: `evaluate_budget` of the target
    (validation read as its run's own evaluation did, see `val_settings`), then
    `write_budget_outputs` into `out_dir`. Returns the results and the written paths."""
    results = evaluate_budget(target.model, target.tokenizer, target.loops, tasks=tasks,
                              data_dir=target.data_dir, wikitext=wikitext,
                              max_examples=max_examples, device=target.device,
                              **val_settings(target.meta, target.model, batch_size, val_batches))
    results["checkpoint"] = str(target.folder)
    return results, write_budget_outputs(results, out_dir)


def write_budget_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and budget.png into `out_dir`."""
    from loopedlm.common.files import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md",
             "png": out_dir / "budget.png"}
    atomic_write_json(paths["json"], results)
    paths["md"].write_text(markdown_table(results), encoding="utf-8")
    try:
        plot_budget(results, paths["png"])
    except ValueError as exc:
        logger.warning("no plot: %s", exc)
        del paths["png"]
    return paths
