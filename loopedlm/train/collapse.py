"""Collapse detection (docs/design.md#diagnostics): thresholds, events, the online detector
that a training run feeds every step, and `replay_log`, which runs it over a finished run's log."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopedlm.common.validation import is_int, is_number
from loopedlm.train.run_log import read_log


@dataclass
class CollapseThresholds:
    """When a run counts as collapsing. Windows count updates (steps, when the detector
    is fed every step); nothing is checked before `min_steps` (the initial descent is
    steep by nature).

    Loss-curve rules:
      plateau: over the last `plateau_window` steps the windowed minimum improved by less
        than `plateau_min_improvement` (relative) *and* the recent mean loss is more than
        `plateau_gap` (relative) above the best smoothed loss seen so far: the run is
        stuck far above where it has already been (a collapse, not a converged run).
      swings: at least `swing_fraction` of the last `swing_window` losses lie more than
        `swing_rel_dev` (relative) away from the window's median (sustained oscillation;
        a lone spike does not count).
      spike: one step's loss exceeds the median of the previous `swing_window` steps by
        more than `spike_ratio` (relative).

    Residual-state rules (the paper's collapse: the loss stalls early while the state
    keeps growing; fed the per-loop residual-state norms (docs/design.md#diagnostics), their maximum over
    loops is watched). Over the last `state_window` steps after `min_steps`, compare the
    first quarter with the last (mean loss, median norm). The loss is *stalled* when it
    improved by less than `stall_improvement` (relative) between the two quarters.
      stalled_growth: the loss is stalled while the norm grew by a factor of at least
        `state_growth` across the window (sustained multiplicative growth).
      state_explosion: the loss is stalled while the norm is at least `state_ratio` times
        its early level (the median of the first `state_window // 4` steps after
        `min_steps`): slow growth that has added up.
    A healthy run improves its loss while its state grows, so neither rule fires on it;
    set `state_growth` / `state_ratio` to inf to switch a rule off.
    """

    min_steps: int = 50
    ema_beta: float = 0.9
    plateau_window: int = 100
    plateau_min_improvement: float = 0.01
    plateau_gap: float = 0.25
    swing_window: int = 20
    swing_rel_dev: float = 0.15
    swing_fraction: float = 0.25
    spike_ratio: float = 0.5
    state_window: int = 200
    stall_improvement: float = 0.01
    state_growth: float = 2.0
    state_ratio: float = 100.0

    def __post_init__(self) -> None:
        for name, minimum in (("min_steps", 0), ("plateau_window", 2), ("swing_window", 2),
                              ("state_window", 4)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ValueError(f"collapse.{name}={value!r} is not allowed: an integer >= "
                                 f"{minimum}")
        for name, minimum in (("ema_beta", 0), ("plateau_min_improvement", 0),
                              ("plateau_gap", 0), ("swing_rel_dev", 0), ("swing_fraction", 0),
                              ("spike_ratio", 0), ("stall_improvement", 0),
                              ("state_growth", 1), ("state_ratio", 1)):
            value = getattr(self, name)
            if (not is_number(value)
                    or math.isnan(value) or value < minimum):
                raise ValueError(f"collapse.{name}={value!r} is not allowed: a number >= "
                                 f"{minimum}")


@dataclass
class CollapseEvent:
    step: int
    kind: str  # "nonfinite" | "plateau" | "swings" | "spike" | "stalled_growth" | "state_explosion"
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "detail": self.detail}


@dataclass
class CollapseDetector:
    """Feed it the training loss (and the per-loop residual-state norms) each step; it
    returns new events as they happen. A flag of one kind is raised at most once per
    window to keep logs readable. `state_dict` / `load_state_dict` make a resumed run
    flag exactly what an uninterrupted one would; `replay_log` runs it over a finished
    run's log."""

    thresholds: CollapseThresholds = field(default_factory=CollapseThresholds)
    events: list[CollapseEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.thresholds
        self._recent: deque[float] = deque(maxlen=max(t.plateau_window, t.swing_window) + 1)
        self._ema: float | None = None
        self._best_ema = math.inf
        self._seen = 0
        self._last_flag: dict[str, int] = {}
        # (loss, max residual norm over loops) of the steps after min_steps
        self._state: deque[tuple[float, float]] = deque(maxlen=t.state_window)
        self._early_norm: float | None = None

    @property
    def nonfinite(self) -> bool:
        return any(e.kind == "nonfinite" for e in self.events)

    def status(self) -> str:
        """"ok", "collapsed" (non-finite loss) or "flagged" (any other rule)."""
        if self.nonfinite:
            return "collapsed"
        return "flagged" if self.events else "ok"

    def update(self, step: int, loss: float,
               residual_norm: Sequence[float] | float | None = None) -> list[CollapseEvent]:
        """Record one step's training loss and (optionally) its residual-state norm per
        loop; returns the events this step raised."""
        t = self.thresholds
        new: list[CollapseEvent] = []
        if not math.isfinite(loss):
            new.append(CollapseEvent(step, "nonfinite", f"loss is {loss} at step {step}"))
            self.events.extend(new)
            return new
        self._seen += 1
        self._ema = loss if self._ema is None else t.ema_beta * self._ema + (1 - t.ema_beta) * loss
        self._best_ema = min(self._best_ema, self._ema)
        history = list(self._recent)
        self._recent.append(loss)
        norm = _max_norm(residual_norm)
        if norm is not None and not math.isfinite(norm[0]):
            new += self._flag(step, "state_explosion", f"the residual-state norm of loop "
                              f"{norm[1]} is {norm[0]} at step {step}")
            norm = None
        if self._seen <= t.min_steps:
            return new

        previous = history[-t.swing_window:]
        if len(previous) >= t.swing_window:
            median = statistics.median(previous)
            if loss > median * (1 + t.spike_ratio):
                new += self._flag(step, "spike", f"loss {loss:.4f} is {loss / median - 1:.0%} above "
                                  f"the median {median:.4f} of the previous {t.swing_window} steps")
            window = history[-t.swing_window + 1:] + [loss]
            center = statistics.median(window)
            off = sum(abs(x - center) > t.swing_rel_dev * center for x in window) / len(window)
            if off >= t.swing_fraction:
                new += self._flag(step, "swings", f"{off:.0%} of the last {t.swing_window} losses "
                                  f"are more than {t.swing_rel_dev:.0%} away from their median "
                                  f"{center:.4f}")
        if len(history) >= t.plateau_window:
            window = history[-t.plateau_window + 1:] + [loss]
            half = len(window) // 2
            early, late = min(window[:half]), min(window[half:])
            recent_mean = statistics.fmean(window[half:])
            improvement = (early - late) / early
            gap = recent_mean / self._best_ema - 1
            if improvement < t.plateau_min_improvement and gap > t.plateau_gap:
                new += self._flag(step, "plateau", f"loss has not improved by "
                                  f"{t.plateau_min_improvement:.0%} in {t.plateau_window} steps and "
                                  f"sits {gap:.0%} above the best smoothed loss "
                                  f"{self._best_ema:.4f}")
        if norm is not None:
            new += self._check_state(step, loss, norm[0])
        return new

    def _check_state(self, step: int, loss: float, norm: float) -> list[CollapseEvent]:
        t = self.thresholds
        self._state.append((loss, norm))
        quarter = t.state_window // 4
        if self._early_norm is None and len(self._state) == quarter:
            self._early_norm = statistics.median(n for _, n in self._state)
        if len(self._state) < t.state_window:
            return []
        first, last = list(self._state)[:quarter], list(self._state)[-quarter:]
        loss_then = statistics.fmean(x for x, _ in first)
        loss_now = statistics.fmean(x for x, _ in last)
        improvement = (loss_then - loss_now) / loss_then
        if improvement >= t.stall_improvement:
            return []
        norm_then = statistics.median(n for _, n in first)
        norm_now = statistics.median(n for _, n in last)
        stalled = (f"while the loss stalled ({improvement:+.1%}: {loss_then:.3f} -> "
                   f"{loss_now:.3f}, means of the first and last {quarter} steps)")
        new = []
        growth = norm_now / norm_then if norm_then > 0 else math.inf
        if growth >= t.state_growth:
            new += self._flag(step, "stalled_growth", f"the residual-state norm grew {growth:.1f}x "
                              f"({norm_then:.3g} -> {norm_now:.3g}, max over loops) in the last "
                              f"{t.state_window} steps {stalled}")
        ratio = norm_now / self._early_norm if self._early_norm else math.inf
        if ratio >= t.state_ratio:
            new += self._flag(step, "state_explosion", f"the residual-state norm is {ratio:.0f}x "
                              f"its early level ({self._early_norm:.3g} -> {norm_now:.3g}, max over "
                              f"loops) {stalled}")
        return new

    def _flag(self, step: int, kind: str, detail: str) -> list[CollapseEvent]:
        t = self.thresholds
        gap = {"plateau": t.plateau_window, "stalled_growth": t.state_window,
               "state_explosion": t.state_window}.get(kind, t.swing_window)
        last = self._last_flag.get(kind)
        if last is not None and step - last < gap:
            return []
        self._last_flag[kind] = step
        event = CollapseEvent(step, kind, detail)
        self.events.append(event)
        return [event]

    def summary(self) -> dict[str, Any]:
        return {"status": self.status(), "events": [e.to_dict() for e in self.events],
                "thresholds": self.thresholds.__dict__.copy()}

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self._recent), "ema": self._ema, "best_ema": self._best_ema,
                "seen": self._seen, "last_flag": dict(self._last_flag),
                "events": [e.to_dict() for e in self.events],
                "state": [list(pair) for pair in self._state], "early_norm": self._early_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._recent.clear()
        self._recent.extend(state["recent"])
        self._ema, self._best_ema = state["ema"], state["best_ema"]
        self._seen, self._last_flag = state["seen"], dict(state["last_flag"])
        self.events = [CollapseEvent(**e) for e in state["events"]]
        # checkpoints written before the residual-state rules have no "state"
        self._state.clear()
        self._state.extend(tuple(pair) for pair in state.get("state", []))
        self._early_norm = state.get("early_norm")


def _max_norm(residual_norm: Sequence[float] | float | None) -> tuple[float, int] | None:
    """(the largest per-loop norm, its 1-based loop), non-finite first; None if absent."""
    if residual_norm is None:
        return None
    norms = [float(residual_norm)] if isinstance(residual_norm, int | float) else [
        float(x) for x in residual_norm]
    if not norms:
        return None
    bad = [i for i, x in enumerate(norms) if not math.isfinite(x)]
    loop = bad[0] if bad else max(range(len(norms)), key=norms.__getitem__)
    return norms[loop], loop + 1


def replay_log(source: str | Path | Iterable[dict[str, Any]],
               thresholds: CollapseThresholds | None = None) -> CollapseDetector:
    """Run a fresh detector over a finished run's training records, offline.

    `source` is a run folder, a log.jsonl (or .jsonl.gz) file, or the records
    themselves; every record with a "loss" is fed in order, with its "residual_norm"
    when present. Returns the detector: its `events`, `status()` and `summary()`.
    """
    records = read_log(source) if isinstance(source, str | Path) else source
    detector = CollapseDetector(thresholds or CollapseThresholds())
    for record in records:
        if record.get("loss") is not None and record.get("step") is not None:
            detector.update(record["step"], float(record["loss"]), record.get("residual_norm"))
    return detector


__all__ = ["CollapseThresholds", "CollapseEvent", "CollapseDetector", "replay_log"]
