"""The CORE evaluator: each scoring rule on hand-made examples, an oracle scores 100%, a
random model scores each task type's random baseline, few-shot sampling, bundles, bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
from eval_helpers import (
    BYTE_VOCAB,
    ByteTokenizer,
    TableModel,
    nats,
    oracle_model,
    tiny_random_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm.evaluate.bundle import load_bundle, write_bundle
from loopedlm.evaluate.core import centered_accuracy, core_metric, default_max_len, evaluate_task
from loopedlm.evaluate.items import TaskSpec
from loopedlm.evaluate.prompts import (
    common_prefix_length,
    common_suffix_length,
    prepare_example,
    render_prompts,
    sample_fewshot,
    select_examples,
)
from loopedlm.evaluate.scoring import score_sequences

TOK = ByteTokenizer()
BOS = TOK.bos_id


def ids(text: str) -> list[int]:
    return [BOS, *TOK.encode(text)]


def prefix(text: str) -> tuple[int, ...]:
    return tuple(ids(text))


MC = TaskSpec("mc", "multiple_choice")
SCHEMA = TaskSpec("schema", "schema")
LM = TaskSpec("lm", "language_modeling")


# ---- scoring rules on hand-made examples -----------------------------------------------------

def test_multiple_choice_uses_mean_not_sum_loss():
    # choice "aaaa": 4 tokens at 1 nat each (mean 1, sum 4); choice "b": 1 token at 2 nats
    a, b = ord("a"), ord("b")
    table = {prefix("Q "): {a: math.exp(-1), b: math.exp(-2)}}
    for k in range(1, 4):
        table[prefix("Q " + "a" * k)] = {a: math.exp(-1)}
    model = TableModel(table)
    items = [{"query": "Q", "choices": ["aaaa", "b"], "gold": 0}]
    r = evaluate_task(model, TOK, MC, items, return_details=True)
    assert r["accuracy"] == 1.0
    assert r["details"][0]["scores"] == pytest.approx([1.0, 2.0], abs=1e-5)
    # the same item with gold on the shorter choice is wrong: the rule is the mean, not the sum
    items[0]["gold"] = 1
    assert evaluate_task(model, TOK, MC, items)["accuracy"] == 0.0


def test_multiple_choice_scores_only_tokens_where_choices_differ():
    # choices "xa" and "xbbbb" share "x". Excluding x: mean(a) = 0.8 < mean(b) = 1.0 -> choice 0.
    # Counting a costly x (10 nats) would flip the answer to choice 1 (5.4 vs 2.8).
    x, a, b = ord("x"), ord("a"), ord("b")
    table = {prefix("Q "): {x: math.exp(-10)},
             prefix("Q x"): {a: math.exp(-0.8), b: math.exp(-1.0)}}
    for k in range(1, 4):
        table[prefix("Q x" + "b" * k)] = {b: math.exp(-1.0)}
    items = [{"query": "Q", "choices": ["xa", "xbbbb"], "gold": 0}]
    r = evaluate_task(TableModel(table), TOK, MC, items, return_details=True)
    assert r["details"][0]["scores"] == pytest.approx([0.8, 1.0], abs=1e-5)
    assert r["accuracy"] == 1.0


def test_multiple_choice_when_one_choice_is_a_prefix_of_another():
    # "5" vs "50": the common token prefix covers all of "5"; each choice still scores >= 1
    # token, so no score is the mean of nothing (NaN)
    items = [{"query": "n=", "choices": ["5", "50"], "gold": 1}]
    p = prepare_example(items, 0, MC, TOK)
    assert all(s < e for s, e in zip(p.starts, p.ends, strict=True))
    zero = ord("0")
    model = TableModel({prefix("n= 5"): {zero: 0.9}})
    r = evaluate_task(model, TOK, MC, items, return_details=True)
    assert all(math.isfinite(s) for s in r["details"][0]["scores"])
    assert r["accuracy"] == 1.0


def test_schema_scores_the_shared_continuation_only():
    # context option 1 is itself very unlikely (its tokens cost a lot), but the continuation
    # " zz" is far likelier after it: schema scoring must ignore the context tokens.
    z, sp = ord("z"), ord(" ")
    table = {prefix("The cat"): {sp: 0.9}, prefix("The cat "): {z: 0.01},
             prefix("The cat z"): {z: 0.01},
             prefix("The dog"): {sp: 0.9}, prefix("The dog "): {z: 0.9},
             prefix("The dog z"): {z: 0.9},
             prefix("The "): {ord("c"): 0.9, ord("d"): 1e-6}}
    items = [{"context_options": ["The cat", "The dog"], "continuation": "zz", "gold": 1}]
    r = evaluate_task(TableModel(table), TOK, SCHEMA, items, return_details=True)
    assert r["accuracy"] == 1.0
    # the scored span is " zz" (delimiter + continuation: the common suffix)
    expect = [(nats(0.9) + 2 * nats(0.01)) / 3, 3 * nats(0.9) / 3]
    assert r["details"][0]["scores"] == pytest.approx(expect, abs=1e-5)


def test_language_modeling_needs_every_token_greedy():
    # the delimiter's space belongs to the continuation (the context is stripped, as DCLM)
    a, b, c, sp = ord("a"), ord("b"), ord("c"), ord(" ")
    table = {prefix("q"): {sp: 0.6}, prefix("q "): {a: 0.6}, prefix("q a"): {b: 0.6},
             prefix("r"): {sp: 0.6}, prefix("r "): {a: 0.6}, prefix("r a"): {c: 0.6}}
    model = TableModel(table)
    items = [{"context": "q", "continuation": "ab"}, {"context": "r", "continuation": "ab"}]
    r = evaluate_task(model, TOK, LM, items, return_details=True)
    assert [d["correct"] for d in r["details"]] == [True, False]
    assert r["accuracy"] == 0.5


def test_score_sequences_matches_direct_cross_entropy():
    model = tiny_random_model()
    seqs = [ids("hello world"), ids("hi"), ids("a longer sequence here")]
    starts, ends = [3, 1, 5], [len(s) for s in seqs]
    mean, _, logprob = score_sequences(model, seqs, starts, ends, n_loops=3,
                                       logits_budget=BYTE_VOCAB * 30)  # forces several batches
    import torch
    import torch.nn.functional as F
    for seq, s, e, m, lp in zip(seqs, starts, ends, mean, logprob, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([seq]), n_loops=3)[0]
        losses = F.cross_entropy(logits[:-1], torch.tensor(seq[1:]), reduction="none")
        assert m == pytest.approx(float(losses[s - 1:e - 1].mean()), abs=1e-5)
        assert lp == pytest.approx(-float(losses[s - 1:e - 1].sum()), abs=1e-4)


def test_n_loops_reaches_the_model():
    model = TableModel({})
    evaluate_task(model, TOK, MC, [{"query": "q", "choices": ["a", "b"], "gold": 0}], n_loops=7)
    assert model.calls and set(model.calls) == {7}


# ---- oracle and random models -------------------------------------------------------------

def synthetic_items(task_type: str, n: int, k: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def word(m=5):
        return "".join(rng.choice("abcdefghij") for _ in range(m))

    if task_type == "multiple_choice":
        return [{"query": f"Q: {word()}?", "choices": [word(rng.randint(2, 6)) for _ in range(k)],
                 "gold": rng.randrange(k)} for _ in range(n)]
    if task_type == "schema":
        return [{"context_options": [word(), word()], "continuation": word(4),
                 "gold": rng.randrange(2)} for _ in range(n)]
    return [{"context": word(8), "continuation": word(3)} for _ in range(n)]


@pytest.mark.parametrize("spec", [MC, SCHEMA, LM, TaskSpec("mc3", "multiple_choice", 3)],
                         ids=lambda s: s.name)
def test_oracle_scores_100_percent(spec):
    items = synthetic_items(spec.task_type, 12)
    if spec.task_type == "multiple_choice":  # distinct choices, so that one answer is right
        for it in items:
            it["choices"] = [f"{c}{j}" for j, c in enumerate(it["choices"])]
    evaluated = [items[i] for i in select_examples(len(items), None)]  # shots come from it
    gold = []
    for i in range(len(items)):
        p = prepare_example(evaluated, i, spec, TOK)
        gold.append(p.sequences[p.gold] if spec.task_type != "language_modeling"
                    else p.sequences[0])
    r = evaluate_task(oracle_model(gold), TOK, spec, items)
    assert r["accuracy"] == 1.0 and r["centered"] == 1.0


@pytest.mark.parametrize("task_type,k,baseline", [("multiple_choice", 4, 0.25),
                                                  ("multiple_choice", 2, 0.5),
                                                  ("schema", 2, 0.5),
                                                  ("language_modeling", 0, 0.0)])
def test_random_model_reproduces_the_random_baseline(task_type, k, baseline):
    n = 300
    items = synthetic_items(task_type, n, k=k, seed=1)
    spec = TaskSpec("t", task_type, 0, " ", baseline)
    r = evaluate_task(tiny_random_model(seed=3), TOK, spec, items)
    sd = math.sqrt(max(baseline * (1 - baseline), 1e-4) / n)
    assert abs(r["accuracy"] - baseline) < 4 * sd + 1e-9
    assert abs(r["centered"]) < 4 * sd / (1 - baseline) + 1e-9


# ---- few-shot sampling and rendering -------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 60), k=st.integers(0, 12), index=st.integers(0, 59))
def test_fewshot_sampling_without_replacement_and_never_the_item(n, k, index):
    index %= n
    shots = sample_fewshot(n, index, k)
    assert len(shots) == min(k, n - 1)
    assert len(set(shots)) == len(shots) and index not in shots
    assert shots == sample_fewshot(n, index, k)  # per-example seed: reproducible


def test_fewshot_seeds_differ_per_example_and_prompts_hold_gold_answers():
    items = synthetic_items("multiple_choice", 30)
    spec = TaskSpec("mc", "multiple_choice", num_fewshot=3, continuation_delimiter=" A: ")
    assert sample_fewshot(30, 0, 3) != sample_fewshot(30, 1, 3)
    shots = [items[i] for i in sample_fewshot(30, 5, 3)]
    prompts = render_prompts(items[5], spec, shots)
    for ex in shots:
        assert f"{ex['query']} A: {ex['choices'][ex['gold']]}\n\n" in prompts[0]
    assert [p.endswith(f"{items[5]['query']} A: {c}") for p, c in
            zip(prompts, items[5]["choices"], strict=True)] == [True] * 4


def nanochat_fewshot_replay(items: list[dict], num_fewshot: int, max_per_task: int
                            ) -> dict[int, list[int]]:
    """nanochat's base_eval + core_eval procedure, written out: original item index ->
    original indices of its shots, in the order they are drawn."""
    data = list(enumerate(items))
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    shots = {}
    for idx in range(len(data)):
        rng = random.Random(1234 + idx)
        available_indices = [i for i in range(len(data)) if i != idx]
        shots[data[idx][0]] = [data[i][0] for i in rng.sample(available_indices, num_fewshot)]
    return shots


@pytest.mark.parametrize("spec", [TaskSpec("mc", "multiple_choice", 5, " A: "),
                                  TaskSpec("schema", "schema", 3), TaskSpec("lm", "language_modeling", 4)],
                         ids=lambda s: s.task_type)
@pytest.mark.parametrize("max_examples", [None, 9, 40])
def test_fewshot_selection_replays_nanochat(spec, max_examples):
    """Same examples, same shots in the same order, for every example, as nanochat's base_eval
    (shuffle with 1337, cut, seed 1234 + position, draw from the cut list)."""
    items = synthetic_items(spec.task_type, 23, seed=4)
    expected = nanochat_fewshot_replay(items, spec.num_fewshot,
                                       -1 if max_examples is None else max_examples)
    r = evaluate_task(tiny_random_model(), TOK, spec, items, max_examples=max_examples,
                      return_details=True)
    assert r["n"] == len(expected) == min(max_examples or 23, 23)
    got = {d["index"]: d["fewshot"] for d in r["details"]}
    assert got == expected
    # and the prompts hold exactly those shots, in that order
    evaluated = [items[i] for i in select_examples(len(items), max_examples)]
    for d in r["details"]:
        prompts = render_prompts(items[d["index"]], spec, [items[i] for i in expected[d["index"]]])
        scored = prompts if spec.task_type != "language_modeling" else prompts[1:]
        p = prepare_example(evaluated, d["position"], spec, TOK)
        assert p.sequences == [ids(text) for text in scored]


def test_long_prompts_are_cropped_on_the_left_keeping_the_scored_tokens():
    items = [{"context": "x" * 200, "continuation": "the end"}]
    full = prepare_example(items, 0, LM, TOK)
    cut = prepare_example(items, 0, LM, TOK, max_len=64)
    assert cut.truncated and len(cut.sequences[0]) == 64
    assert (cut.sequences[0][cut.starts[0]:cut.ends[0]]
            == full.sequences[0][full.starts[0]:full.ends[0]])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=2, max_size=4))
def test_common_prefix_and_suffix(seqs):
    p, s = common_prefix_length(seqs), common_suffix_length(seqs)
    assert all(q[:p] == seqs[0][:p] for q in seqs)
    assert all(q[len(q) - s:] == seqs[0][len(seqs[0]) - s:] for q in seqs)
    if p < min(map(len, seqs)):
        assert len({q[p] for q in seqs}) > 1


# ---- metric arithmetic ----------------------------------------------------------------------

def test_centered_accuracy_and_core():
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.62) == pytest.approx(1.0)
    assert centered_accuracy(0.5, 0.0) == 0.5
    results = {"a": {"centered": 0.2}, "b": {"centered": 0.4}, "c": {"error": "boom"}}
    assert core_metric(results) == pytest.approx(0.3)
    assert math.isnan(core_metric({}))


def test_max_examples_takes_a_fixed_subset():
    items = synthetic_items("multiple_choice", 50)
    model = tiny_random_model()
    a = evaluate_task(model, TOK, MC, items, max_examples=7, return_details=True)
    b = evaluate_task(model, TOK, MC, items, max_examples=7, return_details=True)
    assert a["n"] == 7 and a["n_available"] == 50
    assert [d["index"] for d in a["details"]] == [d["index"] for d in b["details"]]


# ---- bundles -------------------------------------------------------------------------------

def test_bundle_round_trip(tmp_path):
    tasks = [(TaskSpec("m", "multiple_choice", 2, ": ", 0.25), synthetic_items("multiple_choice", 5)),
             (TaskSpec("s", "schema", 0, " ", 0.5), synthetic_items("schema", 4)),
             (TaskSpec("l", "language_modeling", 1), synthetic_items("language_modeling", 3))]
    write_bundle(tmp_path, tasks)
    assert load_bundle(tmp_path) == [(s, list(i)) for s, i in tasks]


def test_dclm_bundle_layout(tmp_path):
    (tmp_path / "eval_data" / "lm").mkdir(parents=True)
    items = synthetic_items("multiple_choice", 4)
    (tmp_path / "eval_data" / "lm" / "arc.jsonl").write_text(
        "\n".join(json.dumps(i) for i in items))
    (tmp_path / "core.yaml").write_text(
        "icl_tasks:\n- label: arc_easy\n  dataset_uri: lm/arc.jsonl\n  num_fewshot: [10]\n"
        "  icl_task_type: multiple_choice\n  continuation_delimiter: \"\\nAnswer: \"\n")
    (tmp_path / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline\n"
        "arc_easy,world knowledge,multiple choice,10,4,25\n")
    [(spec, loaded)] = load_bundle(tmp_path)
    assert spec.num_fewshot == 10 and spec.random_baseline == 0.25
    assert spec.continuation_delimiter == "\nAnswer: " and loaded == items


# ---- bad input ----------------------------------------------------------------------------

def test_bad_items_and_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        from loopedlm.evaluate.bundle import read_jsonl
        read_jsonl(tmp_path / "missing.jsonl", "schema", "t")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*gold"):
        read_jsonl(bad, "multiple_choice")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        read_jsonl(bad, "multiple_choice")
    with pytest.raises(ValueError, match="task_type='mcq'"):
        TaskSpec("t", "mcq")
    with pytest.raises(ValueError, match="random_baseline"):
        TaskSpec("t", "schema", random_baseline=25)
    with pytest.raises(ValueError, match="max_examples"):
        evaluate_task(TableModel({}), TOK, MC, synthetic_items("multiple_choice", 3),
                      max_examples=0)
    with pytest.raises(ValueError, match="n_loops"):
        evaluate_task(tiny_random_model(), TOK, MC, synthetic_items("multiple_choice", 3),
                      n_loops=0)


def test_default_max_len_is_what_the_rope_table_covers_plus_the_target():
    model = tiny_random_model()
    assert default_max_len(model) == model.config.rotary_len + 1
    assert default_max_len(object()) is None  # a model that says nothing: no cropping
