"""`loopedlm train`: the paper's training recipe (SPEC 5) with live diagnostics (SPEC 6),
atomic checkpoints, exact resume, and torchrun/DDP.

Configuration is three sections, each a validated dataclass:
  top level  `TrainConfig`           --steps=200          TOML: steps = 200
  [model]    `ModelConfig` overrides --model.n_loops=6    TOML: [model] n_loops = 6
  [optim]    `OptimConfig`           --optim.lr_scale=2   TOML: [optim] lr_scale = 2.0
  [collapse] `CollapseThresholds`    --collapse.spike_ratio=1
A recipe (`recipes/NAME.toml` or a path) is read first, then `--key=value` overrides.
The model starts from `preset` and the [model] section overrides its fields.

    loopedlm train                         # recipes/tiny.toml on the bundled corpus
    loopedlm train small --steps=1000      # recipes/small.toml
    torchrun --nproc_per_node=8 -m loopedlm.train base
    loopedlm train --run_dir=runs/x --resume
    loopedlm train small --print-config    # the resolved settings, without running
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import sys
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from loopedlm.common.distributed import (
    DistInfo,
    all_reduce_mean,
    cleanup_distributed,
    setup_distributed,
)
from loopedlm.common.paths import RECIPE_DIRS, loopedlm_home
from loopedlm.model.checkpoint import (
    CheckpointSaveError,
    atomic_write_json,
    latest_training_checkpoint,
    load_training_state,
    save_training_checkpoint,
)
from loopedlm.model.config import PRESETS, QWEN3_VOCAB_SIZE, ConfigError, ModelConfig
from loopedlm.model.gpt import LoopedGPT
from loopedlm.train.diagnostics import (
    CollapseDetector,
    CollapseThresholds,
    PeakMemory,
    RunLogger,
    evaluate_bpb,
    grad_norms,
    mfu,
    peak_flops,
    watched_parameters,
)
from loopedlm.train.loop_sampling import LoopSampling
from loopedlm.train.optim import LoopedOptimizer, OptimConfig
from loopedlm.train.parallel import apply_activation_checkpointing, wrap_ddp

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16")
PARAM_BASES = ("all", "non_embedding")


def _err(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model's architecture.

    Horizon: `steps` if set, else `flops_budget` (FLOPs counting every loop; with
    variable loops, at the expected N), else `target_param_data_ratio` x parameters
    (basis `param_basis`: "all", as the authors' code, or "non_embedding", as the
    paper's text) tokens.

    Loops (issue 14): `loop_sampling` draws the loop count N of each step ("fixed",
    "uniform:A,B", "poisson_lognormal:MEAN[,SIGMA]": loopedlm.train.loop_sampling);
    `backprop_loops` = k > 0 backpropagates through the last k loops only (0: all).
    """

    run_dir: str = ""  # "" -> runs/<preset>-<timestamp>
    data_dir: str = ""  # "" -> the bundled corpus (loopedlm.data.loader.default_data_dir())
    tokenizer: str = "auto"  # "qwen3" | "bpe" | "bpe:VOCAB" | a saved tokenizer folder
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    collapse: CollapseThresholds = field(default_factory=CollapseThresholds)
    sequence_len: int | None = None  # None -> the model's sequence_len
    total_batch_tokens: int = 524_288
    device_batch_size: int = 32
    seed: int = 0
    steps: int | None = None
    target_param_data_ratio: float = 20.0
    param_basis: str = "all"
    flops_budget: float | None = None
    eval_every: int = 250  # 0: only at the end
    eval_tokens: int = 10 * 524_288
    sample_every: int = 0  # 0: only at the end
    sample_prompt: str = "The "
    sample_tokens: int = 48
    save_every: int = 1000  # 0: only at the end
    keep_last: int = 2
    resume: bool = False
    compile: bool = False
    dtype: str = "auto"
    activation_checkpointing: bool = False
    zero: bool = False
    device: str = "auto"
    grad_clip: float = 1.0  # 0 disables clipping
    loop_sampling: str = "fixed"  # "fixed" | "uniform:A,B" | "poisson_lognormal:MEAN[,SIGMA]"
    backprop_loops: int = 0  # 0: backprop through every loop; k: the last k loops only
    log_every: int = 1
    progress: bool = True  # a bar on a terminal, else a plain line every `print_every` steps
    print_every: int = 0  # 0: about 20 lines per run

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = _build_section(OptimConfig, self.optim, "optim")
        if isinstance(self.collapse, dict):
            self.collapse = _build_section(CollapseThresholds, self.collapse, "collapse")
        self.validate()

    def validate(self) -> None:
        for name in ("run_dir", "data_dir", "tokenizer", "sample_prompt"):
            if not isinstance(getattr(self, name), str):
                raise _err(name, getattr(self, name), "a string")
        if self.preset not in PRESETS:
            hint = difflib.get_close_matches(str(self.preset), list(PRESETS), n=1)
            raise ConfigError(f"preset={self.preset!r} is not allowed: choose one of "
                              f"{list(PRESETS)}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if not isinstance(self.model, dict):
            raise _err("model", self.model, "a table of ModelConfig fields")
        tok = self.tokenizer
        if not (tok in ("auto", "qwen3", "bpe") or tok.startswith("bpe:") or Path(tok).is_dir()):
            raise _err("tokenizer", tok, "'auto', 'qwen3', 'bpe', 'bpe:VOCAB' or a saved "
                       "tokenizer folder")
        if tok.startswith("bpe:") and not (tok[4:].isdigit() and int(tok[4:]) >= 256):
            raise _err("tokenizer", tok, "'bpe:VOCAB' with an integer VOCAB >= 256")
        for name in ("total_batch_tokens", "device_batch_size", "eval_tokens", "sample_tokens",
                     "log_every"):
            if not (_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise _err(name, getattr(self, name), "an integer >= 1")
        for name in ("eval_every", "sample_every", "save_every", "seed", "keep_last",
                     "print_every"):
            if not (_int(getattr(self, name)) and getattr(self, name) >= 0):
                raise _err(name, getattr(self, name), "an integer >= 0")
        for name in ("sequence_len", "steps"):
            value = getattr(self, name)
            if value is not None and not (_int(value) and value >= 1):
                raise _err(name, value, "an integer >= 1 (or unset)")
        if not (_num(self.target_param_data_ratio) and self.target_param_data_ratio > 0):
            raise _err("target_param_data_ratio", self.target_param_data_ratio, "a number > 0")
        if self.flops_budget is not None and not (_num(self.flops_budget) and self.flops_budget > 0):
            raise _err("flops_budget", self.flops_budget, "a number > 0 (or unset)")
        if self.steps is not None and self.flops_budget is not None:
            raise ConfigError(f"steps={self.steps} and flops_budget={self.flops_budget} "
                              "contradict each other: set one horizon")
        if self.param_basis not in PARAM_BASES:
            raise _err("param_basis", self.param_basis, f"one of {list(PARAM_BASES)}")
        if self.dtype not in DTYPES:
            raise _err("dtype", self.dtype, f"one of {list(DTYPES)}")
        if not (_num(self.grad_clip) and self.grad_clip >= 0):
            raise _err("grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")
        for name in ("resume", "compile", "activation_checkpointing", "zero", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, getattr(self, name), f"true or false ({BOOL_SPELLINGS})")
        if not isinstance(self.device, str):
            raise _err("device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        self._validate_loops()

    def _validate_loops(self) -> None:
        if not (_int(self.backprop_loops) and self.backprop_loops >= 0):
            raise _err("backprop_loops", self.backprop_loops, "an integer >= 0 (0 = all loops)")
        model = self.model_config()
        sampler = self.loop_sampler(model.n_loops)
        if self.backprop_loops > sampler.max_loops:
            raise _err("backprop_loops", self.backprop_loops,
                       f"at most the largest loop count, {sampler.max_loops} "
                       f"(loop_sampling={self.loop_sampling!r}: {sampler.describe()})")
        if self.backprop_loops and model.loop_mode == "lt":
            # LT reads the embedding in loop 1 only: cut there, wte would never learn
            raise ConfigError(f"backprop_loops={self.backprop_loops} is not allowed with "
                              "model.loop_mode='lt' (the input enters loop 1 only, so the "
                              "embedding would get no gradient): use 0, or a mode that "
                              "re-injects the input (lti, ltai, flt_res, flt)")

    def loop_sampler(self, n_loops: int | None = None) -> LoopSampling:
        """The parsed `loop_sampling` ("fixed" uses `n_loops`, default the model's)."""
        if n_loops is None:
            n_loops = self.model_config().n_loops
        return LoopSampling.parse(self.loop_sampling, n_loops)

    @property
    def grad_loops(self) -> int | None:
        """`backprop_loops` as the model's forward argument (None = every loop)."""
        return self.backprop_loops or None

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The preset with the [model] overrides (and the tokenizer's vocabulary size
        unless [model] sets one)."""
        overrides = dict(self.model)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return ModelConfig.preset(self.preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- configuration: recipes and --key=value overrides ------------------------------
def _build_section(cls, data: dict[str, Any], section: str):
    _check_keys(cls, data, section)
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()})


def _check_keys(cls, data: dict[str, Any], section: str | None) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            name = f"{section}.{key}" if section else key
            raise ConfigError(f"unknown setting {name!r}" +
                              (f" (did you mean {(section + '.') if section else ''}{hint[0]}?)"
                               if hint else f"; known: {', '.join(known)}"))


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}
BOOL_SPELLINGS = "also True/False, yes/no, on/off, 1/0"


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Command-line/TOML value to the field's type where that is unambiguous."""
    args = typing.get_args(hint)
    allowed = set(args) if args else {hint}
    if bool in allowed and isinstance(value, str | int) and not isinstance(value, bool):
        word = str(value).strip().lower()
        if word in BOOL_WORDS:
            return BOOL_WORDS[word]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                         and type(None) in allowed):
        return None
    if float in allowed and _int(value):
        return float(value)
    if str in allowed and not isinstance(value, str) and not isinstance(value, bool):
        return str(value)
    if int in allowed and isinstance(value, float) and value.is_integer() and float not in allowed:
        return int(value)
    return value


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def find_recipe(name: str) -> Path:
    """A recipe name (recipes/NAME.toml) or a path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return path
    for folder in RECIPE_DIRS:
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    names = sorted({p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.toml")})
    hint = difflib.get_close_matches(name, names, n=1)
    raise FileNotFoundError(f"no recipe {name!r}: choose one of {names} or give a .toml path"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    section, _, leaf = key.rpartition(".")
    if section and section not in ("model", "optim", "collapse"):
        raise ConfigError(f"unknown setting {key!r}: sections are model., optim., collapse.")
    target = data.setdefault(section, {}) if section else data
    target[leaf] = value


def parse_overrides(args: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`[RECIPE] [--key=value | --flag ...]` -> (recipe, nested overrides)."""
    recipe, overrides = None, {}
    for arg in args:
        if not arg.startswith("--"):
            if recipe is not None:
                raise ValueError(f"unexpected argument {arg!r}: give one recipe and "
                                 "--key=value settings")
            recipe = arg
            continue
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "recipe":
            recipe = text
            continue
        _set_dotted(overrides, key, _parse_value(text) if eq else True)
    return recipe, overrides


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def build_config(recipe: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- recipe TOML <- overrides. With `resume` and an existing
    RUN/config.json, the saved run config replaces the recipe as the base."""
    overrides = overrides or {}
    data: dict[str, Any] = {}
    if overrides.get("resume") and overrides.get("run_dir"):
        saved = Path(overrides["run_dir"]) / "config.json"
        if saved.exists():
            data = json.loads(saved.read_text())["train"]
    if not data:
        path = find_recipe(recipe or "tiny")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    data = _merge(data, overrides)
    _check_keys(TrainConfig, data, None)
    if not isinstance(data.get("model", {}), dict):
        raise ConfigError("model must be a table of ModelConfig fields")
    _check_keys(ModelConfig, data.get("model", {}), "model")
    hints = typing.get_type_hints(TrainConfig)
    values = {k: _coerce(v, hints[k], k) if k not in ("model", "optim", "collapse") else v
              for k, v in data.items()}
    model_hints = typing.get_type_hints(ModelConfig)
    values["model"] = {k: _coerce(v, model_hints[k], f"model.{k}")
                       for k, v in values.get("model", {}).items()}
    return TrainConfig(**values)


# ---- data ------------------------------------------------------------------------
class ParquetData:
    """The default data source: Parquet shards through loopedlm.data.loader."""

    def __init__(self, data_dir: str):
        from loopedlm.data import loader as data
        self._data = data
        if data_dir:
            self.data_dir = Path(data_dir)
        else:
            self.data_dir = data.prepare_default_corpus()
        data.split_shards(self.data_dir, "val")  # a clear error now if the folder is unusable

    def texts(self):
        return self._data.iter_texts(self.data_dir, "train")

    def loader(self, tokenizer, batch_size: int, seq_len: int, *, split: str, rank: int,
               world_size: int, device, loop: bool = True):
        kwargs = {} if loop else {"loop": False}
        return self._data.ParquetTokenLoader(self.data_dir, tokenizer, batch_size, seq_len,
                                             split=split, rank=rank, world_size=world_size,
                                             device=device, **kwargs)


def _cache_root() -> Path:
    return loopedlm_home()


def resolve_tokenizer(spec: str, vocab_size: int, data: ParquetData, run_dir: Path,
                      info: DistInfo):
    """Load (or train and cache) the tokenizer and save it into RUN/tokenizer."""
    from loopedlm.data import tokenizer as tokmod
    saved = run_dir / "tokenizer"
    # every rank looks before rank 0 may write it (below), so none sees a half-written folder
    exists = saved.is_dir() and any(saved.iterdir())
    _barrier()
    if exists:
        return tokmod.load_tokenizer(str(saved))
    if spec == "auto":
        spec = "qwen3" if vocab_size == QWEN3_VOCAB_SIZE else f"bpe:{vocab_size}"
    if spec == "bpe":
        spec = f"bpe:{vocab_size}"
    if spec == "qwen3" or Path(spec).is_dir():
        tok = tokmod.load_tokenizer(spec)
    else:
        n = int(spec[4:])
        key = hashlib.sha1(str(Path(data.data_dir).resolve()).encode()).hexdigest()[:10]
        cache = _cache_root() / "tokenizers" / f"{Path(data.data_dir).name}-{key}-bpe{n}"
        if info.is_main and not (cache.is_dir() and any(cache.iterdir())):
            log.info("training a %d-token BPE tokenizer on %s (cached in %s)", n, data.data_dir,
                     cache)
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            tokmod.train_tokenizer(data.texts(), n).save(str(tmp))
            if cache.exists():
                import shutil
                shutil.rmtree(cache)
            os.replace(tmp, cache)
        _barrier()
        tok = tokmod.load_tokenizer(str(cache))
    if info.is_main:
        tok.save(str(saved))
    _barrier()
    return tok


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- the run ---------------------------------------------------------------------
def _autocast(device: torch.device, dtype: str):
    if dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = dtype == "bfloat16"
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def horizon(cfg: TrainConfig, model: LoopedGPT) -> int:
    """Number of optimizer steps (SPEC 5)."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.flops_budget is not None:
        tokens = cfg.flops_budget / expected_flops_per_token(cfg, model)
    else:
        params = model.num_params(exclude_embedding=cfg.param_basis == "non_embedding")
        tokens = cfg.target_param_data_ratio * params
    return max(1, round(tokens / cfg.total_batch_tokens))


def expected_flops_per_token(cfg: TrainConfig, model: LoopedGPT) -> float:
    """Training FLOPs per token averaged over the loop-count distribution (the loops
    actually run, backward only through the last `backprop_loops`)."""
    sampler = cfg.loop_sampler(model.config.n_loops)
    return sum(p * model.estimate_flops(n, cfg.grad_loops)
               for n, p in sampler.distribution().items())


def check_batch(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    """Gradient-accumulation steps; a clear error when the batch does not divide."""
    per_pass = cfg.device_batch_size * seq_len * world_size
    if cfg.total_batch_tokens % per_pass:
        fits = _batch_sizes_that_fit(cfg.total_batch_tokens, seq_len, world_size,
                                     below=cfg.device_batch_size)
        fix = (f"pass --device_batch_size={fits[0]}" if fits else
               f"pass --total_batch_tokens={per_pass} (or a multiple)")
        raise ConfigError(
            f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by device_batch_size "
            f"x sequence_len x world_size = {cfg.device_batch_size} x {seq_len} x {world_size} "
            f"= {per_pass}: {fix}")
    return cfg.total_batch_tokens // per_pass


def _batch_sizes_that_fit(total_batch_tokens: int, seq_len: int, world_size: int, *,
                          below: int) -> list[int]:
    """Device batch sizes < `below` (largest first) whose pass divides the global batch."""
    return [b for b in range(below - 1, 0, -1)
            if total_batch_tokens % (b * seq_len * world_size) == 0]


def out_of_memory_message(exc: BaseException, cfg: TrainConfig, model_cfg: ModelConfig,
                          step: int, last_saved: int | None, world_size: int = 1) -> str:
    """One line for an out-of-memory error: what was asked for (when known), what to change."""
    asked = re.search(r"(?:[Tt]ried to allocate|[Uu]nable to allocate) ([\d.]+ ?[KMGTP]?i?B)",
                      str(exc))
    fits = _batch_sizes_that_fit(cfg.total_batch_tokens, cfg.sequence_len or
                                 model_cfg.sequence_len, world_size, below=cfg.device_batch_size)
    fixes = [f"--device_batch_size={fits[0]}" if fits else "a smaller --device_batch_size"]
    if not cfg.activation_checkpointing:
        fixes.append("--activation_checkpointing=true")
    if model_cfg.loss_loops != "last":
        fixes.append("--model.loss_loops=last")
    kept = f"step_{last_saved:06d}" if last_saved is not None else "none"
    return (f"out of memory at step {step}" + (f" (tried to allocate {asked.group(1)})"
                                               if asked else "")
            + f": try {', '.join(fixes)} (device_batch_size is now {cfg.device_batch_size}; "
            f"gradient accumulation keeps total_batch_tokens); the last checkpoint "
            f"({kept}) is intact")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _new_run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    name = [f"runs/{cfg.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"]
    if info.distributed:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def sample_text(model: LoopedGPT, tokenizer, prompt: str, max_tokens: int, *,
                temperature: float = 0.8, seed: int = 0) -> str:
    """A short sample (KV-cached decoding through loopedlm.infer.generate)."""
    from loopedlm.infer.generate import generate, strip_trailing_spaces

    was_training = model.training
    model.eval()
    prompt = strip_trailing_spaces(prompt)
    result = generate(model, prompt, tokenizer=tokenizer, max_tokens=max_tokens,
                      temperature=temperature, seed=seed)
    model.train(was_training)
    return prompt + result.texts[0]


def train(cfg: TrainConfig, *, data=None, tokenizer=None) -> dict[str, Any]:
    """Run (or resume) training; returns the run summary (also in RUN/summary.json).

    `data` (default: Parquet shards in `cfg.data_dir`) must offer `loader(tokenizer,
    batch_size, seq_len, *, split, rank, world_size, device, loop)` and, for BPE
    training, `texts()` and `data_dir`; `tokenizer` overrides `cfg.tokenizer`.
    """
    info = setup_distributed(cfg.device)
    try:
        return _Trainer(cfg, info, data, tokenizer).run()
    finally:
        cleanup_distributed()


class TrainingCollapsed(RuntimeError):
    """A non-finite loss stopped the run (the last good checkpoint is kept)."""


class TrainingOutOfMemory(RuntimeError):
    """The device (or host) ran out of memory; the last checkpoint is kept."""


class _TerminationRequest:
    """SIGTERM (what schedulers send before they kill a job) only sets a flag: the loop
    saves a checkpoint at the end of the current step and stops cleanly."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave SIGTERM alone
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, info: DistInfo) -> bool:
        """True when any rank received SIGTERM (every rank must stop at the same step)."""
        if not info.distributed:
            return self.received
        flag = torch.tensor([float(self.received)], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo, data, tokenizer):
        self.cfg, self.info = cfg, info
        # --- every check that needs no compute, first ---
        draft = cfg.model_config()
        self.seq_len = cfg.sequence_len or draft.sequence_len
        if self.seq_len > draft.sequence_len:
            raise ConfigError(f"sequence_len={self.seq_len} is longer than the model's "
                              f"sequence_len={draft.sequence_len}: at most that")
        self.grad_accum = check_batch(cfg, self.seq_len, info.world_size)
        self.run_dir = _new_run_dir(cfg, info)
        self.resume_from = None
        if cfg.resume:
            self.resume_from = latest_training_checkpoint(self.run_dir)
            if self.resume_from is None:
                raise FileNotFoundError(f"resume=true but {self.run_dir}/checkpoints holds no "
                                        "complete training checkpoint")
            saved_model = json.loads((self.resume_from / "config.json").read_text())["model"]
            self._check_same_model(draft, saved_model, compare_vocab=False)
        elif any((self.run_dir / "checkpoints").glob("step_*")):
            raise ValueError(f"run_dir={str(self.run_dir)!r} already holds checkpoints: pass "
                             "--resume to continue it or choose another run_dir")
        # --- data, tokenizer, final model config ---
        if data is None:
            # rank 0 prepares the bundled corpus (if needed) before the others look at it
            data = ParquetData(cfg.data_dir) if info.is_main else None
            _barrier()
            data = data or ParquetData(cfg.data_dir)
        self.data = data
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        self.tokenizer = tokenizer if tokenizer is not None else resolve_tokenizer(
            cfg.tokenizer, draft.vocab_size, self.data, self.run_dir, info)
        self.model_cfg = cfg.model_config(vocab_size=self.tokenizer.vocab_size)
        if self.model_cfg.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the "
                              f"tokenizer's {self.tokenizer.vocab_size}")
        if self.resume_from is not None:
            self._check_same_model(self.model_cfg, saved_model, compare_vocab=True)

    def _check_same_model(self, model_cfg: ModelConfig, saved: dict[str, Any],
                          compare_vocab: bool) -> None:
        mine = model_cfg.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)!r} != config {mine[k]!r}" for k in mine
                if mine[k] != saved.get(k) and (compare_vocab or k != "vocab_size")]
        if diff:
            raise ConfigError(f"cannot resume {self.run_dir}: the model config differs from the "
                              f"checkpoint's ({'; '.join(diff)})")

    # ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        device = info.device
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model = LoopedGPT.from_config(self.model_cfg, device=device, seed=cfg.seed)
        self.raw_model = model
        total_steps = horizon(cfg, model)
        optimizer = LoopedOptimizer(model, cfg.optim, zero=cfg.zero)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        sampler = cfg.loop_sampler(self.model_cfg.n_loops)
        train_model = model.compile_blocks() if cfg.compile else model  # regional compile
        train_model = wrap_ddp(train_model, info)
        autocast = _autocast(device, cfg.dtype)
        loader = self.data.loader(self.tokenizer, cfg.device_batch_size, self.seq_len,
                                  split="train", rank=info.rank, world_size=info.world_size,
                                  device=device)
        detector = CollapseDetector(cfg.collapse)
        start_step, elapsed_before = 0, 0.0
        if self.resume_from is not None:
            start_step, elapsed_before = self._restore(model, optimizer, loader, detector)
        if info.is_main:
            atomic_write_json(self.run_dir / "config.json", {
                "train": cfg.to_dict(), "model": self.model_cfg.to_dict(),
                "world_size": info.world_size, "total_steps": total_steps,
                "grad_accum_steps": self.grad_accum})
        logger = RunLogger(self.run_dir, resume_step=start_step if self.resume_from else None) \
            if info.is_main else None
        flops_per_token = expected_flops_per_token(cfg, model)
        peak = peak_flops(device)
        watched = watched_parameters(model)
        token_bytes = self.tokenizer.token_bytes()
        if info.is_main:
            log.info("model: %s, %d params, %.3g training FLOPs/token (%s%s, every loop run "
                     "counted); %d steps of %d tokens (%d x %d x %d ranks x %d accumulation)",
                     self.model_cfg.loop_mode, model.num_params(), flops_per_token,
                     sampler.describe(), f", backprop through the last {cfg.backprop_loops}"
                     if cfg.backprop_loops else "", total_steps, cfg.total_batch_tokens,
                     cfg.device_batch_size, self.seq_len, info.world_size, self.grad_accum)

        bar, print_every = None, 0
        if info.is_main and cfg.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm
            bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        elif info.is_main and cfg.progress:  # CI, nohup, a pipe: plain lines instead
            print_every = cfg.print_every or max(1, total_steps // 20)
        val_bpb, status, message = None, "completed", ""
        last_saved = start_step if self.resume_from is not None else None
        t_start = time.time()
        step, train_loss = start_step, None
        train_flops = 0.0  # this session's, counting the loops actually run
        memory = PeakMemory(device)
        train_model.train()
        terminate = _TerminationRequest()
        try:
            terminate.install()
            while step < total_steps:
                rates = optimizer.set_step(step, total_steps)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
                # the same N on every rank: a function of (seed, step) only
                n_loops = sampler.sample(cfg.seed, step)
                step_flops_per_token = model.estimate_flops(n_loops, cfg.grad_loops)
                stats = torch.zeros(1 + n_loops, device=device)
                for micro in range(self.grad_accum):
                    inputs, targets = loader.next_batch()
                    sync = contextlib.nullcontext()
                    if info.distributed and micro < self.grad_accum - 1:
                        sync = train_model.no_sync()
                    with sync:
                        with autocast:
                            loss, norms = train_model(inputs, targets, return_residual_norms=True,
                                                      n_loops=n_loops, grad_loops=cfg.grad_loops)
                        (loss / self.grad_accum).backward()
                    stats += torch.cat([loss.detach().float().view(1), norms.float()])
                stats = all_reduce_mean(stats / self.grad_accum)
                train_loss = float(stats[0])
                if not math.isfinite(train_loss):
                    detector.update(step + 1, train_loss)
                    status = "collapsed"
                    message = (f"non-finite training loss ({train_loss}) at step {step + 1}: "
                               f"stopping; the last good checkpoint is "
                               f"{f'step_{last_saved:06d}' if last_saved is not None else 'none'}")
                    log.error(message)
                    break
                norms_before = grad_norms(watched)
                total_norm = None
                if cfg.grad_clip > 0:
                    total_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                      cfg.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t0
                step += 1
                residual_norms = [float(x) for x in stats[1:]]
                events = detector.update(step, train_loss, residual_norms)
                tokens_per_s = cfg.total_batch_tokens / dt
                train_flops += step_flops_per_token * cfg.total_batch_tokens
                if info.is_main:
                    for event in events:
                        log.warning("collapse detector: %s at step %d: %s", event.kind,
                                    event.step, event.detail)
                    if step % cfg.log_every == 0 or step == total_steps or events:
                        record = {"step": step, "loss": train_loss, **rates,
                                  "n_loops": n_loops, "tokens_per_s": tokens_per_s, "dt": dt,
                                  "flops_per_token": step_flops_per_token,
                                  "mfu": mfu(step_flops_per_token, tokens_per_s, peak,
                                             info.world_size),
                                  "grad_norm": total_norm,
                                  **{f"grad_norm/{k}": v for k, v in norms_before.items()},
                                  "residual_norm": residual_norms,
                                  "tokens": step * cfg.total_batch_tokens}
                        if events:
                            record["collapse_flags"] = [e.to_dict() for e in events]
                        logger.write(record)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:.0f}",
                                        **({"val_bpb": f"{val_bpb:.3f}"} if val_bpb else {}))
                    if print_every and (step % print_every == 0 or step == total_steps):
                        spent = time.time() - t_start
                        left = spent / (step - start_step) * (total_steps - step)
                        log.info("step %d/%d  loss %.4f  %.0f tokens/s  elapsed %s  left %s",
                                 step, total_steps, train_loss, tokens_per_s, _duration(spent),
                                 _duration(left))
                last = step == total_steps
                if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                    val_bpb, val_tokens = self._evaluate(model, token_bytes, autocast)
                    if info.is_main:
                        logger.write({"step": step, "val_bpb": val_bpb, "val_tokens": val_tokens})
                        (log.debug if bar is not None else log.info)(
                            "step %d/%d  val bpb %.4f (%d tokens)", step, total_steps, val_bpb,
                            val_tokens)
                if info.is_main and cfg.sample_every and step % cfg.sample_every == 0 and not last:
                    text = sample_text(model, self.tokenizer, cfg.sample_prompt,
                                       cfg.sample_tokens, seed=cfg.seed)
                    logger.write({"step": step, "sample": text})
                if (cfg.save_every and step % cfg.save_every == 0) or last:
                    self._save(step, model, optimizer, loader, detector,
                               elapsed_before + time.time() - t_start)
                    last_saved = step
                if not last and terminate.agreed(info):
                    if last_saved != step:
                        self._save(step, model, optimizer, loader, detector,
                                   elapsed_before + time.time() - t_start)
                        last_saved = step
                    status = "interrupted"
                    message = (f"SIGTERM at step {step}: saved checkpoint step_{step:06d}; "
                               f"continue with --run_dir={self.run_dir} --resume")
                    log.warning(message)
                    break
        except (torch.OutOfMemoryError, MemoryError) as exc:
            status = "out_of_memory"
            message = out_of_memory_message(exc, cfg, self.model_cfg, step + 1, last_saved,
                                            info.world_size)
            log.debug("out of memory", exc_info=True)
        finally:
            terminate.restore()
            if bar is not None:
                bar.close()

        wall = time.time() - t_start
        summary = {"status": status, "message": message, "step": step,
                   "total_steps": total_steps, "final_loss": train_loss, "val_bpb": val_bpb,
                   "wall_time_s": wall, "total_wall_time_s": elapsed_before + wall,
                   "tokens": step * cfg.total_batch_tokens, "collapse": detector.summary(),
                   "run_dir": str(self.run_dir), "params": model.num_params(),
                   "flops_per_token": flops_per_token, "session_train_flops": train_flops,
                   "loop_sampling": cfg.loop_sampling, "backprop_loops": cfg.backprop_loops,
                   **memory.summary()}
        if info.is_main:
            if status == "completed":
                summary["sample"] = sample_text(model, self.tokenizer, cfg.sample_prompt,
                                                cfg.sample_tokens, seed=cfg.seed)
                logger.write({"step": step, "sample": summary["sample"]})
            atomic_write_json(self.run_dir / "summary.json", summary)
            logger.close()
        _barrier()
        if status == "collapsed":
            raise TrainingCollapsed(message)
        if status == "out_of_memory":
            raise TrainingOutOfMemory(message)
        return summary

    def _evaluate(self, model: LoopedGPT, token_bytes: torch.Tensor, autocast
                  ) -> tuple[float, int]:
        """Validation (bpb, counted target tokens): the first `eval_tokens` of the val split
        in (device_batch_size, sequence_len) batches; `loopedlm eval` of the checkpoint
        reads the same batches by default."""
        cfg, info = self.cfg, self.info
        loader = self.data.loader(self.tokenizer, cfg.device_batch_size, self.seq_len,
                                  split="val", rank=info.rank, world_size=info.world_size,
                                  device=info.device, loop=False)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * self.seq_len * info.world_size))
        model.eval()
        result = evaluate_bpb(model, loader, token_bytes, steps, autocast=autocast,
                              details=True)
        model.train()
        return result["bpb"], result["tokens"]

    def _save(self, step: int, model, optimizer: LoopedOptimizer, loader,
              detector: CollapseDetector, elapsed: float) -> None:
        optimizer.consolidate()
        loader_states = _gather(loader.state_dict(), self.info)
        rng_states = _gather(_rng_state(), self.info) if self.info.distributed else [_rng_state()]
        if self.info.is_main:
            save_training_checkpoint(
                self.run_dir, step, model,
                meta={"train": self.cfg.to_dict(), "step": step},
                tensor_state={"optimizer": optimizer.state_dict(), "rng": rng_states},
                json_state={"step": step, "loader": loader_states, "elapsed_s": elapsed,
                            "world_size": self.info.world_size,
                            "collapse": detector.state_dict()},
                keep_last=self.cfg.keep_last or None)
        _barrier()

    def _restore(self, model, optimizer: LoopedOptimizer, loader,
                 detector: CollapseDetector) -> tuple[int, float]:
        weights, tensors, meta = load_training_state(self.resume_from, device=self.info.device)
        if meta["world_size"] != self.info.world_size:
            raise ValueError(f"checkpoint {self.resume_from} was written by {meta['world_size']} "
                             f"process(es); resume with the same number (got "
                             f"{self.info.world_size}) so that every rank gets its data position")
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(tensors["optimizer"])
        loader.load_state_dict(meta["loader"][self.info.rank])
        _set_rng_state(tensors["rng"][self.info.rank if len(tensors["rng"]) > 1 else 0])
        detector.load_state_dict(meta["collapse"])
        if self.info.is_main:
            log.info("resumed %s at step %d", self.resume_from, meta["step"])
        return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


# ---- command line -----------------------------------------------------------------
def settings_help(cfg: TrainConfig | None = None, source: str = "") -> str:
    """Every setting with its value in `cfg` (default: the built-in defaults) as
    `--key=value` lines."""
    cfg = cfg or TrainConfig()
    lines = [f"settings ({source or 'built-in defaults'}):"]
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "optim", "collapse"):
            continue
        lines.append(f"  --{f.name}={getattr(cfg, f.name)!r}")
    for section in ("optim", "collapse"):
        part = getattr(cfg, section)
        lines += [f"  --{section}.{f.name}={getattr(part, f.name)!r}"
                  for f in dataclasses.fields(part)]
    try:
        model = cfg.model_config().to_dict()
    except (ValueError, TypeError):
        model = {}
    lines += [f"  --model.{k}={v!r}" for k, v in model.items()]
    lines.append("  (--model.vocab_size follows the tokenizer unless set; booleans take "
                 f"true/false, {BOOL_SPELLINGS})")
    return "\n".join(lines)


PRINT_CONFIG_FLAGS = ("--print-config", "--print_config", "--dry-run", "--dry_run")
HELP_FLAGS = ("-h", "--help")


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """What a run of `cfg` will use: the train settings and the model (its preset with the
    [model] overrides; vocab_size follows the tokenizer unless set)."""
    return {"train": cfg.to_dict(), "model": cfg.model_config().to_dict()}


def run_cli(args: list[str]) -> int:
    """Parse `[RECIPE] --key=value ...`, train, print the final BPB and a sample.

    Exit codes: 0 done (or stopped by SIGTERM after saving), 2 bad input, 3 collapsed
    (non-finite loss), 4 out of memory, 5 a checkpoint could not be written."""
    settings = [a for a in args if a not in HELP_FLAGS + PRINT_CONFIG_FLAGS]
    if any(a in HELP_FLAGS for a in args):
        print(__doc__)
        recipe, overrides = parse_overrides(settings)
        try:
            print(settings_help(build_config(recipe, overrides),
                                f"recipe {recipe or 'tiny'}" + (" + your overrides"
                                                                if overrides else "")))
        except (ValueError, FileNotFoundError) as exc:
            print(f"({exc}; showing the built-in defaults)\n{settings_help()}")
        return 0
    recipe, overrides = parse_overrides(settings)
    cfg = build_config(recipe, overrides)
    if len(settings) < len(args):  # --print-config / --dry-run
        print(json.dumps(resolved_config(cfg), indent=2))
        return 0
    try:
        summary = train(cfg)
    except TrainingCollapsed as exc:
        print(f"training collapsed: {exc}", file=sys.stderr)
        return 3
    except TrainingOutOfMemory as exc:
        print(f"loopedlm train: error: {exc}", file=sys.stderr)
        return 4
    except CheckpointSaveError as exc:
        print(f"loopedlm train: error: {exc}", file=sys.stderr)
        return 5
    if int(os.environ.get("RANK", "0")) == 0:
        minutes = summary["wall_time_s"] / 60
        print(f"run folder: {summary['run_dir']}")
        print(f"steps: {summary['step']}  wall time: {minutes:.1f} min  "
              f"collapse check: {summary['collapse']['status']}")
        if summary["status"] == "interrupted":
            print(summary["message"])
            return 0
        print(f"final validation bits-per-byte: {summary['val_bpb']:.4f}")
        print(f"sample: {summary.get('sample', '')!r}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return run_cli(args.settings)


def register(subparsers) -> None:
    # '+' as the option prefix: every `--key=value` reaches `settings` untouched (argparse
    # would reject them as unknown options); -h/--help is handled by run_cli.
    parser = subparsers.add_parser(
        "train", help="train a looped model (recipe + --key=value overrides)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        prefix_chars="+", add_help=False)
    parser.add_argument("settings", nargs="*",
                        help="[RECIPE] [--key=value ...] [--model.KEY=VALUE ...] "
                             "[--optim.KEY=VALUE ...]")
    parser.set_defaults(func=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run_cli(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"loopedlm train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
