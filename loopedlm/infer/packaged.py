"""Decode steps compiled ahead of time by AOTInductor and kept on disk (docs/design.md#decoding).

A compiled step pays on a CPU only once it is running: torch.compile in a fresh process
imports dynamo and inductor (about 3 s here) and traces the step again (about 5 s at N=12)
even when its caches hold every kernel. An AOTInductor package is the step exported once
(`torch.export`) and compiled to one shared library, run from C++ with no Python between its
kernels: it loads in about 10 ms, without importing the compiler, and then runs as fast as
the compiled step does. So `compile="auto"` on a CPU uses a package from the first step of
a run wherever this machine has built one, and has the compile-warming process
(`loopedlm.infer.warm`) build one for a step variant that keeps running eagerly.

A package is one step variant at the engine's exact tensor shapes (batch slots, cache
length, stop-id table), with the key length a dynamic size below the cache length (a step
that attends over every position runs as it would without one). The weights are not in it:
the engine's own tensors are bound to it when it is loaded (and again when they change), so
one package serves every model of the shape. An adaptive step is packaged as two loop
programs (its first loop and any later one), which the engine calls loop by loop, and its
coda (the skipped loops' fill, the read-out, sampling and record), of the step's flags.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loopedlm.infer.warm import touch

log = logging.getLogger(__name__)

# a `loopedlm.infer.engine.DecodeEngine` and one of its `StepKey`s: the engine imports this
# module, so they are passed in rather than imported
DecodeEngine = Any
StepKey = Any

MODEL_NAME = "model"  # the name of the exported program inside a package
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}  # weights bound at load


def _state_items(engine: DecodeEngine) -> list[tuple[str, torch.Tensor]]:
    return [(name, value) for name, value in vars(engine.state).items()
            if isinstance(value, torch.Tensor)]


def state_tensors(engine: DecodeEngine) -> list[tuple[str, torch.Tensor]]:
    """The slot state's tensors (name, tensor), in a fixed order: the package's inputs after
    the cache's stores. Each must own its storage (none is a view of another): checked
    here, where a package is specified or built, not at every step."""
    found = _state_items(engine)
    storages = {t.untyped_storage().data_ptr() for _, t in found}
    if any(t._base is not None for _, t in found) or len(storages) != len(found):
        raise ValueError("the slot state holds views: it cannot be a package's input")
    return found


def step_inputs(engine: DecodeEngine) -> list[torch.Tensor]:
    """The tensors a packaged step reads and writes in place: the cache's stores (keys and
    values of each layer), then the slot state's tensors (`state_tensors`)."""
    stores = [t for pair in engine.cache.stores for t in pair]
    return stores + [t for _, t in _state_items(engine)]


def input_shapes(engine: DecodeEngine) -> list[list[int]]:
    """What a package is built for, beside the step variant: its inputs' shapes (a
    ValueError if the slot state cannot be its input: `state_tensors`)."""
    state_tensors(engine)
    return [list(t.shape) for t in step_inputs(engine)]


def constants(engine: DecodeEngine) -> dict[str, torch.Tensor]:
    """The engine's weights by the names a package gives them."""
    model = engine.model
    named = {f"model.{name}": t for name, t in model.named_parameters()}
    named.update({f"model.{name}": t for name, t in model.named_buffers()})
    named.update({f"fused{i}": t for i, t in enumerate(engine.fused) if t is not None})
    return {name: t.detach() for name, t in named.items()}


class _Program(torch.nn.Module):
    """A step function as a module of its tensors, for torch.export: the model is a submodule
    and the fused projections buffers (the package's constants); everything else is an
    input."""

    def __init__(self, engine: DecodeEngine, variant: StepKey, step: Callable[..., Any]):
        super().__init__()
        self.model = engine.model
        self.engine, self.variant, self.step = engine, variant, step
        self.fused_at = [i for i, f in enumerate(engine.fused) if f is not None]
        for i in self.fused_at:
            self.register_buffer(f"fused{i}", engine.fused[i])

    def fused(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"fused{i}") if i in self.fused_at else None
                for i in range(len(self.engine.fused))]


class _StepProgram(_Program):
    """`fixed_step` of one variant: the stores and the slot state are inputs, written in
    place."""

    def forward(self, tensors: list[torch.Tensor], key_slots: torch.Tensor) -> torch.Tensor:
        self.step(self.model, self.variant, *self.state_and_cache(tensors), key_slots,
                  self.fused())
        return key_slots[:1]  # an export needs an output; the step's are its writes

    def state_and_cache(self, tensors: list[torch.Tensor]) -> tuple[Any, Any]:
        """The engine's slot state and cache over `tensors` (`step_inputs`' order)."""
        engine = self.engine
        n = 2 * len(engine.cache.stores)
        cache = engine.cache.on([(tensors[i], tensors[i + 1]) for i in range(0, n, 2)])
        state = copy.copy(engine.state)
        for (name, _), tensor in zip(state_tensors(engine), tensors[n:], strict=True):
            setattr(state, name, tensor)
        return state, cache


class _CodaProgram(_StepProgram):
    """The end of an adaptive step (`adaptive_coda` in `loopedlm.infer.engine`): the stores
    and the slot state (written in place) and the rows' budgets, loops spent and states."""

    def forward(self, tensors: list[torch.Tensor], ends: list[torch.Tensor],
                key_slots: torch.Tensor) -> torch.Tensor:
        state, cache = self.state_and_cache(tensors)
        self.step(self.model, self.variant, state, cache, ends)
        return key_slots[:1]


class _LoopProgram(_Program):
    """One loop of an adaptive step (`adaptive_loop` in `loopedlm.infer.engine`, the first
    loop or a later one): one loop's cache entries (keys and values of each layer, rows
    [0, batch), every position) and the rows' tensors (`AdaptiveRows`, in its order) are
    inputs, written in place; the loop's states and which rows stopped are the outputs."""

    def forward(self, entries: list[torch.Tensor], rows: list[torch.Tensor],
                key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
        return self.step(self.model, self.variant, self.engine.cache, pairs, rows, key_slots,
                         self.fused())


def loop_inputs(engine: DecodeEngine, batch: int, loop: int) -> list[torch.Tensor]:
    """The cache entries a packaged adaptive loop `loop` takes, flat (keys, values of each
    layer): views of rows [0, batch) at every position."""
    return [t for pair in engine.cache.loop_entries(loop, batch, engine.max_len) for t in pair]


def build(engine: DecodeEngine, variant: StepKey, path: Path, step: Callable[..., Any],
          rows: list[torch.Tensor] | None = None) -> float:
    """Export `variant` of the engine's `step` and compile it into a package at `path`
    (written to a temporary name and renamed: a reader never sees half of one); its
    seconds. `step`: `fixed_step(model, variant, state, cache, key_slots, fused)`, or, for a
    variant with a `loop_program`, one loop of an adaptive step (`_LoopProgram`), traced on
    the example `rows`, or an adaptive step's coda (`_CodaProgram`), traced on example ends
    (budgets, loops spent, states). The engine's tensors are only traced, never written."""
    from torch._inductor import aoti_compile_and_package

    if engine.max_len < 4:
        raise ValueError(f"max_len={engine.max_len}: too short for a packaged step")
    start = time.perf_counter()
    kv = torch.export.Dim("kv_len", min=2, max=engine.max_len - 1)
    key_slots = torch.arange(min(engine.max_len - 1, 64), device=engine.device)
    if variant.loop_program and rows is None:
        raise ValueError("a loop program is traced on example rows")
    if variant.loop_program == "coda":
        inputs = step_inputs(engine)
        program: _Program = _CodaProgram(engine, variant, step)
        args = (inputs, rows, key_slots)
        dynamic = ([None] * len(inputs), [None] * len(rows), {0: kv})
    elif variant.loop_program:
        loop = 0 if variant.loop_program == "first" else min(1, engine.max_loops - 1)
        entries = loop_inputs(engine, variant.batch, loop)
        program = _LoopProgram(engine, variant, step)
        args = (entries, rows, key_slots)
        dynamic = ([None] * len(entries), [None] * len(rows), {0: kv})
    else:
        inputs = step_inputs(engine)
        program = _StepProgram(engine, variant, step)
        args, dynamic = (inputs, key_slots), ([None] * len(inputs), {0: kv})
    with torch.no_grad():
        exported = torch.export.export(program.eval(), args, dynamic_shapes=dynamic,
                                       strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{time.time_ns()}.tmp.pt2")
    try:
        aoti_compile_and_package(exported, package_path=str(tmp),
                                 inductor_configs=dict(INDUCTOR_CONFIGS))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - start


class StepPackage:
    """A loaded package: `run(inputs, key_slots)` runs one step of its variant on the
    engine's `step_inputs` (a loop program: its inputs), which must have the shapes it was
    built for, and returns its outputs. Bound to the engine's weights at load; `bind` again
    after they change."""

    def __init__(self, path: Path, engine: DecodeEngine):
        self.path = path
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), MODEL_NAME, True, 1, -1)
        self.bind(engine)

    def bind(self, engine: DecodeEngine) -> None:
        """Point the package's constants at the engine's weights (no copy)."""
        named = constants(engine)
        wanted = self.loader.get_constant_fqns()
        missing = [name for name in wanted if name not in named]
        if missing:
            raise ValueError(f"{self.path.name}: weights this engine lacks: {missing[:5]}")
        self.loader.load_constants({name: named[name] for name in wanted}, False, True, True)

    def run(self, inputs: list[torch.Tensor], key_slots: torch.Tensor) -> list[torch.Tensor]:
        return self.loader.run([*inputs, key_slots])


def load(path: Path, engine: DecodeEngine) -> StepPackage | None:
    """The package at `path` bound to the engine, or None (it does not load: the step runs
    without it). A package loaded is marked used (`loopedlm.infer.warm.touch`), so that the
    warming process's `prune` keeps it."""
    try:
        package = StepPackage(path, engine)
    except Exception as error:  # a package is only ever an optimisation
        log.warning("decode engine: the packaged step %s does not load (%s): decoding "
                    "without it", path, error)
        return None
    touch(path)
    return package


__all__ = ["StepPackage", "build", "load", "step_inputs", "loop_inputs", "input_shapes",
           "constants"]
