"""Issue 26: `loopedlm export` writes a Hugging Face folder that `transformers`
(trust_remote_code), its `generate()` and lm-eval's `hf` model load, at any loop count.

A tiny run is trained, exported and loaded back: logits at N = 1, 3 and 12, greedy
`generate` against `loopedlm sample`, batched left-padded `generate` against one-by-one,
lm-eval's `hf` model against loopedlm's adapter, and export -> load -> export. Every loop
mode and attention variant is checked against loopedlm's own forward (the model's
exactness cases), and tests/hf_check.py checks exported folders where loopedlm cannot be
imported. The slow tier runs the `lm_eval` command line, and (benchmarks/nightly.sh) the
oldest transformers the README claims.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VARIANTS, tiny_model  # the model's exactness cases
from safetensors.torch import save_file
from train_helpers import make_corpus, small_config

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from loopedlm import LOOP_MODES, ModelConfig  # noqa: E402
from loopedlm.cli import main  # noqa: E402
from loopedlm.data.tokenizer import QWEN3_LEGACY_BOS_TOKEN, Qwen3Tokenizer  # noqa: E402
from loopedlm.export.hf import CODE_DIR, export_hf, write_hf_model  # noqa: E402
from loopedlm.export.hf_tokenizer import bpe_merges, special_tokens  # noqa: E402
from loopedlm.model.checkpoint import load_model  # noqa: E402
from loopedlm.model.config import QWEN3_VOCAB_SIZE  # noqa: E402
from loopedlm.train.trainer import train  # noqa: E402

CHECKER = Path(__file__).resolve().parent / "hf_check.py"
MODES = list(LOOP_MODES)


def load_hf(folder: Path):
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()


def ids_for(vocab: int, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def expected_logits(model, folder: Path, loops=(1, 3, 12), batch=2, length=None) -> Path:
    """loopedlm's logits beside an export, for tests/hf_check.py."""
    ids = ids_for(model.config.vocab_size, batch, length or model.config.sequence_len)
    with torch.no_grad():
        tensors = {"ids": ids, **{f"logits_n{n}": model(ids, n_loops=n) for n in loops}}
    path = folder.parent / f"{folder.name}.expected.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run (flt, 2 loops, trained BPE), exported."""
    root = tmp_path_factory.mktemp("export")
    data_dir, tok_dir = make_corpus(root / "corpus")
    run = root / "run"
    summary = train(small_config(run, data_dir, tok_dir, steps=6, save_every=3, keep_last=2))
    out = export_hf(run, root / "hf")
    model, _ = load_model(run)
    return SimpleNamespace(root=root, run=run, out=out, model=model, summary=summary)


@pytest.fixture(scope="module")
def hf(trained):
    return load_hf(trained.out), AutoTokenizer.from_pretrained(str(trained.out),
                                                               trust_remote_code=True)


# ---- the folder -------------------------------------------------------------------------------
def test_export_writes_a_hugging_face_folder(trained):
    files = {p.name for p in trained.out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_loopedlm.py", "modeling_loopedlm.py",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "tokenizer", "loopedlm.json"} == files
    config = json.loads((trained.out / "config.json").read_text())
    assert config["model_type"] == "loopedlm"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    for field, value in trained.model.config.to_dict().items():
        assert config[field] == value, field
    card = (trained.out / "README.md").read_text()
    assert "`flt`: Fully Looped Transformer" in card and "unique blocks | 2" in card
    assert f"validation BPB: {trained.summary['val_bpb']:.4f}" in card
    assert f"{trained.summary['tokens']:,} tokens" in card
    assert "Loop budget" not in card  # the run has no `loopedlm eval` results


def test_bos_eos_and_pad_are_correct_and_distinct(trained, hf):
    _, tok = hf
    run_tok = load_tokenizer_of(trained.run)
    assert tok.bos_token_id == run_tok.bos_id == tok("x").input_ids[0]
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    text = "The king said to my lord, good night."
    assert tok(text).input_ids == [run_tok.bos_id, *run_tok.encode(text)]
    generation = json.loads((trained.out / "generation_config.json").read_text())
    # the model ends a document with BOS (every training document starts with one)
    assert generation["eos_token_id"] == [tok.bos_token_id, tok.eos_token_id]
    assert generation["pad_token_id"] == tok.pad_token_id


def load_tokenizer_of(run: Path):
    from loopedlm.data.runs import load_run

    return load_run(run).tokenizer


# ---- transformers against loopedlm ------------------------------------------------------------
@torch.no_grad()
def test_transformers_logits_equal_loopedlm_at_1_3_and_12_loops(trained, hf):
    model, _ = hf
    ids = ids_for(trained.model.config.vocab_size, 3, 32)
    for n in (1, 3, 12):
        torch.testing.assert_close(model(ids, n_loops=n).logits, trained.model(ids, n_loops=n),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, trained.model(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_loops", [2, 3])
def test_greedy_generate_equals_loopedlm_sample(trained, hf, n_loops):
    model, tok = hf
    for prompt in ("The king said", "Good night, sweet"):
        code, out, _ = cli(["sample", str(trained.run), "--prompt", prompt, "--temperature", "0",
                            "--max-tokens", "12", "--n-loops", str(n_loops)])
        assert code == 0
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, n_loops=n_loops, max_new_tokens=12)[0, ids.size(1):].tolist()
        if new and new[-1] in model.generation_config.eos_token_id:
            new = new[:-1]  # `loopedlm sample` stops at BOS and leaves it out
        assert out == prompt + tok.decode(new) + "\n"


def test_the_readme_pipeline_line_generates_at_any_loop_count(trained, hf):
    model, tok = hf
    pipe = transformers.pipeline("text-generation", str(trained.out), trust_remote_code=True)
    ids = tok("The king said", return_tensors="pt").input_ids
    for n in (1, 6):
        text = pipe("The king said", n_loops=n, max_new_tokens=8)[0]["generated_text"]
        with torch.no_grad():
            new = model.generate(ids, n_loops=n, max_new_tokens=8)[0, ids.size(1):]
        assert text == "The king said" + tok.decode(new, skip_special_tokens=True)


@torch.no_grad()
def test_batched_left_padded_generate_equals_one_by_one(hf):
    model, tok = hf
    prompts = ["The king said to my lord", "Sweet", "Good night, fair queen"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert batch.attention_mask[1, 0] == 0  # left-padded
    for n in (1, 4):
        together = model.generate(**batch, n_loops=n, max_new_tokens=8)[:, batch.input_ids.size(1):]
        for row, prompt in enumerate(prompts):
            ids = tok(prompt, return_tensors="pt").input_ids
            alone = model.generate(ids, n_loops=n, max_new_tokens=8)[0, ids.size(1):].tolist()
            assert together[row].tolist()[:len(alone)] == alone


def write_mc_task(folder: Path, name: str, rows: list[dict]) -> None:
    """A multiple-choice lm-eval task over local JSONL (no download)."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / name}.jsonl\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def test_lm_eval_hf_model_scores_equal_our_adapter(trained, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from loopedlm.evaluate.lm_eval_adapter import LoopedLMEval

    rows = [{"context": "The king said to", "choices": [" my lord.", " the queen.", " a day."],
             "label": 0},
            {"context": "Good night, sweet", "choices": [" love.", " king.", " death."],
             "label": 1},
            {"context": "And the queen said", "choices": [" good night.", " to my lord."],
             "label": 1}]
    write_mc_task(tmp_path, "export_mc", rows)
    results = {}
    for name, model, args in [
            # at 3 loops (the run trained at 2): lm-eval passes n_loops to the config
            ("hf", "hf", f"pretrained={trained.out},trust_remote_code=True,device=cpu,n_loops=3"),
            ("ours", LoopedLMEval(path=str(trained.run), n_loops=3), None)]:
        results[name] = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=["export_mc"], log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    hf_scores, our_scores = ([ll for s in results[name]["samples"]["export_mc"]
                              for ll, _ in s["filtered_resps"]] for name in ("hf", "ours"))
    assert len(hf_scores) == 8  # 3 examples, 8 choices
    torch.testing.assert_close(torch.tensor(hf_scores), torch.tensor(our_scores), rtol=0,
                               atol=1e-4)
    assert (results["hf"]["results"]["export_mc"]["acc,none"]
            == results["ours"]["results"]["export_mc"]["acc,none"])


# ---- back into loopedlm -----------------------------------------------------------------------
def test_export_load_export_gives_identical_files(trained):
    again = export_hf(trained.out, trained.root / "hf_again")
    first = sorted(p.relative_to(trained.out) for p in trained.out.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for name in first:
        assert (trained.out / name).read_bytes() == (again / name).read_bytes(), name


def test_sample_eval_serve_and_info_take_an_exported_folder(trained, monkeypatch):
    model, meta = load_model(trained.out)
    for key, value in trained.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert meta["step"] == 6 and meta["train"]["steps"] == 6
    args = ["--prompt", "The king", "--temperature", "0", "--max-tokens", "6"]
    assert cli(["sample", str(trained.out), *args])[1] == cli(["sample", str(trained.run), *args])[1]
    code, table, _ = cli(["eval", str(trained.out), "--n-loops", "1,2", "--tasks", "none",
                          "--val-batches", "1", "--out", str(trained.root / "eval_out")])
    assert code == 0 and "val_bpb" in table
    assert cli(["info", str(trained.out), "--json"])[0] == 0
    served = serve_once(trained.out, monkeypatch)
    alone = cli(["sample", str(trained.run), "--prompt", "The king", "--temperature", "0",
                 "--max-tokens", "5"])[1]
    assert "The king" + served + "\n" == alone


def serve_once(folder: Path, monkeypatch) -> str:
    """`loopedlm serve FOLDER`, answering one greedy completion."""
    import urllib.request

    from loopedlm.infer import server as server_module

    apps = []
    with monkeypatch.context() as patch:  # `serve` builds its app, takes no port, runs nothing
        patch.setattr(server_module, "listen", lambda host, port: socket.socket())
        patch.setattr(server_module.uvicorn.Server, "run",
                      lambda self, sockets=None: apps.append(self.config.app))
        assert cli(["serve", str(folder), "--device", "cpu"])[0] == 0
    with server_module.serve_in_background(apps[0]) as url:
        body = {"prompt": "The king", "max_tokens": 5, "temperature": 0}
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["choices"][0]["text"]


def test_budget_table_of_loopedlm_eval_goes_in_the_card(trained):
    checkpoint = sorted((trained.run / "checkpoints").glob("step_*"))[-1]
    assert cli(["eval", str(trained.run), "--n-loops", "1,2", "--tasks", "none",
                "--val-batches", "1"])[0] == 0
    assert (checkpoint / "eval" / "results.json").is_file()
    out = export_hf(trained.run, trained.root / "hf_budget")
    card = (out / "README.md").read_text()
    assert "## Loop budget" in card and "| metric | N=1 | N=2 |" in card and "| val_bpb |" in card


def test_checkpoint_option_picks_a_step(trained):
    code, _, _ = cli(["export", str(trained.run), str(trained.root / "hf_step3"),
                      "--checkpoint", "3"])
    assert code == 0
    model, meta = load_model(trained.root / "hf_step3")
    old, _ = load_model(trained.run / "checkpoints" / "step_000003")
    assert meta["step"] == 3
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in model.state_dict().items())


# ---- every loop mode and attention variant ---------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_every_mode_and_variant_matches_loopedlm(mode, variant, tmp_path):
    model = tiny_model(loop_mode=mode, n_loops=4, **VARIANTS[variant])
    hf_model = load_hf(write_hf_model(model, tmp_path / "m"))
    ids = ids_for(model.config.vocab_size, 2, model.config.sequence_len)
    for n in (None, 1, 3):
        torch.testing.assert_close(hf_model(ids, n_loops=n).logits, model(ids, n_loops=n),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [dict(loop_mode="lt", loss_loops="all"),
                                  dict(loop_mode="flt", loss_loops="last_third"),
                                  dict(loop_mode="flt", residual_scale="inv_sqrt_loops"),
                                  dict(loop_mode="lti", residual_scale="lambda_loops_sqrt_depth",
                                       residual_lambda=2.0),
                                  dict(loop_mode="ltai", residual_scale="inv_loops")])
@torch.no_grad()
def test_loss_over_loops_and_residual_scaling_match_loopedlm(case, tmp_path):
    model = tiny_model(n_loops=5, **case)
    hf_model = load_hf(write_hf_model(model, tmp_path / "m"))
    ids = ids_for(model.config.vocab_size, 2, model.config.sequence_len)
    labels = ids.clone()
    labels[0, :5] = -100
    out = hf_model(ids, labels=labels)
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == -100, -1)
    torch.testing.assert_close(out.logits, model(ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, model(ids[:, :-1], targets), rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_default_loop_count_from_the_config_keeps_the_trained_residual_scale(tmp_path):
    """`from_pretrained(..., n_loops=5)` (what lm-eval's --model_args does) runs 5 loops by
    default; the residual scale stays the one of the trained loop count."""
    model = tiny_model(loop_mode="flt", n_loops=3, residual_scale="inv_sqrt_loops")
    folder = write_hf_model(model, tmp_path / "m")
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, n_loops=5)
    ids = ids_for(model.config.vocab_size, 2, model.config.sequence_len)
    torch.testing.assert_close(hf_model(ids).logits, model(ids, n_loops=5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "swa"])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(mode, variant, tmp_path):
    """One DynamicCache layer per (loop, block), the loop-invariant first block of flt/ltai
    once; prefill then one token at a time, with a left-padded row, equals the full
    forward."""
    model = tiny_model(loop_mode=mode, n_loops=3, **VARIANTS[variant])
    hf_model = load_hf(write_hf_model(model, tmp_path / "m"))
    ids = ids_for(model.config.vocab_size, 2, min(14, model.config.sequence_len))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = hf_model(ids, attention_mask=mask, use_cache=False).logits
    cache, steps = DynamicCache(), []
    for start, stop in [(0, 8), *[(t, t + 1) for t in range(8, ids.size(1))]]:
        steps.append(hf_model(ids[:, start:stop], attention_mask=mask[:, :stop],
                              past_key_values=cache).logits)
    shared = LOOP_MODES[mode].first_layer_kv_invariant  # the first block's kept once
    assert len(cache.layers) == (1 + 3 * (model.config.depth - 1) if shared
                                 else 3 * model.config.depth) == hf_model.cache_slots(3)
    assert cache.get_seq_length() == ids.size(1)
    # fp32 rounding: the cached steps take other attention kernels (masked, one query)
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(full[0], model(ids[:1]).squeeze(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lt", "flt"])
@torch.no_grad()
def test_generate_with_the_cache_equals_generate_without(mode, tmp_path):
    """Greedy and beam search (which reorders every cache layer) through generate's own
    cache handling give the tokens of recomputing every step."""
    model = tiny_model(loop_mode=mode, n_loops=2, **VARIANTS["swa"])
    hf_model = load_hf(write_hf_model(model, tmp_path / "m"))
    ids = ids_for(model.config.vocab_size, 2, 5)
    for beams in (1, 2):
        kw = dict(n_loops=3, max_new_tokens=6, num_beams=beams, do_sample=False, pad_token_id=0)
        assert torch.equal(hf_model.generate(ids, **kw), hf_model.generate(ids, use_cache=False,
                                                                          **kw))


@torch.no_grad()
def test_hidden_states_hold_every_loop(tmp_path):
    model = tiny_model(loop_mode="flt", n_loops=3)
    hf_model = load_hf(write_hf_model(model, tmp_path / "m"))
    ids = ids_for(model.config.vocab_size, 1, 10)
    out = hf_model(ids, n_loops=5, output_hidden_states=True)
    assert len(out.hidden_states) == 6  # the embedding, then loops 1..5
    for n in range(1, 6):  # the logits of loop n's output are those of a model run n loops
        torch.testing.assert_close(hf_model.logits(out.hidden_states[n]), model(ids, n_loops=n),
                                   rtol=0, atol=1e-6)


def test_n_loops_below_one_is_a_clear_error(tmp_path):
    hf_model = load_hf(write_hf_model(tiny_model(), tmp_path / "m"))
    ids = ids_for(61, 1, 5)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"^n_loops={bad} is not allowed: an integer >= 1$"):
            hf_model(ids, n_loops=bad)
        with pytest.raises(ValueError, match=rf"^n_loops={bad} is not allowed"):
            hf_model.generate(ids, n_loops=bad, max_new_tokens=2)
    cache = DynamicCache()
    hf_model(ids, n_loops=2, past_key_values=cache)
    with pytest.raises(ValueError, match="^past_key_values has 3 layers, n_loops=3 needs 4: a "
                                         "cache serves one loop count$"):
        hf_model(ids[:, :1], n_loops=3, past_key_values=cache)


# ---- the code needs only torch and transformers ----------------------------------------------
def test_model_code_runs_where_loopedlm_cannot_be_imported(trained, tmp_path):
    expected_logits(trained.model, trained.out, length=32)
    variant = tiny_model(loop_mode="ltai", n_loops=2, **VARIANTS["mla_swa"])
    folder = write_hf_model(variant, tmp_path / "ltai_mla_swa")
    expected_logits(variant, folder)
    result = subprocess.run([sys.executable, "-I", str(CHECKER), str(trained.out), str(folder)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and [r["ok"] for r in reports] == [True, True], \
        result.stdout + result.stderr[-3000:]


def test_model_code_uses_no_private_transformers_api():
    """No import from a private module, no private name imported, and no `_name` anywhere
    but dunders: the folder keeps working when transformers moves its internals."""
    for path in (CODE_DIR / "modeling_loopedlm.py", CODE_DIR / "configuration_loopedlm.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module is None or not any(part.startswith("_")
                                                      for part in node.module.split(".")), path
                if node.module and not node.level:
                    assert node.module.split(".")[0] == "transformers" or node.module in (
                        "typing",), f"{path.name} imports from {node.module}"
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= {"torch", "math", "re",
                                                                       "transformers"}, path
            names = [getattr(node, attr) for attr in ("id", "attr", "name", "arg")
                     if isinstance(getattr(node, attr, None), str)]
            if isinstance(node, ast.alias):
                names.append(node.asname or node.name)
            for name in names:
                assert name == "_" or not (name.startswith("_") and not name.endswith("__")), \
                    f"{path.name}:{getattr(node, 'lineno', '?')} uses {name}"


def test_older_transformers_is_a_clear_error_at_load(tmp_path):
    fake = tmp_path / "old" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "4.44.2"\n')
    code = (f"import sys; sys.path[:0] = [{str(fake.parent)!r}, {str(CODE_DIR)!r}]; "
            "import configuration_loopedlm")
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: this looped model needs transformers >= 4.56, found 4.44.2: "
        "pip install -U 'transformers>=4.56'")


def test_template_config_defaults_are_model_config_defaults():
    from loopedlm.export.hf_code import configuration_loopedlm as template

    hf_config = template.LoopedLMConfig()
    for field, value in ModelConfig().to_dict().items():
        assert getattr(hf_config, field) == value, field
    assert template.LoopedLMConfig.model_type == "loopedlm"
    assert set(template.CHOICES["loop_mode"]) == set(LOOP_MODES)


# ---- tokenizers -------------------------------------------------------------------------------
def test_bpe_merges_from_ranks():
    ranks = [b"a", b"b", b"c", b"ab", b"bc", b"abc", b"cab"]
    assert bpe_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"c", b"ab")]


def test_qwen3_special_tokens_stay_distinct_with_the_legacy_bos():
    special = special_tokens(Qwen3Tokenizer(QWEN3_LEGACY_BOS_TOKEN), QWEN3_VOCAB_SIZE)
    assert (special.bos, special.eos, special.pad) == ("<|endoftext|>", "<|im_end|>",
                                                       "<|fim_pad|>")
    assert len({special.bos_id, special.eos_id, special.pad_id}) == 3


def test_qwen3_tokenizer_loads_in_transformers_as_loopedlm_encodes(tmp_path):
    tok = Qwen3Tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, d_model=16, n_head=1, depth=1)
    folder = write_hf_model(model, tmp_path / "q", tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    ids = {hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id}
    assert len(ids) == 3 and max(ids) < tok.vocab_size and hf_tok.bos_token_id == tok.bos_id
    texts = ["The king said, 'good night'.", "café résumé naïve — Zürich 1234567 ﬁ",
             "  leading\n\ttabs  and\r\nwindows ", "日本語のトークナイザー 한국어 emoji \U0001f680",
             "def f(x):\n    return [i**2 for i in range(100)]"]
    for text in texts:
        assert hf_tok(text).input_ids == [tok.bos_id, *tok.encode(text)], text
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert len(hf_tok) == tok.vocab_size


# ---- slow: the command line of lm-eval, and the oldest transformers claimed ------------------
@pytest.mark.slow
def test_lm_eval_command_line_runs_on_an_exported_folder(trained, tmp_path):
    rows = [{"context": "The king said to", "choices": [" my lord.", " the queen."], "label": 0}]
    write_mc_task(tmp_path, "export_cli_mc", rows)
    lm_eval = Path(sys.executable).parent / "lm_eval"
    result = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args",
         f"pretrained={trained.out},trust_remote_code=True", "--device", "cpu",
         "--tasks", "export_cli_mc", "--include_path", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|export_cli_mc|" in result.stdout.replace(" ", "")


@pytest.mark.slow
def test_oldest_supported_transformers(trained, tmp_path):
    """Every loop mode and attention variant under the oldest transformers the README claims:
    benchmarks/nightly.sh sets LOOPEDLM_OLDEST_TRANSFORMERS_PYTHON to a scratch venv's python."""
    python = os.environ.get("LOOPEDLM_OLDEST_TRANSFORMERS_PYTHON")
    if not python:
        pytest.skip("LOOPEDLM_OLDEST_TRANSFORMERS_PYTHON is not set (benchmarks/nightly.sh sets it)")
    expected_logits(trained.model, trained.out, length=32)
    folders = [str(trained.out)]  # with its tokenizer
    for mode in MODES:
        for variant in VARIANTS:
            model = tiny_model(loop_mode=mode, n_loops=3, **VARIANTS[variant])
            folder = write_hf_model(model, tmp_path / f"{mode}_{variant}")
            expected_logits(model, folder)
            folders.append(str(folder))
    result = subprocess.run([python, "-I", str(CHECKER), *folders], capture_output=True,
                            text=True, cwd=tmp_path, timeout=3600)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and len(reports) == len(folders), \
        result.stdout + result.stderr[-3000:]
    assert all(r["ok"] for r in reports)


@pytest.mark.parametrize("setting", [dict(window_size=3), dict(full_last_layer=False)])
def test_window_settings_the_exported_code_lacks_are_refused(tmp_path, setting):
    model = tiny_model(window_pattern="S", **setting)
    with pytest.raises(ValueError, match="cannot be exported"):
        write_hf_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
