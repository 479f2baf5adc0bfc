"""External causal LMs in `loopedlm eval` (loopedlm.evaluate.external): a tiny random
Hugging Face Llama built here (skipped without `transformers`), bad paths, and, in the slow
tier, SmolLM2-135M-Instruct (Q4_1 GGUF) scoring clearly above chance."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest
import torch
from eval_helpers import tiny_random_model

from loopedlm.cli import main
from loopedlm.evaluate import budget
from loopedlm.evaluate.core import evaluate_task
from loopedlm.evaluate.external import load_external, model_kind
from loopedlm.evaluate.items import TaskSpec

TEXT = "The quick brown fox jumps over the lazy dog. Café au lait, naïve façade! 12345\n" * 8


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A 2-layer random LlamaForCausalLM and a byte-level BPE tokenizer, saved as HF does."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf_llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([TEXT], trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=96)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_adapter_logits_are_the_hf_models(hf_folder):
    model, tok = load_external(hf_folder)
    ids = torch.tensor([[tok.bos_id, *tok.encode("The lazy dog")]])
    expected = model.hf_model(input_ids=ids).logits
    assert torch.equal(model(ids), expected)
    assert torch.equal(model(ids, n_loops=1), expected)
    assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.sequence_len == 96
    # right padding (how the evaluator batches) leaves the earlier positions' logits alone
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded)[:, :ids.shape[1]], expected)
    with pytest.raises(ValueError, match="n_loops=3 does not apply"):
        model(ids, n_loops=3)


def test_tokenizer_adapter_keeps_the_tokenizer_contract(hf_folder):
    import transformers

    _, tok = load_external(hf_folder)
    hf = transformers.AutoTokenizer.from_pretrained(hf_folder)
    assert tok.bos_id == hf.convert_tokens_to_ids("<|endoftext|>")  # no BOS of its own
    assert tok.bos_id in tok.special_ids and tok.vocab_size == len(hf)
    texts = ["The lazy dog.", "Café naïve", "12345 fox"]
    encoded = tok.encode_batch(texts)
    assert [tok.decode(ids) for ids in encoded] == texts
    # a special-token string inside text is text, never the special id
    assert tok.bos_id not in tok.encode("a <|endoftext|> b")
    # bits per byte counts every UTF-8 byte of the text once, special tokens none
    token_bytes = tok.token_bytes()
    for text, ids in zip(texts, encoded, strict=True):
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert token_bytes[tok.bos_id] == 0


def test_cli_eval_of_a_hf_folder_has_one_column(hf_folder, tmp_path, monkeypatch, capsys):
    def synthetic_task(name):
        items = [{"query": f"Q{i}:", "choices": ["yes", "no"], "gold": i % 2} for i in range(6)]
        return TaskSpec(name, "multiple_choice", 1, " ", 0.5), items

    monkeypatch.setattr(budget, "load_task", synthetic_task)
    wiki = tmp_path / "wiki.valid.raw"
    wiki.write_text(TEXT)
    rc = main(["eval", str(hf_folder), "--n-loops", "1,3", "--tasks", "piqa", "--wikitext",
               str(wiki), "--out", str(tmp_path / "ev"), "--max-examples", "4"])
    assert rc == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["loops"] == [1] and results["errors"] == []
    assert set(results["metrics"]["wikitext_ppl"]) == {"1"}
    assert results["tasks"]["piqa"]["1"]["n"] == 4
    assert "| metric | N=1 |" in capsys.readouterr().out


def test_an_external_model_is_evaluated_once_and_says_why(hf_folder, caplog):
    from loopedlm.evaluate.loading import load_eval_target

    with caplog.at_level("WARNING", logger="loopedlm.evaluate.loading"):
        target = load_eval_target(hf_folder, [1, 3], device="cpu", tokenizer="qwen3")
    assert target.loops == [1] and target.meta == {} and target.data_dir is None
    assert target.default_out.name == f"eval_{hf_folder.stem}"
    assert "not a looped model" in caplog.text and "--tokenizer is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="loopedlm.evaluate.loading"):
        assert load_eval_target(hf_folder, [1, 3], device="cpu", loops_given=False).loops == [1]
    assert caplog.text == ""  # the default loop counts are not a request to warn about


def test_model_kind_of_each_path(tmp_path):
    from loopedlm.model.checkpoint import save_model

    run = tmp_path / "run"
    save_model(run / "checkpoints" / "step_000001", tiny_random_model(), {"step": 1})
    assert model_kind(run) == "loopedlm"
    assert model_kind(run / "checkpoints" / "step_000001") == "loopedlm"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert model_kind(hf) == "hf"
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_kind(gguf) == "gguf"


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "does not exist: give a loopedlm run"),
    (lambda p: p, "is not a loopedlm run or checkpoint (no model.safetensors), nor a Hugging "
                  "Face model folder"),
    (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt",
     "is a file but not a .gguf model"),
])
def test_cli_eval_of_a_path_that_is_no_model_is_one_line(tmp_path, capsys, make, message):
    assert main(["eval", str(make(tmp_path)), "--tasks", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_extra_is_one_clear_line(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if absent
    with pytest.raises(ValueError, match=r"loopedlm\[external\]"):
        load_external(folder)


# ---- slow: a real model ---------------------------------------------------------------------

def _local_smollm2():
    """The SmolLM2 GGUF if it is here already: $LOOPEDLM_SMOLLM2_GGUF or where
    bench_external_eval.py puts it (a test never downloads)."""
    from loopedlm.common.paths import loopedlm_home

    for candidate in (os.environ.get("LOOPEDLM_SMOLLM2_GGUF"),
                      loopedlm_home() / "downloads" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


@pytest.mark.slow
def test_smollm2_scores_clearly_above_chance():
    """ARC-Easy and PIQA 0-shot, 100 examples each: the mean centered accuracy is more than
    3 standard errors (of a model at chance) above 0. bench_external_eval.py measures the
    same subsets (its 120 include these 100) and HellaSwag and CORE."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from loopedlm.evaluate.tasks import load_task

    gguf = _local_smollm2()
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not found: set LOOPEDLM_SMOLLM2_GGUF or run "
                    "benchmarks/bench_external_eval.py once")
    try:
        load_task("arc_easy")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model, tok = load_external(gguf)
    centered, null_var = [], []
    for name in ("arc_easy", "piqa"):
        spec, items = load_task(name)
        r = evaluate_task(model, tok, dataclasses.replace(spec, num_fewshot=0), items,
                          max_examples=100)
        chance = spec.random_baseline
        centered.append(r["centered"])
        null_var.append(chance * (1 - chance) / r["n"] / (1 - chance) ** 2)
    se = math.sqrt(sum(null_var)) / len(null_var)
    assert sum(centered) / len(centered) > 3 * se, centered
