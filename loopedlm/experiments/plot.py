"""The paper's diagnostic figures (section 3) from runs' `log.jsonl`, several runs
overlaid: training loss (and validation bits-per-byte), the residual-state norm of each
loop, and the gradient norms, against step. Every collapse event of a run (those its log
recorded and those the detector finds when it replays the log) is marked on every figure
as a dotted line in the run's colour, labelled with the rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loopedlm.train.collapse import CollapseThresholds, replay_log
from loopedlm.train.run_log import read_log

GRAD_KEYS = ("grad_norm/first_mlp", "grad_norm/lm_head", "grad_norm/middle_mlp",
             "grad_norm/middle_attn")

# run -> its log records
Logs = dict[Path, list[dict[str, Any]]]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [s for s, _ in rows], [v for _, v in rows]


def _label(run: Path) -> str:
    return run.name if run.name not in ("", ".") else str(run.resolve().name)


def collapse_events(run: str | Path, records: list[dict[str, Any]] | None = None
                    ) -> list[dict[str, Any]]:
    """The collapse events of a run: those its log recorded, and those the detector finds
    when it replays the log now (with the run's own thresholds from RUN/config.json if
    present), so a log written before a rule existed is still checked by it. Sorted by
    step, one per (step, kind)."""
    run = Path(run)
    records = read_log(run) if records is None else records
    thresholds = CollapseThresholds()
    config = run / "config.json"
    if run.is_dir() and config.exists():
        saved = json.loads(config.read_text()).get("train", {}).get("collapse")
        known = CollapseThresholds.__dataclass_fields__
        if isinstance(saved, dict):
            thresholds = CollapseThresholds(**{k: v for k, v in saved.items() if k in known})
    events = {(e["step"], e["kind"]): e for r in records for e in r.get("collapse_flags", [])}
    for event in replay_log(records, thresholds).events:
        events.setdefault((event.step, event.kind), event.to_dict())
    return [events[key] for key in sorted(events)]


def _mark(axes, events: list[dict[str, Any]], color: str) -> None:
    for ax in axes:
        for event in events:
            ax.axvline(event["step"], color=color, alpha=0.5, ls=":", lw=1.2)
            ax.annotate(event["kind"], (event["step"], 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=6, color=color)


def plot_runs(runs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write loss.png, residual_norm.png and grad_norm.png into `out_dir`; returns paths.
    A run folder or a log.jsonl(.gz) file works as a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logs = {Path(r): read_log(r) for r in runs}
    flags = {run: collapse_events(run, records) for run, records in logs.items()}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [_plot_loss(plt, logs, flags, colors, out / "loss.png"),
            _plot_residual_norms(plt, logs, flags, colors, out / "residual_norm.png"),
            _plot_grad_norms(plt, logs, flags, colors, out / "grad_norm.png")]


def _plot_loss(plt, logs: Logs, flags: dict, colors: list[str], path: Path) -> Path:
    """Training loss and validation BPB against step, side by side."""
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (run, records) in enumerate(logs.items()):
        c = colors[i % len(colors)]
        ax_loss.plot(*_series(records, "loss"), color=c, lw=1, label=_label(run))
        ax_bpb.plot(*_series(records, "val_bpb"), color=c, marker="o", ms=3, label=_label(run))
        _mark([ax_loss, ax_bpb], flags[run], c)
    ax_loss.set(xlabel="step", ylabel="training loss (nats)", title="Training loss")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="Validation BPB")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_residual_norms(plt, logs: Logs, flags: dict, colors: list[str], path: Path) -> Path:
    """The residual-state norm of every loop against step (one line style per loop)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = ["-", "--", "-.", ":"]
    for i, (run, records) in enumerate(logs.items()):
        steps, norms = _series(records, "residual_norm")
        if not norms:
            continue
        n_loops = max(len(n) for n in norms)  # variable-loop runs log N norms at N loops
        for loop in range(n_loops):
            xs = [s for s, n in zip(steps, norms, strict=True) if len(n) > loop]
            ax.plot(xs, [n[loop] for n in norms if len(n) > loop], color=colors[i % len(colors)], lw=1,
                    ls=styles[loop % len(styles)], alpha=0.5 + 0.5 * (loop + 1) / n_loops,
                    label=f"{_label(run)} loop {loop + 1}")
        _mark([ax], flags[run], colors[i % len(colors)])
    ax.set(xlabel="step", ylabel="rms of x_L^t", title="Residual-state norm per loop",
           yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _plot_grad_norms(plt, logs: Logs, flags: dict, colors: list[str], path: Path) -> Path:
    """One panel per gradient norm of GRAD_KEYS against step."""
    fig, axes = plt.subplots(1, len(GRAD_KEYS), figsize=(16, 3.8), sharex=True)
    for i, (run, records) in enumerate(logs.items()):
        for ax, key in zip(axes, GRAD_KEYS, strict=True):
            ax.plot(*_series(records, key), color=colors[i % len(colors)], lw=1,
                    label=_label(run))
        _mark(axes, flags[run], colors[i % len(colors)])
    for ax, key in zip(axes, GRAD_KEYS, strict=True):
        logged = any(_series(records, key)[0] for records in logs.values())
        ax.set(xlabel="step", title=key.split("/")[1].replace("_", " ") + " grad L2 norm",
               yscale="log" if logged else "linear")  # a log axis needs data
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


__all__ = ["plot_runs", "collapse_events"]
