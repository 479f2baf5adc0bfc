"""The importer for the FLT authors' checkpoint format."""

import json

import pytest
import torch
from conftest import tiny_model

from loopedlm.model.interop import (
    MODEL_TYPES,
    config_from_nanochat,
    config_to_nanochat,
    export_nanochat_checkpoint,
    import_nanochat_checkpoint,
)


@pytest.mark.parametrize("model_type,loss_type,expected", [
    ("FLT", "STEP", "all"), ("LT", "FEW", "last_third"), ("FLT_res", "END", "last"),
    ("LT_i", "STEP", "last"), ("LT_ia", "FEW", "last")])
def test_loss_type_mapping_follows_what_their_code_trains(model_type, loss_type, expected):
    """Their LT_i / LT_ia branches supervise only the last loop, whatever loss_type says."""
    cfg = config_from_nanochat({"model_type": model_type, "loss_type": loss_type, "K": 5,
                                "n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 10})
    assert cfg.loss_loops == expected


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_round_trip_gives_identical_logits(tmp_path, model_type):
    model = tiny_model(loop_mode=MODEL_TYPES[model_type], n_loops=3, n_head=4, n_kv_head=2,
                       window_pattern="SL")
    export_nanochat_checkpoint(model, tmp_path, step=1200)
    meta = json.loads((tmp_path / "meta_001200.json").read_text())
    assert meta["model_config"]["model_type"] == model_type and meta["model_config"]["K"] == 3
    loaded, _ = import_nanochat_checkpoint(tmp_path)
    assert loaded.config == model.config
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_authors_layout_with_compile_prefix_and_bf16(tmp_path):
    """A file as their training writes it: `_orig_mod.` keys, bf16 embedding, extra config keys."""
    model = tiny_model(loop_mode="flt", attn_type="mla", kv_rank=8)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    state["_orig_mod.transformer.wte.weight"] = state["_orig_mod.transformer.wte.weight"].bfloat16()
    torch.save(state, tmp_path / "model_000010.pt")
    cfg = model.config
    (tmp_path / "meta_000010.json").write_text(json.dumps({"step": 10, "model_config": {
        "model_type": "FLT", "dropout": 0.01, "K": cfg.n_loops, "sequence_len": cfg.sequence_len,
        "vocab_size": cfg.vocab_size, "n_layer": cfg.depth, "n_head": cfg.n_head,
        "n_kv_head": cfg.n_kv_head, "n_embd": cfg.d_model, "activation_offload": False,
        "activation_offload_keep_last": 1, "loss_type": "FEW", "attn_type": "mla",
        "kv_lora_rank": 8, "window_pattern": "L"}}))
    loaded, meta = import_nanochat_checkpoint(tmp_path / "model_000010.pt")
    assert loaded.config.loss_loops == "last_third" and meta["step"] == 10
    assert loaded.transformer.wte.weight.dtype == torch.float32
    ref = model.transformer.wte.weight.bfloat16().float()
    assert torch.equal(loaded.transformer.wte.weight, ref)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_nanochat_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model_"):
        import_nanochat_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="model_type='GPT2'"):
        config_from_nanochat({"model_type": "GPT2", "n_layer": 1, "n_head": 1, "n_embd": 8,
                              "vocab_size": 10})
    model = tiny_model()
    export_nanochat_checkpoint(model, tmp_path, step=5)
    meta = json.loads((tmp_path / "meta_000005.json").read_text())
    meta["model_config"]["n_embd"] = 64
    meta["model_config"]["n_head"] = 4
    (tmp_path / "meta_000005.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match its model_config"):
        import_nanochat_checkpoint(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that carries a pickled object does not run it."""
    model = tiny_model()
    export_nanochat_checkpoint(model, tmp_path, step=1)
    torch.save({"evil": print}, tmp_path / "model_000001.pt")
    with pytest.raises(ValueError, match="refused to unpickle"):
        import_nanochat_checkpoint(tmp_path)


def test_cli_import_and_info(tmp_path, capsys):
    from loopedlm.cli import main
    from loopedlm.model.checkpoint import load_model

    model = tiny_model(loop_mode="ltai")
    export_nanochat_checkpoint(model, tmp_path / "theirs", step=3)
    assert main(["import-nanochat", str(tmp_path / "theirs"), str(tmp_path / "ours")]) == 0
    loaded, meta = load_model(tmp_path / "ours")
    assert loaded.config == model.config and meta["nanochat_meta"]["step"] == 3
    assert main(["info", str(tmp_path / "ours")]) == 0
    assert "ltai, 3 loops" in capsys.readouterr().out
    assert main(["info", "small", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 127107072
    assert main(["info", "small"]) == 0  # a table for people
    table = capsys.readouterr().out
    assert "parameters" in table and "127,107,072" in table and "{" not in table
    assert main(["info", "nonsense_preset_or_path"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_imported_authors_checkpoint_is_scored_with_their_bos(tmp_path):
    """The authors' tokenizer is Qwen3's with <|im_start|> (151644) as BOS: an imported
    checkpoint of that vocabulary is evaluated with every prompt starting with it."""
    from loopedlm.cli import main
    from loopedlm.data.runs import load_run
    from loopedlm.evaluate.core import evaluate_task
    from loopedlm.evaluate.items import TaskSpec
    from loopedlm.model.config import QWEN3_VOCAB_SIZE

    model = tiny_model(vocab_size=QWEN3_VOCAB_SIZE, depth=1, d_model=8, n_head=1)
    export_nanochat_checkpoint(model, tmp_path / "theirs", step=7)
    assert main(["import-nanochat", str(tmp_path / "theirs"), str(tmp_path / "ours")]) == 0
    loaded, tok, _, _ = load_run(tmp_path / "ours")
    assert tok.name == "qwen3" and tok.bos_id == 151_644
    first_tokens = []
    loaded.register_forward_pre_hook(lambda _m, args: first_tokens.extend(args[0][:, 0].tolist()))
    items = [{"query": f"Question {i}?", "choices": ["yes", "no"], "gold": i % 2} for i in range(4)]
    result = evaluate_task(loaded, tok, TaskSpec("mc", "multiple_choice", num_fewshot=1), items)
    assert result["n"] == 4 and len(first_tokens) == 8
    assert set(first_tokens) == {151_644}


def test_import_of_another_vocabulary_saves_no_tokenizer(tmp_path, capsys):
    from loopedlm.cli import main

    export_nanochat_checkpoint(tiny_model(), tmp_path / "theirs", step=1)
    assert main(["import-nanochat", str(tmp_path / "theirs"), str(tmp_path / "ours")]) == 0
    assert not (tmp_path / "ours" / "tokenizer").exists()
    assert "--tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("setting", [dict(window_size=3), dict(full_last_layer=False)])
def test_window_settings_the_authors_code_lacks_are_refused(setting):
    config = tiny_model(window_pattern="S", **setting).config
    with pytest.raises(ValueError, match="no equivalent in the authors' code"):
        config_to_nanochat(config)
