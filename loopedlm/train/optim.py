"""The paper's optimiser recipe (docs/design.md#training-recipe, nanochat's defaults): Muon for the 2-D block
matrices, AdamW for the embedding and the LM head, a trapezoid learning-rate schedule
and a Muon momentum warm-up.

`torch.optim.Muon` does what the recipe needs and matches nanochat's Muon step for step:
the momentum buffer is `buf.lerp_(g, 1 - m)`, the Nesterov update `g.lerp(buf, m)`,
5 Newton-Schulz steps in bf16 with Keller Jordan's coefficients, and
`adjust_lr_fn="original"` scales the step by `sqrt(max(1, rows / cols))`, which is
nanochat's `max(1, p.size(-2) / p.size(-1)) ** 0.5`. (`"match_rms_adamw"`,
`0.2 * sqrt(max(rows, cols))`, is Moonshot's convention, not the paper's.) Its default
weight decay is 0.1; the recipe has none, so we pass 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from loopedlm.common.validation import ConfigError, check, check_positive, is_int, is_number


@dataclass
class OptimConfig:
    """Learning rates, momenta and the schedule (docs/design.md#training-recipe).

    `lr_scale` multiplies every group's rate; `matrix_lr`, `embedding_lr` and
    `lm_head_lr` are the per-group rates (set them to sweep one group). The AdamW rates
    are further scaled by `(d_model / 768) ** -0.5` when `scale_adamw_by_width` is true.
    """

    matrix_lr: float = 0.02  # Muon, the block matrices
    embedding_lr: float = 0.2  # AdamW, wte
    lm_head_lr: float = 0.004  # AdamW, lm_head
    lr_scale: float = 1.0
    scale_adamw_by_width: bool = True
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_ns_steps: int = 5
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    adam_eps: float = 1e-10
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0

    def __post_init__(self) -> None:
        for name in ("matrix_lr", "embedding_lr", "lm_head_lr", "lr_scale", "adam_eps"):
            check_positive(f"optim.{name}", getattr(self, name))
        for name in ("muon_momentum", "muon_momentum_start", "adam_beta1", "adam_beta2",
                     "warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            value = getattr(self, name)
            check(is_number(value) and 0 <= value <= 1, f"optim.{name}", value,
                  "a number in [0, 1]")
        check(is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
              self.weight_decay, "a number >= 0")
        for name in ("muon_momentum_warmup_steps", "muon_ns_steps"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0, f"optim.{name}", value, "an integer >= 0")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise ConfigError(f"optim.warmup_ratio + optim.warmdown_ratio = "
                              f"{self.warmup_ratio + self.warmdown_ratio} is not allowed: <= 1")
        check(isinstance(self.scale_adamw_by_width, bool), "optim.scale_adamw_by_width",
              self.scale_adamw_by_width, "true or false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The recipe's trapezoid (docs/design.md#training-recipe): (optional linear warm-up),
    constant, then linear to `final_lr_frac` over the last `warmdown_ratio` of the steps
    (nanochat's formula)."""
    warmup = round(cfg.warmup_ratio * total_steps)
    warmdown = round(cfg.warmdown_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / warmdown
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    """docs/design.md#training-recipe: Muon momentum warmed up linearly from 0.85 to 0.95 over 300 steps."""
    if cfg.muon_momentum_warmup_steps == 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def _row_bounds(rows: int, world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's rows: contiguous, sizes differing by at most one."""
    return [(r * rows // world_size, (r + 1) * rows // world_size) for r in range(world_size)]


class ShardedAdamW:
    """AdamW with its state split by rows across ranks: ZeRO stage 1 (optimizer state
    only; the paper's recipe names its AdamW state as sharded).

    Rank r of W keeps the two moments of rows [r R / W, (r + 1) R / W) of each of its
    matrices (the embedding and the LM head, each (vocabulary, d_model) rows), updates
    only those rows and broadcasts them to the other ranks after the step. Every rank
    holds 1/W of the state, whatever W: for `small` (2 x 151,680 x 384 AdamW elements,
    2 fp32 moments each) 0.93 GB in one process, 0.47 GB per rank at W=2, 0.12 GB at W=8.
    Not sharded: the gradients (DDP all-reduces them whole, before the step; ZeRO-2 would
    reduce-scatter them) and Muon's momentum (one buffer per block matrix, about 4 bytes
    per block parameter, kept on every rank, which all compute the same update).
    `state_dict` (rank 0, after `consolidate`) is a plain `torch.optim.AdamW` state dict
    of the whole matrices; `load_state_dict` takes one on every rank.
    """

    def __init__(self, groups: list[dict[str, Any]], *, rank: int, world_size: int,
                 **adam_kwargs: Any):
        self.rank, self.world_size = rank, world_size
        self.params = [p for g in groups for p in g["params"]]
        self.bounds = [_row_bounds(p.size(0), world_size) for p in self.params]
        views = iter(p.detach()[slice(*b[rank])] for p, b in zip(self.params, self.bounds,
                                                                strict=True))
        self.shards = []
        local_groups = []
        for g in groups:
            mine = [next(views) for _ in g["params"]]
            self.shards += mine
            local_groups.append({**g, "params": mine})
        # the shards are views of the parameters' rows: AdamW's in-place update writes
        # straight into the model's weights
        self.adamw = torch.optim.AdamW(local_groups, **adam_kwargs)
        self.param_groups = self.adamw.param_groups
        self._full_state: dict[str, Any] | None = None

    def step(self) -> None:
        for p, shard, bounds in zip(self.params, self.shards, self.bounds, strict=True):
            shard.grad = None if p.grad is None else p.grad[slice(*bounds[self.rank])]
        self.adamw.step()
        with torch.no_grad():
            for p, bounds in zip(self.params, self.bounds, strict=True):
                for owner, (start, stop) in enumerate(bounds):
                    if stop > start:  # the same on every rank
                        torch.distributed.broadcast(p.detach()[start:stop], src=owner)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params + self.shards:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def consolidate(self) -> None:
        """Gather every rank's moments into whole matrices on rank 0 (collective)."""
        local = self.adamw.state_dict()
        full = {"state": {}, "param_groups": local["param_groups"]}
        for index, (p, bounds) in enumerate(zip(self.params, self.bounds, strict=True)):
            state = local["state"].get(index)
            if state is None:  # no step yet (the same on every rank)
                continue
            entry = {k: v for k, v in state.items() if k not in ("exp_avg", "exp_avg_sq")}
            for key in ("exp_avg", "exp_avg_sq"):
                whole = torch.empty_like(p, dtype=state[key].dtype) if self.rank == 0 else None
                for owner, (start, stop) in enumerate(bounds):
                    if stop == start:
                        continue
                    if self.rank == 0 and owner == 0:
                        whole[start:stop] = state[key]
                    elif self.rank == 0:
                        torch.distributed.recv(whole[start:stop], src=owner)
                    elif self.rank == owner:
                        torch.distributed.send(state[key].contiguous(), dst=0)
                entry[key] = whole
            full["state"][index] = entry
        self._full_state = full if self.rank == 0 else None

    def state_dict(self) -> dict[str, Any]:
        if self._full_state is None:
            raise RuntimeError("ShardedAdamW.state_dict: call consolidate() on every rank "
                               "first (rank 0 then holds the whole state)")
        return self._full_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a whole AdamW state dict (every rank): each keeps its own rows."""
        local = {"state": {}, "param_groups": state["param_groups"]}
        for index, entry in state["state"].items():
            start, stop = self.bounds[int(index)][self.rank]
            local["state"][index] = {
                k: (v[start:stop] if k in ("exp_avg", "exp_avg_sq") else v).clone()
                if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        self.adamw.load_state_dict(local)


class LoopedOptimizer:
    """Muon + AdamW behind one `step()`, with the schedule applied per step.

    With `zero=True` (and torch.distributed initialised) the AdamW state is split by rows
    across ranks (`ShardedAdamW`: ZeRO-1, optimizer state only). Muon's single momentum
    buffer per matrix is kept on every rank (the gradients are already all-reduced by
    DDP, so every rank computes the same update).
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, *, zero: bool = False):
        self.cfg = cfg
        groups = model.param_groups()
        d_model = model.config.d_model
        adam_scale = (d_model / 768) ** -0.5 if cfg.scale_adamw_by_width else 1.0
        for p in groups["matrix"]:
            if p.ndim != 2:
                raise ValueError(f"Muon needs 2-D block parameters, got shape {tuple(p.shape)}")
        s = cfg.lr_scale
        self.muon = torch.optim.Muon(
            [{"params": groups["matrix"], "initial_lr": cfg.matrix_lr * s, "name": "matrix"}],
            lr=cfg.matrix_lr * s, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
            nesterov=True, ns_steps=cfg.muon_ns_steps, adjust_lr_fn="original")
        adam_groups = [
            {"params": groups["embedding"], "lr": cfg.embedding_lr * adam_scale * s,
             "initial_lr": cfg.embedding_lr * adam_scale * s, "name": "embedding"},
            {"params": groups["lm_head"], "lr": cfg.lm_head_lr * adam_scale * s,
             "initial_lr": cfg.lm_head_lr * adam_scale * s, "name": "lm_head"},
        ]
        adam_kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay)
        self.zero = zero and torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.zero:
            self.adamw = ShardedAdamW(adam_groups, rank=torch.distributed.get_rank(),
                                      world_size=torch.distributed.get_world_size(),
                                      **adam_kwargs)
        else:
            self.adamw = torch.optim.AdamW(adam_groups, **adam_kwargs)
        self.optimizers = [self.muon, self.adamw]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Apply the schedule for `step` (0-based); returns the rates and Muon momentum."""
        lrm = lr_multiplier(step, total_steps, self.cfg)
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        momentum = muon_momentum(step, self.cfg)
        for group in self.muon.param_groups:
            group["momentum"] = momentum
        rates = {f"lr/{g['name']}": g["lr"] for g in self.param_groups}
        rates["muon_momentum"] = momentum
        return rates

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def consolidate(self) -> None:
        """Gather the sharded AdamW state to rank 0 (collective: call on every rank)."""
        if self.zero:
            self.adamw.consolidate()

    def state_dict(self) -> dict[str, Any]:
        """Full state (after `consolidate()` on every rank when sharded; rank 0 only)."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


__all__ = ["OptimConfig", "LoopedOptimizer", "ShardedAdamW", "lr_multiplier", "muon_momentum"]
