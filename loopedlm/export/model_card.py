"""The README.md model card of an exported model: the architecture and loop mode, the
training data and tokens, the validation BPB, the budget table of `loopedlm eval` when the
run has one, and how to load it. Written from the model and the run's record only (no
dates, no paths of the export), so the same model and record give the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopedlm.evaluate.budget import markdown_table
from loopedlm.model.gpt import LoopedGPT

LOOP_MODE_TEXT = {
    "lt": "Looped Transformer: each loop restarts from the previous loop's output",
    "lti": "Looped Transformer with Input Injection: each loop restarts from "
           "norm(embedding + previous output)",
    "ltai": "Looped Transformer with Attention Injection at the first layer: each loop "
            "restarts from the embedding; the first layer's queries read the previous output",
    "flt_res": "Fully Looped Transformer with residual fusion: each loop restarts from the "
               "embedding; every layer adds the previous output to its stream",
    "flt": "Fully Looped Transformer: each loop restarts from the embedding; every layer's "
           "queries read the previous loop's output (Attention Injection)",
}


def architecture(model: LoopedGPT) -> list[str]:
    cfg = model.config
    attention = ("MLA, latent rank " + str(cfg.kv_rank)) if cfg.attn_type == "mla" else "full"
    heads = f"{cfg.n_head} ({cfg.n_kv_head} key/value)" if cfg.n_kv_head != cfg.n_head \
        else str(cfg.n_head)
    rows = [
        ("loop mode", f"`{cfg.loop_mode}`: {LOOP_MODE_TEXT[cfg.loop_mode]}"),
        ("loops (trained)", f"{cfg.n_loops} (any count runs: `n_loops=`)"),
        ("unique blocks", str(cfg.depth)),
        ("width", str(cfg.d_model)),
        ("heads", heads),
        ("attention", f"{attention}; window pattern `{cfg.window_pattern}`"),
        ("residual scale", f"`{cfg.residual_scale}`"
         + (f" (lambda {cfg.residual_lambda})" if cfg.residual_scale.startswith("lambda") else "")),
        ("loss over loops", f"`{cfg.loss_loops}`"),
        ("vocabulary", f"{cfg.vocab_size:,}"),
        ("context (trained)", f"{cfg.sequence_len:,} tokens"),
        ("parameters", f"{model.num_params():,}"),
    ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def training(tokenizer: Any, record: dict[str, Any]) -> list[str]:
    train = record.get("train") or {}
    data = train.get("data_dir")
    data = "the bundled corpus (`loopedlm data prepare`)" if data == "" else (
        f"`{Path(data).name}`" if data else "unknown")
    lines = [f"- data: {data}"]
    if tokenizer is not None:
        lines.append(f"- tokenizer: `{'qwen3' if tokenizer.name == 'qwen3' else 'trained BPE'}`, "
                     f"{tokenizer.vocab_size:,} tokens")
    if record.get("step") is not None:
        tokens = f", {record['tokens']:,} tokens" if record.get("tokens") is not None else ""
        lines.append(f"- trained: {record['step']:,} steps{tokens}")
    if record.get("val_bpb") is not None:
        lines.append(f"- validation BPB: {record['val_bpb']:.4f} (at step "
                     f"{record['val_bpb_step']:,}, {model_loops_text(train)})")
    return lines


def model_loops_text(train: dict[str, Any]) -> str:
    loops = (train.get("model") or {}).get("n_loops")
    return f"{loops} loops" if loops else "the trained loop count"


def usage(special: Any) -> list[str]:
    lines = ["```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("FOLDER", trust_remote_code=True)',
             'tok = AutoTokenizer.from_pretrained("FOLDER", trust_remote_code=True)',
             'ids = tok("The king said", return_tensors="pt").input_ids  # BOS is added',
             "logits = model(ids, n_loops=6).logits  # any loop count",
             "out = model.generate(ids, n_loops=6, max_new_tokens=40)",
             "```",
             "",
             "lm-evaluation-harness: `lm_eval --model hf --model_args "
             "pretrained=FOLDER,trust_remote_code=True --tasks TASKS`.",
             "`loopedlm sample`, `eval` and `serve` take this folder as they take a run.",
             "",
             "`output_hidden_states=True` returns the input embedding and every loop's output. "
             "The KV cache is a `DynamicCache` with one layer per (loop, block). Needs "
             "`torch` and `transformers` >= 4.56."]
    if special is not None:
        lines += ["",
                  f"Special tokens: BOS `{special.bos}` ({special.bos_id}), which starts every "
                  f"training document, is added by the tokenizer; end-of-text `{special.eos}` "
                  f"({special.eos_id}); padding `{special.pad}` ({special.pad_id}). Generation "
                  f"stops at end-of-text or at BOS, which is how the model ends a document."]
    return lines


def model_card(model: LoopedGPT, tokenizer: Any, special: Any, record: dict[str, Any]) -> str:
    """README.md text for the exported `model` (see the module docstring)."""
    train = record.get("train") or {}
    name = Path(train["run_dir"]).name if train.get("run_dir") else "a loopedlm model"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- loopedlm", "- looped-transformer", "- custom_code", "---", "",
             f"# {name}", "",
             f"A looped transformer language model trained with loopedlm: {model.config.depth} "
             f"unique blocks run {model.config.n_loops} times in loop mode "
             f"`{model.config.loop_mode}`. Load it with `trust_remote_code=True` (the model code "
             "is in this folder and needs only torch and transformers).", "",
             "## Architecture", "", *architecture(model), "",
             "## Training", "", *training(tokenizer, record), ""]
    if record.get("budget"):
        lines += ["## Loop budget (`loopedlm eval`)", "",
                  "The same weights evaluated at several loop counts N.", "",
                  markdown_table(record["budget"]).rstrip("\n"), ""]
    lines += ["## Use", "", *usage(special), ""]
    return "\n".join(lines)


__all__ = ["model_card"]
