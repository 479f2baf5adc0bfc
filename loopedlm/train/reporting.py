"""What rank 0 shows and records while a run trains: the log.jsonl records, collapse
warnings, and a progress bar on a terminal or plain lines elsewhere (CI, nohup, a pipe)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from loopedlm.train.config import TrainConfig
from loopedlm.train.run_log import RunLogger

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """`1h05m` or `4m07s`."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class StepReporter:
    """Rank 0's view of the loop: every `log_every`-th step record (and any step with a
    collapse flag) into log.jsonl, validation results, and a bar or every `print_every`
    steps a line."""

    def __init__(self, cfg: TrainConfig, logger: RunLogger, total_steps: int, start_step: int,
                 t_start: float):
        self.cfg, self.logger = cfg, logger
        self.total_steps, self.start_step, self.t_start = total_steps, start_step, t_start
        self.bar, self.print_every = None, 0
        if cfg.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train",
                            dynamic_ncols=True)
        elif cfg.progress:
            self.print_every = cfg.print_every or max(1, total_steps // 20)
        self.val_bpb: float | None = None

    def step(self, record: dict[str, Any], events: list) -> None:
        """Report a finished step (`record` as written to log.jsonl; `events` the
        collapse detector's flags)."""
        step, total_steps = record["step"], self.total_steps
        for event in events:
            log.warning("collapse detector: %s at step %d: %s", event.kind, event.step,
                        event.detail)
        if step % self.cfg.log_every == 0 or step == total_steps or events:
            if events:
                record["collapse_flags"] = [e.to_dict() for e in events]
            self.logger.write(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}",
                                 **({"val_bpb": f"{self.val_bpb:.3f}"} if self.val_bpb else {}))
        if self.print_every and (step % self.print_every == 0 or step == total_steps):
            spent = time.time() - self.t_start
            left = spent / (step - self.start_step) * (total_steps - step)
            log.info("step %d/%d  loss %.4f  %.0f tokens/s  elapsed %s  left %s", step,
                     total_steps, record["loss"], record["tokens_per_s"], duration(spent),
                     duration(left))

    def validation(self, step: int, val_bpb: float, val_tokens: int) -> None:
        self.val_bpb = val_bpb
        self.logger.write({"step": step, "val_bpb": val_bpb, "val_tokens": val_tokens})
        (log.debug if self.bar is not None else log.info)(
            "step %d/%d  val bpb %.4f (%d tokens)", step, self.total_steps, val_bpb, val_tokens)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["duration", "StepReporter"]
