"""Exact-answer evaluation on the synthetic reasoning tasks (issue 28,
`loopedlm.data.synthetic`): `loopedlm eval RUN --tasks synthetic --n-loops 1,2,4,8`.

For each held-out test set (one per hop count) and each loop count N, the accuracy of
the model's top-1 prediction at every answer position, teacher-forced on the whole
document. Loop t of a forward pass does not depend on the loops after it, so one pass at
max(N) gives the answer of every N <= max(N) (`per_loop_logits`): the accuracy at N is
that of `model(idx, n_loops=N)`. The same pass gives, per query, the first loop at which
the right answer is top-1.

With adaptive thresholds, each answer is also decoded through the decode engine's
adaptive loops (`loopedlm.infer.DecodeEngine`, `AdaptiveLoops`: a token stops looping
once its state has converged; the prompt runs every loop): the accuracy and the mean
loops spent, by hop count.

Outputs (`write_synthetic_outputs`): results.json (with `metrics["synthetic/hops=H"]
[str(N)]`, the shape `loopedlm report` reads), results.md and two figures:
synthetic_heatmap.png (accuracy, hops x loops) and synthetic_first_correct.png.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loopedlm.data.loader import read_row_group, row_groups
from loopedlm.data.synthetic import EVAL_DIR, load_config, read_synthetic_manifest
from loopedlm.infer import AdaptiveLoops, DecodeEngine, SequenceParams
from loopedlm.model.attention import norm

logger = logging.getLogger(__name__)

METRIC_PREFIX = "synthetic/hops="


@torch.no_grad()
def per_loop_logits(model: Any, idx: torch.Tensor, n_loops: int, rows: torch.Tensor,
                    cols: torch.Tensor) -> torch.Tensor:
    """(n_loops, len(rows), vocab_size): the logits at positions (rows[i], cols[i]) of `idx`
    after each loop t = 1..n_loops, equal to `model(idx, n_loops=t)[rows, cols]`. The one
    place this evaluator reads the model's per-loop outputs (`LoopedGPT.prepare`, `loop`,
    `logits`)."""
    inputs = model.prepare(idx)
    previous, out = None, []
    for loop in range(n_loops):
        previous = norm(model.loop(inputs, previous, loop))  # h^t, as in LoopedGPT.forward
        out.append(model.logits(previous[rows, cols]))
    return torch.stack(out)


def load_test_sets(data_dir: str | Path, max_docs: int | None = None
                   ) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """The data set's manifest and its test documents by hop count (`max_docs` each)."""
    manifest = read_synthetic_manifest(data_dir)
    tests: dict[int, list[str]] = {}
    for name, info in sorted(manifest["eval"].items(), key=lambda kv: kv[1]["hops"]):
        texts = [t for path, index in row_groups([Path(data_dir) / EVAL_DIR / name])
                 for t in read_row_group(path, index)]
        tests[int(info["hops"])] = texts[:max_docs] if max_docs else texts
    return manifest, tests


def _encode(tokenizer: Any, task: Any, text: str) -> tuple[list[int], list[Any]]:
    """[BOS] + the document's ids, and its queries (their `index` is the position whose
    logits predict the answer, in these ids)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    return ids, task.queries(text.split())


def _score_documents(model: Any, tokenizer: Any, task: Any, texts: Sequence[str],
                     n_loops: int, batch_size: int, device: str) -> list[dict[str, Any]]:
    """Per query: hops, guess, and top-1 correctness after each loop (a list of bools)."""
    records = []
    for start in range(0, len(texts), batch_size):
        encoded = [_encode(tokenizer, task, t) for t in texts[start:start + batch_size]]
        length = max(len(ids) for ids, _ in encoded) - 1  # the last word predicts nothing
        idx = torch.full((len(encoded), length), tokenizer.bos_id, dtype=torch.long)
        rows, cols, answers, queries = [], [], [], []
        for r, (ids, doc_queries) in enumerate(encoded):
            idx[r, :len(ids) - 1] = torch.tensor(ids[:-1])  # right padding: causal, unseen
            for q in doc_queries:
                rows.append(r)
                cols.append(q.index)
                answers.append(ids[q.index + 1])
                queries.append(q)
        if not queries:
            continue
        logits = per_loop_logits(model, idx.to(device), n_loops,
                                 torch.tensor(rows, device=device),
                                 torch.tensor(cols, device=device))
        correct = (logits.argmax(-1).cpu() == torch.tensor(answers)).T.tolist()
        records += [{"hops": q.hops, "guess": q.guess, "correct": c}
                    for q, c in zip(queries, correct, strict=True)]
    return records


@torch.no_grad()
def _adaptive_documents(model: Any, tokenizer: Any, task: Any, texts: Sequence[str],
                        n_loops: int, threshold: float, batch_size: int
                        ) -> list[dict[str, Any]]:
    """Per query: hops, whether the adaptive answer is right, and the loops it spent. Each
    document goes into its own engine slot: the words up to a query are prefilled (every
    loop), the query's word is decoded with adaptive loops (`DecodeEngine.decode`)."""
    params = SequenceParams(n_loops=n_loops, adaptive=AdaptiveLoops(threshold))
    records = []
    encoded_all = [_encode(tokenizer, task, t) for t in texts]
    longest = max(len(ids) for ids, _ in encoded_all)
    engine = DecodeEngine(model, max_batch=batch_size, max_len=longest - 1, max_loops=n_loops)
    for start in range(0, len(encoded_all), batch_size):
        batch = encoded_all[start:start + batch_size]
        engine.reset()
        done = [0] * len(batch)  # tokens of each document already in its slot
        for k in range(max(len(qs) for _, qs in batch)):
            live = [r for r, (_, qs) in enumerate(batch) if k < len(qs)]
            for r in range(len(batch)):
                if r not in live and r in engine.active_slots:
                    engine.release(r)
            if not live:
                break
            tokens = torch.zeros(max(live) + 1, dtype=torch.long)
            for r in live:
                ids, qs = batch[r]
                position = qs[k].index
                if position > done[r]:
                    engine.prefill(r, ids[done[r]:position], params)
                tokens[r] = ids[position]
                done[r] = position + 1
            bucket = next(b for b in engine.buckets if b > max(engine.active_slots))
            feed = torch.zeros(bucket, dtype=torch.long)
            feed[:len(tokens)] = tokens
            logits, spent = engine.decode(feed.to(engine.device))
            top = logits.argmax(-1).tolist()
            spent = spent.tolist()
            for r in live:
                ids, qs = batch[r]
                records.append({"hops": qs[k].hops, "correct": top[r] == ids[qs[k].index + 1],
                                "loops": spent[r]})
    return records


def evaluate_synthetic(model: Any, tokenizer: Any, data_dir: str | Path,
                       loops: Sequence[int], *, batch_size: int = 32, device: str = "cpu",
                       max_docs: int | None = None,
                       adaptive_thresholds: Sequence[float] = ()) -> dict[str, Any]:
    """Accuracy per hop count x loop count on the test sets of the synthetic data set in
    `data_dir` (module docstring); returns the dict that `write_synthetic_outputs` writes."""
    manifest, tests = load_test_sets(data_dir, max_docs)
    task = load_config(manifest).make_task()
    loops = sorted(set(loops))
    top = max(loops)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {
        "task": manifest["task"], "data_dir": str(data_dir), "loops": loops,
        "trained_hops": manifest["config"]["hops"], "hops": sorted(tests),
        "trained_loops": model.config.n_loops, "metrics": {}, "queries": {}, "guess": {},
        "curve": {}, "first_correct": {}, "never_correct": {}, "adaptive": {}}
    for hops, texts in tests.items():
        records = _score_documents(model, tokenizer, task, texts, top, batch_size, device)
        if not records:
            continue
        n = len(records)
        curve = [sum(r["correct"][t] for r in records) / n for t in range(top)]
        firsts = [next((t + 1 for t, c in enumerate(r["correct"]) if c), None) for r in records]
        reached = [f for f in firsts if f is not None]
        results["curve"][str(hops)] = curve
        results["metrics"][f"{METRIC_PREFIX}{hops}"] = {str(n_): curve[n_ - 1] for n_ in loops}
        results["queries"][str(hops)] = n
        results["guess"][str(hops)] = sum(r["guess"] for r in records) / n
        results["first_correct"][str(hops)] = (sum(reached) / len(reached)) if reached else None
        results["never_correct"][str(hops)] = 1 - len(reached) / n
        logger.info("hops=%d: %s (%d queries)", hops,
                    " ".join(f"N={n_}:{curve[n_ - 1]:.3f}" for n_ in loops), n)
    for threshold in adaptive_thresholds:
        by_hops: dict[str, Any] = {}
        for hops, texts in tests.items():
            records = _adaptive_documents(model, tokenizer, task, texts, top, threshold,
                                          batch_size)
            if records:
                by_hops[str(hops)] = {
                    "accuracy": sum(r["correct"] for r in records) / len(records),
                    "mean_loops": sum(r["loops"] for r in records) / len(records),
                    "queries": len(records)}
        results["adaptive"][f"{threshold:g}"] = by_hops
        logger.info("adaptive threshold %g: %s", threshold, ", ".join(
            f"hops={h}: {v['mean_loops']:.2f} loops, acc {v['accuracy']:.3f}"
            for h, v in by_hops.items()))
    model.train(was_training)
    return results


# ---- outputs -------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


def markdown_synthetic(results: dict[str, Any]) -> str:
    """Accuracy table (hops x loops, with the guessing baseline), first-correct loops and the
    adaptive-loop table."""
    loops, hops = results["loops"], [h for h in results["hops"] if str(h) in results["curve"]]
    lo, hi = results["trained_hops"]
    lines = [f"Task `{results['task']}`: top-1 accuracy on each held-out test set (rows: "
             f"hops; trained on {lo}-{hi}, * = beyond) at each loop count N (the model was "
             f"trained at N={results['trained_loops']}).\n",
             "| hops | queries | guess | " + " | ".join(f"N={n}" for n in loops)
             + " | first correct loop | never correct |",
             "|---|---:|---:|" + "---:|" * len(loops) + "---:|---:|"]
    for h in hops:
        metric = results["metrics"][f"{METRIC_PREFIX}{h}"]
        lines.append(f"| {h}{'*' if h > hi else ''} | {results['queries'][str(h)]} | "
                     f"{_fmt(results['guess'][str(h)])} | "
                     + " | ".join(_fmt(metric[str(n)]) for n in loops)
                     + f" | {_fmt(results['first_correct'][str(h)])} | "
                     f"{_fmt(results['never_correct'][str(h)])} |")
    out = "\n".join(lines) + "\n"
    for threshold, by_hops in results.get("adaptive", {}).items():
        out += (f"\nAdaptive loops (state change < {threshold}, at most "
                f"N={max(loops)}): accuracy and mean loops spent per answer\n\n"
                "| hops | accuracy | mean loops |\n|---|---:|---:|\n"
                + "".join(f"| {h} | {_fmt(v['accuracy'])} | {v['mean_loops']:.2f} |\n"
                          for h, v in by_hops.items()))
    return out


def plot_synthetic(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """synthetic_heatmap.png (accuracy, hops x loops) and synthetic_first_correct.png."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = [h for h in results["hops"] if str(h) in results["curve"]]
    loops = results["loops"]
    if not hops:
        raise ValueError("no test set was scored: nothing to plot")
    grid = [[results["metrics"][f"{METRIC_PREFIX}{h}"][str(n)] for n in loops] for h in hops]
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(loops), 1 + 0.4 * len(hops)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(loops)), [str(n) for n in loops])
    ax.set_yticks(range(len(hops)), [str(h) for h in hops])
    ax.set_xlabel("test-time loops N")
    ax.set_ylabel("hops")
    ax.set_title(f"{results['task']}: accuracy (%), trained at N={results['trained_loops']}, "
                 f"hops {results['trained_hops'][0]}-{results['trained_hops'][1]}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    paths = [out_dir / "synthetic_heatmap.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    firsts = [(h, results["first_correct"][str(h)]) for h in hops
              if results["first_correct"][str(h)] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h for h, _ in firsts], [f for _, f in firsts], marker="o")
    ax.plot(hops, hops, linestyle=":", color="grey", label="one loop per hop")
    ax.set_xlabel("hops")
    ax.set_ylabel("first loop with the answer top-1")
    ax.set_title("Loop at which the right answer first becomes top-1\n(mean over the queries "
                 "that reach it)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "synthetic_first_correct.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write_synthetic_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.md and the figures, into `out_dir`."""
    from loopedlm.common.files import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    atomic_write_json(paths["json"], results)
    paths["md"].write_text(markdown_synthetic(results), encoding="utf-8")
    try:
        heatmap, first = plot_synthetic(results, out_dir)
        paths.update({"heatmap": heatmap, "first_correct": first})
    except ValueError as exc:
        logger.warning("no figures: %s", exc)
    return paths


def run_synthetic_evaluation(target: Any, out_dir: str | Path, *, batch_size: int = 32,
                             max_docs: int | None = None,
                             adaptive_thresholds: Sequence[float] = ()
                             ) -> tuple[dict[str, Any], dict[str, Path]]:
    """What `loopedlm eval RUN --tasks synthetic` does once the model is loaded
    (`loopedlm.evaluate.loading.EvalTarget`): `evaluate_synthetic` on the test sets of the
    run's data folder (or --data-dir), then `write_synthetic_outputs` into `out_dir`."""
    if target.data_dir is None:
        raise ValueError(f"--tasks synthetic needs a synthetic data set: {target.folder} "
                         f"records no data folder that exists (pass --data-dir)")
    for threshold in adaptive_thresholds:
        AdaptiveLoops(threshold)  # a bad threshold fails before any evaluation
    results = evaluate_synthetic(target.model, target.tokenizer, target.data_dir, target.loops,
                                 batch_size=batch_size, device=target.device,
                                 max_docs=max_docs, adaptive_thresholds=adaptive_thresholds)
    results["checkpoint"] = str(target.folder)
    return results, write_synthetic_outputs(results, out_dir)


__all__ = ["per_loop_logits", "load_test_sets", "evaluate_synthetic", "markdown_synthetic",
           "plot_synthetic", "write_synthetic_outputs", "run_synthetic_evaluation",
           "METRIC_PREFIX"]
