"""What a training step measures (docs/design.md#diagnostics), kept on the device until a
log point: the step loop reads nothing back, so it costs no host sync (at N=12 it used to
cost about 18 per step: the loss, the clipped norm, four watched norms, a norm per loop).
`read_steps` brings every pending step's figures to the host in one transfer, and each
becomes the log.jsonl record it always was."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loopedlm.train.metrics import mfu


@dataclass
class StepFigures:
    """One finished step, its figures still on the device: the loss, the clipped total
    gradient norm (nan without clipping), the watched groups' gradient norms, then each
    loop's residual norm, in one fp32 vector."""

    step: int
    n_loops: int
    rates: dict[str, float]
    flops_per_token: float
    values: torch.Tensor

    @classmethod
    def pack(cls, step: int, n_loops: int, rates: dict[str, float], flops_per_token: float,
             stats: torch.Tensor, total_norm: torch.Tensor | None,
             group_norms: list[torch.Tensor]) -> StepFigures:
        """`stats`: [loss, residual norm per loop] (the trainer's all-reduced vector)."""
        if total_norm is None:
            total_norm = torch.full_like(stats[0], float("nan"))
        values = torch.cat([stats[:1].float(), total_norm.float().view(1),
                            torch.stack(group_norms).float().to(stats.device),
                            stats[1:].float()])
        return cls(step, n_loops, rates, flops_per_token, values)


@dataclass
class ReadStep:
    """A step's figures on the host."""

    figures: StepFigures
    loss: float
    grad_norm: float | None
    group_norms: dict[str, float]
    residual_norms: list[float]

    def record(self, batch_tokens: int, dt: float, peak: float | None,
               world_size: int) -> dict[str, Any]:
        """The step's log.jsonl record (`dt`: seconds this step took)."""
        f = self.figures
        tokens_per_s = batch_tokens / dt
        return {"step": f.step, "loss": self.loss, **f.rates, "n_loops": f.n_loops,
                "tokens_per_s": tokens_per_s, "dt": dt, "flops_per_token": f.flops_per_token,
                "mfu": mfu(f.flops_per_token, tokens_per_s, peak, world_size),
                "grad_norm": self.grad_norm,
                **{f"grad_norm/{k}": v for k, v in self.group_norms.items()},
                "residual_norm": self.residual_norms, "tokens": f.step * batch_tokens}


def read_steps(pending: list[StepFigures], groups: list[str], clipped: bool
               ) -> list[ReadStep]:
    """Every pending step's figures, read in one transfer (the one host sync of a log
    interval). `groups`: the watched groups' names, in `pack`'s order; `clipped`: whether
    the total norm was measured (else None)."""
    if not pending:
        return []
    values = torch.cat([f.values for f in pending]).tolist()
    out, at = [], 0
    for f in pending:
        row = values[at: at + 2 + len(groups) + f.n_loops]
        at += len(row)
        out.append(ReadStep(f, row[0], row[1] if clipped else None,
                            dict(zip(groups, row[2: 2 + len(groups)], strict=True)),
                            row[2 + len(groups):]))
    return out


__all__ = ["StepFigures", "ReadStep", "read_steps"]
