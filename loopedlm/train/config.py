"""The training configuration: `TrainConfig`, the recipes it is read from, and the
`--key=value` overrides on top (the syntax is loopedlm.common.overrides).

Configuration is three sections, each a validated dataclass:
  top level  `TrainConfig`           --steps=200          TOML: steps = 200
  [model]    `ModelConfig` overrides --model.n_loops=6    TOML: [model] n_loops = 6
  [optim]    `OptimConfig`           --optim.lr_scale=2   TOML: [optim] lr_scale = 2.0
  [collapse] `CollapseThresholds`    --collapse.spike_ratio=1
`--n-loops N` is the shorthand of `--model.n_loops=N` (the loop count has one spelling on
every command). A recipe (`recipes/NAME.toml` or a path) is read first, then the overrides
(`build_config`). The model starts from `preset` and the [model] section overrides its fields.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopedlm.common.overrides import (
    BOOL_SPELLINGS,
    coerce_fields,
    merge,
    parse_overrides,
)
from loopedlm.common.paths import RECIPE_DIRS
from loopedlm.common.validation import (
    ConfigError,
    check,
    check_choice,
    close_match,
    is_int,
    is_number,
    not_allowed,
    unknown_setting,
)
from loopedlm.model.config import PRESETS, ModelConfig
from loopedlm.model.head_loss import HEAD_BACKENDS
from loopedlm.train.collapse import CollapseThresholds
from loopedlm.train.loop_sampling import LoopSampling
from loopedlm.train.optim import OptimConfig

DTYPES = ("auto", "float32", "bfloat16")
PARAM_BASES = ("all", "non_embedding")
# the dotted sections of the settings, and the dataclass each one builds
SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "collapse": CollapseThresholds}
# `--n-loops N` (every command's spelling of the loop count) is `--model.n_loops=N`
SHORTHANDS = {"n_loops": "model.n_loops"}


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
    # "" -> the bundled corpus (loopedlm.data.corpus.default_data_dir()); "synthetic:TASK" ->
    # a synthetic reasoning task with its default settings (loopedlm.data.synthetic)
    data_dir: str = ""
    # "auto" (the data folder's own tokenizer/, else qwen3 or a BPE by the model's vocab size)
    # | "qwen3" | "bpe" | "bpe:VOCAB" | a saved tokenizer folder
    tokenizer: str = "auto"
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
    compile: bool = False  # regional: the blocks, and the head's chunk body
    head_loss: str = "chunked"  # "chunked" (fp32 accumulation) | "cce" (opt-in, CUDA)
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
        """Raise ConfigError naming the first setting whose value is not allowed."""
        for name in ("run_dir", "data_dir", "tokenizer", "sample_prompt"):
            check(isinstance(getattr(self, name), str), name, getattr(self, name), "a string")
        check_choice("preset", self.preset, tuple(PRESETS))
        check(isinstance(self.model, dict), "model", self.model, "a table of ModelConfig fields")
        self._validate_tokenizer()
        self._validate_counts()
        check(self.param_basis in PARAM_BASES, "param_basis", self.param_basis,
              f"one of {list(PARAM_BASES)}")
        check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {list(DTYPES)}")
        check(self.head_loss in HEAD_BACKENDS, "head_loss", self.head_loss,
              f"one of {list(HEAD_BACKENDS)} (cce: cut-cross-entropy, CUDA only)")
        check(is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip,
              "a number >= 0 (0 disables clipping)")
        for name in ("resume", "compile", "activation_checkpointing", "zero", "progress"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name),
                  f"true or false ({BOOL_SPELLINGS})")
        check(isinstance(self.device, str), "device", self.device,
              "'auto', 'cpu', 'cuda' or 'cuda:N'")
        self._validate_loops()

    def _validate_tokenizer(self) -> None:
        tok = self.tokenizer
        check(tok in ("auto", "qwen3", "bpe") or tok.startswith("bpe:") or Path(tok).is_dir(),
              "tokenizer", tok, "'auto', 'qwen3', 'bpe', 'bpe:VOCAB' or a saved tokenizer folder")
        if tok.startswith("bpe:"):
            check(tok[4:].isdigit() and int(tok[4:]) >= 256, "tokenizer", tok,
                  "'bpe:VOCAB' with an integer VOCAB >= 256")

    def _validate_counts(self) -> None:
        """The sizes, intervals and the horizon."""
        for name in ("total_batch_tokens", "device_batch_size", "eval_tokens", "sample_tokens",
                     "log_every"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, value, "an integer >= 1")
        for name in ("eval_every", "sample_every", "save_every", "seed", "keep_last",
                     "print_every"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0, name, value, "an integer >= 0")
        for name in ("sequence_len", "steps"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value >= 1), name, value,
                  "an integer >= 1 (or unset)")
        check(is_number(self.target_param_data_ratio) and self.target_param_data_ratio > 0,
              "target_param_data_ratio", self.target_param_data_ratio, "a number > 0")
        check(self.flops_budget is None or (is_number(self.flops_budget)
                                            and self.flops_budget > 0),
              "flops_budget", self.flops_budget, "a number > 0 (or unset)")
        if self.steps is not None and self.flops_budget is not None:
            raise ConfigError(f"steps={self.steps} and flops_budget={self.flops_budget} "
                              "contradict each other: set one horizon")

    def _validate_loops(self) -> None:
        check(is_int(self.backprop_loops) and self.backprop_loops >= 0, "backprop_loops",
              self.backprop_loops, "an integer >= 0 (0 = all loops)")
        model = self.model_config()
        sampler = self.loop_sampler(model.n_loops)
        if self.backprop_loops > sampler.max_loops:
            raise not_allowed("backprop_loops", self.backprop_loops,
                              f"at most the largest loop count, {sampler.max_loops} "
                              f"(loop_sampling={self.loop_sampling!r}: {sampler.describe()})")
        if self.backprop_loops and model.loop_mode == "lt":
            # LT reads the embedding in loop 1 only: cut there, wte would never learn
            raise ConfigError(f"backprop_loops={self.backprop_loops} is not allowed with "
                              "model.loop_mode='lt' (the input enters loop 1 only, so the "
                              "embedding would get no gradient): use 0, or a mode that "
                              "re-injects the input (lti, ltai, flt_res, flt)")

    def loop_sampler(self, n_loops: int) -> LoopSampling:
        """The parsed `loop_sampling` ("fixed" uses `n_loops`, the model's loop count)."""
        return LoopSampling.parse(self.loop_sampling, n_loops)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The preset with the [model] overrides (and the tokenizer's vocabulary size
        unless [model] sets one)."""
        overrides = dict(self.model)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return ModelConfig.preset(self.preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- recipes and overrides ----------------------------------------------------------
def _build_section(cls, data: dict[str, Any], section: str):
    _check_keys(cls, data, section)
    return cls(**coerce_fields(cls, data, section))


def _check_keys(cls, data: dict[str, Any], section: str | None) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise unknown_setting(key, known, section)


def check_setting_names(settings: dict[str, Any]) -> None:
    """Raise ConfigError naming the first setting (top level or in a section) that
    `TrainConfig` does not have, with the closest name."""
    _check_keys(TrainConfig, settings, None)
    for section, cls in SECTIONS.items():
        if isinstance(settings.get(section), dict):
            _check_keys(cls, settings[section], section)


def parse_train_args(args: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """`[RECIPE] [--key=value | --flag ...]` -> (recipe, nested overrides)."""
    return parse_overrides(args, sections=tuple(SECTIONS), positional="recipe",
                           shorthands=SHORTHANDS)


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
    hint = close_match(name, names)
    raise FileNotFoundError(f"no recipe {name!r}: choose one of {names} or give a .toml path"
                            + (f" (did you mean {hint!r}?)" if hint else ""))


def _base_settings(recipe: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's saved train settings when resuming an existing run, else the recipe's."""
    if overrides.get("resume") and overrides.get("run_dir"):
        saved = Path(overrides["run_dir"]) / "config.json"
        if saved.exists():
            data = json.loads(saved.read_text())["train"]
            if data:
                return data
    path = find_recipe(recipe or "tiny")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None


def build_config(recipe: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- recipe TOML <- overrides. With `resume` and an existing
    RUN/config.json, the saved run config replaces the recipe as the base."""
    overrides = overrides or {}
    data = merge(_base_settings(recipe, overrides), overrides)
    _check_keys(TrainConfig, data, None)
    if not isinstance(data.get("model", {}), dict):
        raise ConfigError("model must be a table of ModelConfig fields")
    _check_keys(ModelConfig, data.get("model", {}), "model")
    sections = {k: v for k, v in data.items() if k in SECTIONS}
    values = coerce_fields(TrainConfig, {k: v for k, v in data.items() if k not in SECTIONS})
    values.update(sections)
    values["model"] = coerce_fields(ModelConfig, sections.get("model", {}), "model")
    return TrainConfig(**values)


__all__ = ["TrainConfig", "DTYPES", "PARAM_BASES", "SECTIONS", "SHORTHANDS", "check_setting_names",
           "parse_train_args", "find_recipe", "build_config"]
