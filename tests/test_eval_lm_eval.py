"""The lm-evaluation-harness adapter (lm-eval==0.4.13), with local task definitions (YAML +
local JSONL; the harness's own datasets need the network). Skipped when lm-eval is absent."""

from __future__ import annotations

import json
import os
import random

import pytest
from eval_helpers import ByteTokenizer, tiny_random_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install lm-eval==0.4.13)")

from loopedlm.evaluate.core import evaluate_task  # noqa: E402
from loopedlm.evaluate.items import TaskSpec  # noqa: E402
from loopedlm.evaluate.lm_eval_adapter import LoopedLMEval, greedy_recompute  # noqa: E402

TOK = ByteTokenizer()


def mc_items(n=12, seed=0):
    """Equal-length choices with distinct first characters: then our rule (mean loss over the
    tokens where choices differ) and lm-eval's `acc` (sum log-likelihood of " " + choice)
    must pick the same answer."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        firsts = rng.sample("abcdefgh", 4)
        choices = [f + "".join(rng.choice("xyz") for _ in range(3)) for f in firsts]
        items.append({"query": f"Question {i}: pick one. Answer:", "choices": choices,
                      "gold": rng.randrange(4)})
    return items


def write_task(folder, name, rows, body):
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\n{body}")


def run(tmp_path, adapter, tasks):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=adapter, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tmp_path),
                                                            include_defaults=False))


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(sequence_len=128, seed=5)


def test_multiple_choice_agrees_with_lm_eval(tmp_path, model):
    items = mc_items()
    write_task(tmp_path, "toy_mc", items,
               "output_type: multiple_choice\ndoc_to_text: \"{{query}}\"\n"
               "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\ntarget_delimiter: \" \"\n"
               "metric_list:\n  - metric: acc\n")
    out = run(tmp_path, LoopedLMEval(model=model, tok=TOK, n_loops=3), ["toy_mc"])
    ours = evaluate_task(model, TOK, TaskSpec("toy_mc", "multiple_choice"), items, n_loops=3,
                         return_details=True)
    samples = sorted(out["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for sample, detail, item in zip(samples, ours["details"], items, strict=True):
        lls = [r[0] for r in sample["filtered_resps"]]
        # same chosen answer
        assert max(range(4), key=lambda j: lls[j]) == detail["pred"]
        # same log-likelihood differences: the " " token is common to every choice
        n_tok = len(item["choices"][0])
        for j in range(1, 4):
            assert lls[j] - lls[0] == pytest.approx(
                -(detail["scores"][j] - detail["scores"][0]) * n_tok, abs=1e-3)
    assert out["results"]["toy_mc"]["acc,none"] == pytest.approx(ours["accuracy"])


def test_rolling_loglikelihood_and_generation(tmp_path, model):
    docs = [{"text": "the cat sat on the mat. " * 12}, {"text": "short text"}]
    write_task(tmp_path, "toy_ppl", docs,
               "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
               "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    adapter = LoopedLMEval(model=model, tok=TOK, n_loops=2)
    out = run(tmp_path, adapter, ["toy_ppl"])
    lls = [s["filtered_resps"][0] for s in sorted(out["samples"]["toy_ppl"],
                                                  key=lambda s: s["doc_id"])]
    # lm-eval's rolling windows: each token scored exactly once, each chunk of up to 128
    # targets seeing the 128 tokens before its last target (so the first token sees BOS)
    import torch
    import torch.nn.functional as F
    for doc, ll in zip(docs, lls, strict=True):
        ids = [TOK.bos_id, *TOK.encode(doc["text"])]
        total, start = 0.0, 1
        while start < len(ids):
            end = min(start + 128, len(ids))
            window = ids[max(0, end - 129):end]
            with torch.no_grad():
                logits = model(torch.tensor([window[:-1]]), n_loops=2)[0]
            logp = -F.cross_entropy(logits, torch.tensor(window[1:]), reduction="none")
            total += float(logp[-(end - start):].sum())
            start = end
        assert ll == pytest.approx(total, abs=1e-2)

    class Req:
        def __init__(self, *args):
            self.args = args

    [text] = adapter.generate_until([Req("the cat", {"until": ["\n"], "max_gen_toks": 8})])
    ref = TOK.decode(greedy_recompute(model, [TOK.bos_id, *TOK.encode("the cat")], 8, 2, TOK,
                                      ["\n"]))
    assert text == ref.split("\n")[0]


def test_registered_and_bad_args(model):
    from lm_eval.api.registry import get_model

    assert get_model("loopedlm") is LoopedLMEval
    with pytest.raises(ValueError, match="n_loops"):
        LoopedLMEval(model=model, tok=TOK, n_loops=0)
    with pytest.raises(ValueError, match="path="):
        LoopedLMEval()
