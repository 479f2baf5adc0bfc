"""Public looped models' Hugging Face folders (docs/public_models.md): Ouro's (`model_type`
"ouro") and Huginn's ("huginn_raven") load as a `LoopedGPT` of the matching backbone
(`loopedlm.model.backbones`).

A folder holds `config.json` (the model's own field names), the weights in
`model.safetensors` or shards listed in `model.safetensors.index.json`, and the tokenizer
(`tokenizer.json`, `tokenizer_config.json`). `public_config` translates the config and
rejects, in one line, any value loopedlm does not run (a RoPE scaling type, sliding
windows, another activation); `load_public_model` maps every weight by name
(`WEIGHT_MAPS`: a table of patterns) and names any weight that is unmapped or missing.
Tensors are read one at a time from the memory-mapped files, in their stored dtype unless
another is asked for: no fp32 copy of a bf16 checkpoint is made.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loopedlm.model.backbones import BACKBONES
from loopedlm.model.config import ModelConfig
from loopedlm.model.gpt import LoopedGPT, tied_keys

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded: {"weight_map": {name: file}}


class PublicModelError(ValueError):
    """A Hugging Face folder that loopedlm cannot run as it is; the message is one line."""


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PublicModelError(f"{folder} has no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublicModelError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PublicModelError(f"{path} is not a JSON object")
    return data


def supported_model_types() -> list[str]:
    """The `model_type`s loopedlm imports (one per public backbone)."""
    return sorted(spec.hf_model_type for spec in BACKBONES.values() if spec.hf_model_type)


def public_model_type(path: str | Path, *, others: tuple[str, ...] | None = None) -> str | None:
    """The `model_type` of a public looped model's folder, or None for any other path. With
    `others` (the model_types another loader takes), a Hugging Face folder of any other
    model_type is a PublicModelError naming it and the supported ones."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type in supported_model_types():
        return model_type
    if others is not None and model_type is not None and model_type not in others:
        raise PublicModelError(f"{path}: model_type={model_type!r} is not a looped model "
                               f"loopedlm runs: supported are {supported_model_types()} (and "
                               f"loopedlm's own checkpoints)")
    return None


# ---- configs -----------------------------------------------------------------------------------
def _unsupported(name: str, value: Any, allowed: str) -> PublicModelError:
    return PublicModelError(f"{name}={value!r} is not supported: {allowed}")


def _rope_settings(hf: dict[str, Any]) -> float:
    """RoPE theta, from `rope_theta` (transformers 4) or `rope_parameters` (transformers 5);
    any RoPE type but the default is refused (their scaling changes the frequencies)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source, name in ((params, "rope_parameters"), (scaling, "rope_scaling")):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type != "default":
            raise _unsupported(f"{name}.rope_type", rope_type, "'default' (no RoPE scaling)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _attention_shape(hf: dict[str, Any]) -> tuple[int, int, int]:
    d, n_head = hf["hidden_size"], hf["num_attention_heads"]
    n_kv_head = hf.get("num_key_value_heads") or n_head
    head_dim = hf.get("head_dim")
    if head_dim not in (None, d // n_head) or d % n_head:
        raise _unsupported("head_dim", head_dim, f"hidden_size / num_attention_heads = "
                                                 f"{d / n_head:g}")
    return d, n_head, n_kv_head


def ouro_config(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of an Ouro `config.json` (their `OuroConfig` field names)."""
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf]
    if missing:
        raise PublicModelError(f"it lacks the Ouro field(s) {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "'silu'")
    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise _unsupported("use_sliding_window", True, "false (full attention in every layer)")
    if hf.get("tie_word_embeddings", False):
        raise _unsupported("tie_word_embeddings", True, "false (Ouro's own checkpoints)")
    if hf.get("attention_bias", False):
        raise _unsupported("attention_bias", True, "false")
    d, n_head, n_kv_head = _attention_shape(hf)
    return ModelConfig(
        backbone="ouro", loop_mode="lt", vocab_size=hf["vocab_size"], pad_vocab_to=1,
        sequence_len=hf.get("max_position_embeddings", 32768), depth=hf["num_hidden_layers"],
        d_model=d, n_head=n_head, n_kv_head=n_kv_head, mlp_hidden=hf["intermediate_size"],
        n_loops=hf.get("total_ut_steps", 4), rope_base=_rope_settings(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), softcap=None)


def huginn_config(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Huginn `config.json` (their `RavenConfig` field names). Their
    `state_init` "like-init" (what their code does) is a random initial state, "zero" zeros."""
    missing = [k for k in ("vocab_size", "n_embd", "n_heads", "intermediate_size",
                           "n_layers_in_prelude", "n_layers_in_recurrent_block",
                           "n_layers_in_coda") if k not in hf]
    if missing:
        raise PublicModelError(f"it lacks the Huginn field(s) {missing}")
    fixed = {"injection_type": "linear", "block_class_name": "SandwichBlock",
             "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "bias": False,
             "test_time_noise": 0}
    for name, allowed in fixed.items():
        if hf.get(name, allowed) != allowed:
            raise _unsupported(name, hf[name], repr(allowed))
    state_inits = {"like-init": "random", "zero": "zeros"}
    state_init = hf.get("state_init", "like-init")
    if state_init not in state_inits:
        raise _unsupported("state_init", state_init, f"one of {list(state_inits)}")
    d, n_head = hf["n_embd"], hf["n_heads"]
    n_kv_head = hf.get("num_key_value_heads") or n_head
    qk_bias = hf.get("qk_bias", True)
    if d % n_head or (qk_bias and n_kv_head != n_head):
        raise _unsupported("num_key_value_heads", n_kv_head,
                           f"n_heads={n_head} (their query/key bias has n_heads heads), "
                           f"which divides n_embd={d}")
    layers = (hf["n_layers_in_prelude"], hf["n_layers_in_recurrent_block"],
              hf["n_layers_in_coda"])
    if hf.get("n_layers", sum(layers)) != sum(layers):
        raise _unsupported("n_layers", hf["n_layers"], f"prelude + recurrent + coda = {sum(layers)}")
    return ModelConfig(
        backbone="huginn", loop_mode="lt", vocab_size=hf["vocab_size"], pad_vocab_to=1,
        sequence_len=hf.get("block_size", 4096), depth=layers[1], n_prelude=layers[0],
        n_coda=layers[2], d_model=d, n_head=n_head, n_kv_head=n_kv_head,
        mlp_hidden=hf["intermediate_size"], n_loops=hf.get("mean_recurrence", 32),
        rope_base=float(hf.get("rope_base", 50000.0)), norm_eps=hf.get("norm_eps", 1e-6),
        softcap=None, tie_embeddings=hf.get("tie_embeddings", True), qk_bias=qk_bias,
        state_init=state_inits[state_init])


# ---- weights -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightRule:
    """Their weights whose names match `pattern` (a regex; groups are non-nested) become
    ours: `targets` (`re` templates using the groups), holding `split(tensor, config)`, one
    tensor per target (default: the tensor itself, for one target)."""

    pattern: str
    targets: tuple[str, ...]
    split: Callable[[torch.Tensor, ModelConfig], tuple[torch.Tensor, ...]] | None = None

    def our_names(self, name: str) -> list[str] | None:
        """Our names for their weight `name`, or None when the rule does not match it."""
        match = re.fullmatch(self.pattern, name)
        return None if match is None else [match.expand(t) for t in self.targets]

    def their_name(self, ours: str) -> str | None:
        """Their name of the weight that gives our weight `ours`, or None."""
        group_patterns = re.findall(r"\(([^()]*)\)", self.pattern)
        for target in self.targets:
            parts = re.split(r"\\(\d)", target)  # literal, group number, literal, ...
            regex = "".join(re.escape(part) if i % 2 == 0
                            else f"(?P<g{part}>{group_patterns[int(part) - 1]})"
                            for i, part in enumerate(parts))
            match = re.fullmatch(regex, ours)
            if match is None:
                continue
            values = iter([match.group(f"g{n}") for n in range(1, len(group_patterns) + 1)])
            name = re.sub(r"\([^()]*\)", lambda _, v=values: next(v), self.pattern)
            return re.sub(r"\\(.)", r"\1", name)  # unescape the regex's literals
        return None


def rename(pattern: str, target: str) -> WeightRule:
    """A weight stored as it is, under another name."""
    return WeightRule(pattern, (target,))


_OURO_LAYER = r"model\.layers\.(\d+)\."
_OURS = r"transformer.h.\1."
OURO_WEIGHTS = [
    rename(r"model\.embed_tokens\.weight", "transformer.wte.weight"),
    *(rename(_OURO_LAYER + fr"self_attn\.{theirs}_proj\.weight", _OURS + f"attn.{ours}.weight")
      for theirs, ours in (("q", "c_q"), ("k", "c_k"), ("v", "c_v"), ("o", "c_proj"))),
    *(rename(_OURO_LAYER + fr"mlp\.{theirs}_proj\.weight", _OURS + f"mlp.{ours}.weight")
      for theirs, ours in (("gate", "c_gate"), ("up", "c_up"), ("down", "c_proj"))),
    # the sandwich: input_layernorm(_2) around attention, post_attention_layernorm(_2) the MLP
    *(rename(_OURO_LAYER + fr"{theirs}\.weight", _OURS + f"{ours}.weight")
      for theirs, ours in (("input_layernorm", "attn_norm"), ("input_layernorm_2", "attn_out_norm"),
                           ("post_attention_layernorm", "mlp_norm"),
                           ("post_attention_layernorm_2", "mlp_out_norm"))),
    rename(r"model\.norm\.weight", "transformer.ln_f.weight"),
    rename(r"model\.early_exit_gate\.(weight|bias)", r"exit_gate.\1"),
    rename(r"lm_head\.weight", "lm_head.weight"),
]


def _rope_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """The row order that turns RoPE on interleaved pairs (x0, x1), (x2, x3), ... (Huginn's)
    into RoPE on halves (rotate_half's): each head's even rows, then its odd rows. Queries
    and keys permuted alike keep every q.k, so attention is unchanged."""
    per_head = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + per_head).reshape(-1)


def _huginn_qkv(w: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Their fused Wqkv ([q; k; v] rows) as c_q, c_k, c_v, RoPE rows permuted."""
    hd = config.head_dim
    q, k, v = w.split([config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd])
    return q[_rope_rows(config.n_head, hd)], k[_rope_rows(config.n_kv_head, hd)], v


def _huginn_qk_bias(b: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Their qk_bias (2, 1, heads, head_dim), added to q and k before RoPE, as the biases of
    c_q and c_k (RoPE rows permuted)."""
    rows = _rope_rows(config.n_head, config.head_dim)
    return b[0].reshape(-1)[rows], b[1].reshape(-1)[rows]


def _huginn_fc(w: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Their fused GatedMLP fc ([gate; up] rows: silu(first half) * second half)."""
    gate, up = w.chunk(2, dim=0)
    return gate, up


def _huginn_block(theirs: str, ours: str) -> list[WeightRule]:
    """The rules of one group of SandwichBlocks (prelude, core_block or coda)."""
    layer, dest = rf"transformer\.{theirs}\.(\d+)\.", rf"transformer.{ours}.\1."
    return [
        *(rename(layer + f"norm_{i}\\.weight", dest + f"{name}.weight") for i, name in
          ((1, "attn_norm"), (2, "attn_out_norm"), (3, "mlp_norm"), (4, "mlp_out_norm"))),
        WeightRule(layer + r"attn\.Wqkv\.weight",
                   tuple(dest + f"attn.{m}.weight" for m in ("c_q", "c_k", "c_v")), _huginn_qkv),
        WeightRule(layer + r"attn\.qk_bias", (dest + "attn.c_q.bias", dest + "attn.c_k.bias"),
                   _huginn_qk_bias),
        rename(layer + r"attn\.proj\.weight", dest + "attn.c_proj.weight"),
        WeightRule(layer + r"mlp\.fc\.weight", (dest + "mlp.c_gate.weight",
                                                 dest + "mlp.c_up.weight"), _huginn_fc),
        rename(layer + r"mlp\.proj\.weight", dest + "mlp.c_proj.weight"),
    ]


HUGINN_WEIGHTS = [
    rename(r"transformer\.wte\.weight", "transformer.wte.weight"),
    *_huginn_block("prelude", "prelude"), *_huginn_block("core_block", "h"),
    *_huginn_block("coda", "coda"),
    rename(r"transformer\.adapter\.weight", "transformer.adapter.weight"),
    rename(r"transformer\.ln_f\.weight", "transformer.ln_f.weight"),
    rename(r"lm_head\.weight", "lm_head.weight"),
    WeightRule(r"freqs_cis", ()),  # their RoPE table (a saved buffer): recomputed
]


@dataclass(frozen=True)
class PublicFamily:
    """One importable family: its config translator and its weight-name table."""

    config: Callable[[dict[str, Any]], ModelConfig]
    weights: list[WeightRule]


FAMILIES: dict[str, PublicFamily] = {
    "ouro": PublicFamily(ouro_config, OURO_WEIGHTS),
    "huginn_raven": PublicFamily(huginn_config, HUGINN_WEIGHTS),
}


def public_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, their config dict) of a public looped model's folder. Another
    `model_type` is one line naming it and the supported ones."""
    folder = Path(path)
    hf = _read_config(folder)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise PublicModelError(f"{folder}: model_type={model_type!r} is not a looped model "
                               f"loopedlm imports: supported are {supported_model_types()}")
    try:
        return FAMILIES[model_type].config(hf), hf
    except PublicModelError as exc:
        raise PublicModelError(f"{folder / CONFIG_FILE}: {exc}") from None
    except (TypeError, KeyError, ValueError) as exc:  # ValueError: ModelConfig's ConfigError
        raise PublicModelError(f"{folder / CONFIG_FILE}: a field has a wrong type or value "
                               f"({exc})") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """Their weight name -> the safetensors file holding it."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PublicModelError(f"{index} is not a safetensors index ({exc})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        raise PublicModelError(f"{folder} has no {WEIGHTS_FILE} and no {WEIGHTS_INDEX}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _listed(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def mapped_weights(folder: str | Path, config: ModelConfig, rules: list[WeightRule],
                   expected: set[str], *, optional: frozenset[str] = frozenset(),
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for every weight of the folder, read one at a time. Before any is
    read, a weight that no rule maps, or one of `expected` that nothing gives, is an error
    naming them (in their names where a rule says what theirs would be). `optional`: ours
    that may be given and are then skipped (a tied LM head stored anyway)."""
    folder = Path(folder)
    files = _weight_files(folder)
    plan: dict[str, tuple[list[str], WeightRule]] = {}
    unmapped = []
    for name in sorted(files):
        rule = next((r for r in rules if r.our_names(name) is not None), None)
        if rule is None:
            unmapped.append(name)
        else:
            plan[name] = (rule.our_names(name), rule)
    if unmapped:
        raise PublicModelError(f"{folder}: {len(unmapped)} weight(s) loopedlm does not know "
                               f"for this model: {_listed(unmapped)}")
    given = {target for targets, _ in plan.values() for target in targets}
    missing = [next((t for t in map(lambda r: r.their_name(ours), rules) if t), ours)
               for ours in sorted(expected - given)]
    extra = sorted(name for name, (targets, _) in plan.items()
                   if any(t not in expected | optional for t in targets))
    if missing or extra:
        what = "; ".join(part for part in (
            f"missing {_listed(sorted(set(missing)))}" if missing else "",
            f"not in this config {_listed(extra)}" if extra else "") if part)
        raise PublicModelError(f"{folder}: the weights do not match its config.json: {what}")
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                targets, rule = plan[name]
                if not set(targets) & expected:
                    continue  # a weight loopedlm recomputes or ties, not read
                tensor = f.get_tensor(name)
                try:
                    parts = (tensor,) if rule.split is None else rule.split(tensor, config)
                except (RuntimeError, ValueError, IndexError) as exc:
                    raise PublicModelError(f"{folder}: {name} of shape {tuple(tensor.shape)} "
                                           f"does not fit its config.json ({exc})") from None
                for target, part in zip(targets, parts, strict=True):
                    yield target, part if dtype is None else part.to(dtype)


def load_public_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[LoopedGPT, dict[str, Any]]:
    """A public looped model's folder as a LoopedGPT (eval mode) and a loopedlm-style meta
    dict: `{"model": ModelConfig fields, "public": {"model_type", "source", ...}}`."""
    folder = Path(path)
    config, hf = public_config(folder)
    with torch.device("meta"):
        model = LoopedGPT(config)
    tied = tied_keys(config)
    expected = set(model.state_dict()) - set(tied)
    state = dict(mapped_weights(folder, config, FAMILIES[hf["model_type"]].weights, expected,
                                optional=frozenset(tied), device=device, dtype=dtype))
    for key, source in tied.items():
        state[key] = state[source]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # a shape that does not match config.json
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line),
                     str(exc).splitlines()[0])
        raise PublicModelError(f"{folder}: {first}") from None
    model.tie_weights()
    model.reset_rotary()
    meta = {"model": config.to_dict(),
            "public": {"model_type": hf["model_type"], "source": str(folder.resolve()),
                       "exit_threshold": hf.get("early_exit_threshold")}}
    return model.eval(), meta


__all__ = ["PublicModelError", "public_model_type", "supported_model_types", "public_config",
           "load_public_model", "mapped_weights", "WeightRule", "rename", "FAMILIES",
           "ouro_config", "huginn_config"]
