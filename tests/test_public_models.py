"""Public looped models (docs/public_models.md): Ouro and Huginn folders in their published
formats (config.json field names, weight names, safetensors, tokenizer.json) run in loopedlm
with the logits of their own computation (tests/reference_ouro.py, tests/reference_huginn.py)
at every loop count, exact cached decoding, and their exit rules; bad folders are one clear
error."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from reference_decoding import ReferenceCache, decode_step, prefill
from reference_huginn import (
    huginn_forward,
    huginn_read_out,
    huginn_weights,
    tiny_huginn_config,
    write_huginn_folder,
)
from reference_ouro import (
    ouro_exit_loops,
    ouro_forward,
    ouro_weights,
    tiny_ouro_config,
    write_ouro_folder,
    write_tokenizer,
)

from loopedlm.data.runs import load_run
from loopedlm.infer import DecodeEngine, SamplingParams, SequenceParams
from loopedlm.infer.engine import AdaptiveLoops
from loopedlm.model.checkpoint import load_model

ATOL = 1e-4


def _stored(weights, config, dtype):
    """The weights and config.json of a folder stored in `dtype` (their RoPE buffer kept)."""
    if dtype is None:
        return weights
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return {k: v.to(dtype) if v.is_floating_point() and k != "freqs_cis" else v
            for k, v in weights.items()}


def ouro_folder(tmp_path, seed=0, std=0.2, shards=1, dtype=None, **overrides):
    config = tiny_ouro_config(**overrides)
    weights = _stored(ouro_weights(config, seed=seed, std=std), config, dtype)
    return write_ouro_folder(tmp_path / f"ouro{seed}", config, weights, shards), config, weights


def huginn_folder(tmp_path, seed=0, std=0.2, name="huginn", lm_head=False, freqs_cis=True,
                  dtype=None, **overrides):
    config = tiny_huginn_config(**overrides)
    weights = _stored(huginn_weights(config, seed=seed, std=std, lm_head=lm_head,
                                     freqs_cis=freqs_cis), config, dtype)
    return write_huginn_folder(tmp_path / name, config, weights), config, weights


FOLDERS = {"ouro": ouro_folder, "huginn": huginn_folder}


def tokens(model, shape, seed=1):
    return torch.randint(0, model.config.vocab_size, shape,
                         generator=torch.Generator().manual_seed(seed))


def last_token_decoded(model, idx, n_loops, adaptive):
    """(logits, loops) of the last token of each row of `idx`, decoded after an exact
    prefill of the others, one slot per row."""
    engine = DecodeEngine(model, max_batch=idx.size(0), max_loops=n_loops)
    params = SequenceParams(n_loops=n_loops, adaptive=adaptive)
    for r in range(idx.size(0)):
        engine.prefill(r, idx[r, :-1], params)
    return engine.decode(idx[:, -1])


# ---- the forward: per loop, at the trained depth and others --------------------------------
@pytest.mark.parametrize("overrides", [
    {},  # GQA: 4 query heads over 2 key/value heads
    dict(num_key_value_heads=4, rope_theta=1e6, total_ut_steps=2),
    dict(num_key_value_heads=1, num_hidden_layers=3, rms_norm_eps=1e-5),
], ids=["gqa", "mha_theta", "mqa_eps"])
@torch.no_grad()
def test_ouro_logits_equal_their_computation_at_every_loop(tmp_path, overrides):
    folder, config, weights = ouro_folder(tmp_path, **overrides)
    model, meta = load_model(folder)
    trained = config["total_ut_steps"]
    assert model.config.n_loops == trained and meta["public"]["model_type"] == "ouro"
    idx = tokens(model, (2, 11))
    theirs, _ = ouro_forward(weights, config, idx, trained + 2)
    for n_loops in range(1, trained + 3):
        torch.testing.assert_close(model(idx, n_loops=n_loops), theirs[n_loops - 1],
                                   atol=ATOL, rtol=0)
    assert torch.equal(model(idx), model(idx, n_loops=trained))  # the trained depth by default


@torch.no_grad()
def test_ouro_exit_gate_gives_their_probability_at_every_loop(tmp_path):
    folder, config, weights = ouro_folder(tmp_path)
    model, _ = load_model(folder)
    idx = tokens(model, (2, 7))
    _, their_gates = ouro_forward(weights, config, idx, 5)
    inputs, h = model.prepare(idx), None
    for loop in range(5):
        h = model.loop_state(model.loop(inputs, h, loop))
        torch.testing.assert_close(model.exit_probability(h), their_gates[loop], atol=1e-5,
                                   rtol=0)


@torch.no_grad()
def test_sharded_folder_loads_the_same_model(tmp_path):
    single, _, _ = ouro_folder(tmp_path)
    sharded, _, _ = ouro_folder(tmp_path / "sharded", shards=3)
    a, _ = load_model(single)
    b, _ = load_model(sharded)
    assert not (sharded / "model.safetensors").exists()
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@torch.no_grad()
def test_bf16_weights_load_as_bf16(tmp_path):
    config = tiny_ouro_config(torch_dtype="bfloat16")
    weights = {k: v.bfloat16() for k, v in ouro_weights(config, std=0.2).items()}
    folder = write_ouro_folder(tmp_path / "bf16", config, weights)
    model, _ = load_model(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cos.dtype == torch.bfloat16  # RoPE tables in the weights' dtype, as theirs
    idx = tokens(model, (1, 9))
    theirs, _ = ouro_forward(weights, config, idx, 4)
    torch.testing.assert_close(model(idx), theirs[-1], atol=0.15, rtol=0.05)


# ---- decoding -----------------------------------------------------------------------------------
@torch.no_grad()
def test_gate_exits_where_ouro_exits_and_skips_the_rest(tmp_path):
    """After an exact prefill, a decoded token's loops follow Ouro's published rule (the
    first loop whose cumulative exit probability reaches q): its loop count and logits are
    those of their full forward at that position, and thresholds spread the rows."""
    folder, config, weights = ouro_folder(tmp_path, std=0.3)
    model, _ = load_model(folder)
    idx = tokens(model, (6, 8), seed=3)
    theirs, gates = ouro_forward(weights, config, idx, 4)
    seen = set()
    for q in [0.2, 0.5, 0.8, 0.95, 0.999]:
        expected = ouro_exit_loops([g[:, -1] for g in gates], q)
        # AdaptiveLoops(q): the model's own rule, the gate
        logits, spent = last_token_decoded(model, idx, 4, AdaptiveLoops(q))
        assert torch.equal(spent, expected)
        want = torch.stack([theirs[n - 1][r, -1] for r, n in enumerate(expected.tolist())])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
        seen |= set(spent.tolist())
    assert len(seen) > 2, f"the thresholds tried gave loop counts {seen} only"


def test_the_gate_criterion_needs_a_model_with_a_gate():
    from conftest import tiny_model
    engine = DecodeEngine(tiny_model(), max_batch=1)
    with pytest.raises(ValueError, match="adaptive_criterion='gate' is not allowed for this "
                                         "model: it has no exit gate"):
        engine.add(0, [1, 2], SequenceParams(adaptive=AdaptiveLoops(0.5, "gate")))
    assert engine.active_slots == []


# ---- decoding either model ---------------------------------------------------------------------
@pytest.mark.parametrize("n_loops", [1, 4, 6])
@pytest.mark.parametrize("family", list(FOLDERS))
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(tmp_path, family, n_loops):
    """Prefill, then one token at a time, at the trained loop count and others. Huginn's
    prelude and coda keys live in one cache entry each, the core's in one per loop."""
    folder, _, _ = FOLDERS[family](tmp_path)
    model, _ = load_model(folder)
    idx = tokens(model, (2, 12))
    full = model(idx, n_loops=n_loops)
    engine = DecodeEngine(model, max_batch=2, max_loops=n_loops, max_len=13)
    got = torch.zeros_like(full)
    params = SequenceParams(n_loops=n_loops)
    for r in range(2):
        got[r, :5] = engine.prefill(r, idx[r, :5], params)
    for t in range(5, 12):
        got[:, t] = engine.decode(idx[:, t])[0]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, criterion", [
    ("ouro", "gate"), ("ouro", "state"), ("ouro", "kl"),
    ("huginn", "state"), ("huginn", "kl"), ("huginn", "kl_previous")])
@torch.no_grad()
def test_adaptive_decoding_equals_the_reference_decoder(tmp_path, family, criterion):
    """Token after token, rows leaving the batch and skipped loops' cache entries filled
    (and Huginn's coda read out again at every loop for a KL): the engine equals the plain
    reference decoder, at a threshold where tokens stop at different loops."""
    folder, _, _ = FOLDERS[family](tmp_path)
    model, _ = load_model(folder)
    idx = tokens(model, (3, 12), seed=6)
    for threshold in [0.9, 0.6, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3]:
        adaptive = AdaptiveLoops(threshold, criterion)
        engine = DecodeEngine(model, max_batch=3, max_loops=6)
        params = SequenceParams(n_loops=6, adaptive=adaptive)
        for r in range(3):
            engine.prefill(r, idx[r, :4], params)
        cache = ReferenceCache()
        prefill(model, idx[:, :4], cache, 6)
        loops = set()
        for t in range(4, 12):
            ours, our_loops = engine.decode(idx[:, t])
            theirs, their_loops = decode_step(model, idx[:, t], cache, 6, adaptive)
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
            assert torch.equal(our_loops, their_loops)
            loops |= set(our_loops.tolist())
        if len(loops) > 1:
            return
    pytest.fail("no threshold gave tokens different loop counts")


@pytest.mark.parametrize("family", list(FOLDERS))
@torch.no_grad()
def test_a_row_that_exits_costs_nothing_in_later_loops(tmp_path, family):
    """Rows of one decode step stop at different loops (each its own rule): the looped
    layers run only the rows still looping, the read-out (Huginn's coda among it) runs
    once per row, and each row's logits are those of the row decoded alone (exact against
    their computation: the tests above)."""
    folder, _, _ = FOLDERS[family](tmp_path)
    model, _ = load_model(folder)
    rules = [AdaptiveLoops(math.inf, "state"),                 # stops at its min_loops, 2
             None,                                             # every loop, 6
             AdaptiveLoops(math.inf, "state", min_loops=4)]    # 4
    if family == "ouro":
        rules.append(AdaptiveLoops(0.0, "gate"))               # its cumulative probability >= 0: 1
    idx = tokens(model, (len(rules), 9), seed=4)
    engine = DecodeEngine(model, max_batch=len(rules), max_loops=6)
    for r, rule in enumerate(rules):
        engine.prefill(r, idx[r, :-1], SequenceParams(n_loops=6, adaptive=rule))
    looped, read_out = [], []
    hooks = [model.transformer.h[-1].register_forward_hook(
        lambda m, inp, out: looped.append(inp[0].size(0))),
             model.lm_head.register_forward_hook(
        lambda m, inp, out: read_out.append(inp[0].size(0)))]
    logits, spent = engine.decode(idx[:, -1])
    for hook in hooks:
        hook.remove()
    expected = [2, 6, 4, 1][:len(rules)]
    assert spent.tolist() == expected
    assert looped == [sum(n > loop for n in expected) for loop in range(6)]
    assert sum(read_out) == len(rules)  # `state` and `gate` read out a row only where it stops
    for r, rule in enumerate(rules):
        alone = DecodeEngine(model, max_batch=1, max_loops=6)
        alone.prefill(0, idx[r, :-1], SequenceParams(n_loops=6, adaptive=rule))
        torch.testing.assert_close(logits[r], alone.decode(idx[r, -1:])[0][0], atol=1e-5, rtol=0)


def decoded_tokens(model, requests, steps, max_batch):
    """Each (prompt, params) of `requests` added in its slot of one engine, then `steps`
    steps: the tokens of each slot."""
    engine = DecodeEngine(model, max_batch=max_batch, max_loops=6, compile=False)
    out = {slot: [int(engine.add(slot, ids, params))] for slot, (ids, params) in requests.items()}
    for _ in range(steps):
        step = engine.step().tokens.tolist()
        for slot in requests:
            if step[slot] >= 0:
                out[slot].append(step[slot])
    return out


@pytest.mark.parametrize("family", list(FOLDERS))
@torch.no_grad()
def test_speculative_decoding_gives_the_plain_greedy_tokens(tmp_path, family):
    """Self-speculative decoding of a public model is its greedy decoding at n_loops, token
    for token: alone, and beside an adaptive row whose steps leave the speculative row's
    cache alone (Huginn's prelude and coda keys, one entry each, are rewritten by every pass
    that runs them: the verify pass's stay)."""
    folder, _, _ = FOLDERS[family](tmp_path, std=0.3)
    model, _ = load_model(folder)
    greedy = SamplingParams(temperature=0)
    prompt, other = tokens(model, (1, 5))[0].tolist(), tokens(model, (1, 4), seed=2)[0].tolist()
    plain = decoded_tokens(model, {0: (prompt, SequenceParams(n_loops=6, sampling=greedy))},
                           20, 1)[0]
    speculative = SequenceParams(n_loops=6, sampling=greedy, draft_loops=2)
    assert decoded_tokens(model, {0: (prompt, speculative)}, 20, 1)[0] == plain
    adaptive = SequenceParams(n_loops=6, sampling=greedy, adaptive=AdaptiveLoops(0.05, "state"))
    both = decoded_tokens(model, {0: (other, adaptive), 1: (prompt, speculative)}, 20, 2)
    assert both[1] == plain
    assert both[0] == decoded_tokens(model, {0: (other, adaptive)}, 20, 1)[0]


# ---- the folder: tokenizer, loading path, import-hf ---------------------------------------------
@torch.no_grad()
def test_load_run_takes_the_folder_with_its_tokenizer(tmp_path):
    folder, _, _ = ouro_folder(tmp_path, vocab_size=290)
    write_tokenizer(folder)
    model, tokenizer, _, meta = load_run(folder)
    assert meta["public"]["model_type"] == "ouro"
    # a prompt starts with the document separator; <|im_end|> (eos) ends a text too
    assert tokenizer.bos_id == 0 and tokenizer.stop_ids == (0, 2)
    text = "the cat sat"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert int(tokenizer.token_bytes().sum()) > 0


@torch.no_grad()
def test_import_hf_writes_a_checkpoint_with_the_same_logits(tmp_path):
    from loopedlm.data.hf_import import import_public_model

    folder, _, _ = ouro_folder(tmp_path, vocab_size=290)
    write_tokenizer(folder)
    out = import_public_model(folder, tmp_path / "imported", dtype="fp32")
    direct, tok, _, _ = load_run(folder)
    imported, imported_tok, _, meta = load_run(out)
    assert meta["public"]["model_type"] == "ouro" and (out / "manifest.json").is_file()
    assert imported_tok.stop_ids == tok.stop_ids
    idx = tokens(direct, (1, 6))
    assert torch.equal(imported(idx, n_loops=3), direct(idx, n_loops=3))
    with pytest.raises(ValueError, match="is not empty"):
        import_public_model(folder, out)


# ---- bad folders: one line each -----------------------------------------------------------------
def _rewrite(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family, changes, match", [
    ("ouro", dict(model_type="llama"), r"model_type='llama' is not a looped model loopedlm "
                                       r"runs: supported are \['huginn_raven', 'ouro'\]"),
    ("ouro", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"rope_scaling.rope_type='yarn' is not supported: 'default'"),
    ("ouro", dict(use_sliding_window=True), r"use_sliding_window=True is not supported"),
    ("ouro", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported: 'silu'"),
    ("ouro", dict(head_dim=16), r"head_dim=16 is not supported"),
    ("huginn", dict(injection_type="additive"),
     r"injection_type='additive' is not supported: 'linear'"),
    ("huginn", dict(bias=True), r"bias=True is not supported: False"),
    ("huginn", dict(state_init="normal"), r"state_init='normal' is not supported"),
    ("huginn", dict(num_key_value_heads=2), r"num_key_value_heads=2 is not supported"),
])
def test_unsupported_config_is_one_line(tmp_path, family, changes, match):
    folder, _, _ = FOLDERS[family](tmp_path)
    _rewrite(folder, **changes)
    with pytest.raises(ValueError, match=match) as info:
        load_model(folder)
    assert "\n" not in str(info.value)


def test_missing_and_unknown_weights_are_named(tmp_path):
    config = tiny_ouro_config()
    weights = ouro_weights(config)
    del weights["model.layers.1.input_layernorm_2.weight"]
    folder = write_ouro_folder(tmp_path / "missing", config, weights)
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.input_layernorm_2\.weight"):
        load_model(folder)
    weights = ouro_weights(config)
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    folder = write_ouro_folder(tmp_path / "extra", config, weights)
    with pytest.raises(ValueError, match=r"1 weight\(s\) loopedlm does not know for this "
                                         r"model: model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_model(folder)
    weights = ouro_weights(tiny_ouro_config(intermediate_size=40))
    folder = write_ouro_folder(tmp_path / "shape", config, weights)
    with pytest.raises(ValueError, match="size mismatch for transformer.h.0.mlp.c_gate.weight"):
        load_model(folder)


def test_weights_beyond_the_config_are_named(tmp_path):
    weights = ouro_weights(tiny_ouro_config(num_hidden_layers=3))
    folder = write_ouro_folder(tmp_path / "deeper", tiny_ouro_config(), weights)
    with pytest.raises(ValueError, match=r"not in this config model\.layers\.2\."):
        load_model(folder)


@pytest.mark.parametrize("family, thresholds", [("ouro", (0.3, 0.9)), ("huginn", (0.05, 10.0))])
@torch.no_grad()
def test_serve_takes_n_loops_and_the_exit_threshold_per_request(tmp_path, family, thresholds):
    """The server answers each request at its own n_loops and exit threshold (Ouro's: its
    gate's rule; Huginn's: the latent difference), as generate() does alone."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from loopedlm.infer.generate import generate
    from loopedlm.infer.server import ServeConfig, create_app, serve_in_background

    folder, _, _ = FOLDERS[family](tmp_path, std=0.3, vocab_size=290)
    write_tokenizer(folder)
    model, tokenizer, _, _ = load_run(folder)
    app = create_app(model, tokenizer, name=family, config=ServeConfig(max_batch=2, max_len=32))
    with serve_in_background(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        loops_seen = set()
        for n_loops, q in [(4, None), (3, None), *((4, q) for q in thresholds)]:
            options = {"n_loops": n_loops, "return_loops": True}
            if q is not None:
                options["adaptive_threshold"] = q  # the model's own exit rule
            r = client.completions.create(model=family, prompt="the cat", max_tokens=6,
                                          temperature=0, extra_body=options)
            alone = generate(model, "the cat", tokenizer=tokenizer, n_loops=n_loops,
                             max_tokens=6, temperature=0, adaptive_threshold=q,
                             stop=list(tokenizer.stop_ids))
            choice = r.model_dump()["choices"][0]
            assert choice["text"] == alone.texts[0] and choice["loops"] == alone.loops[0]
            loops_seen.add(choice["mean_loops"])
        assert len(loops_seen) >= 3


@pytest.mark.parametrize("family", list(FOLDERS))
def test_serve_command_takes_a_bf16_folder(tmp_path, monkeypatch, family):
    """`loopedlm serve FOLDER --max-len N` on bf16 weights: the app it would listen with
    answers at a request's own n_loops and exit threshold."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from loopedlm.cli import main
    from loopedlm.infer import server

    folder, _, _ = FOLDERS[family](tmp_path, vocab_size=290, dtype=torch.bfloat16)
    write_tokenizer(folder)
    apps = []
    with monkeypatch.context() as patch:  # `serve` builds its app, takes no port, runs nothing
        patch.setattr(server, "listen", lambda host, port: socket.socket())
        patch.setattr(server.uvicorn.Server, "run",
                      lambda self, sockets=None: apps.append(self.config.app))
        assert main(["serve", str(folder), "--device", "cpu", "--max-len", "24",
                     "--max-batch", "2"]) == 0
    with server.serve_in_background(apps[0]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        # the prompt runs every loop; a decoded token stops at its min_loops (2) when every
        # state change is below the threshold
        for options, loops in [({"n_loops": 3}, [3, 3, 3]),
                               ({"n_loops": 4, "adaptive_threshold": 1e9,
                                 "adaptive_criterion": "state"}, [4, 2, 2])]:
            r = client.completions.create(model=name, prompt="the cat", max_tokens=3,
                                          temperature=0,
                                          extra_body={**options, "return_loops": True})
            assert r.model_dump()["choices"][0]["loops"] == loops


def test_ouro_1_4b_served_in_bf16_fits_24_gib(monkeypatch):
    """benchmarks/bench_public_models.py --fit: Ouro-1.4B's exact shape on the meta device
    (nothing allocated) takes its published parameter count in bf16, a KV cache of one
    entry per loop and layer, and with the recommended serve settings fits 24 GiB."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_public_models import OURO_1_4B, SERVE, memory_estimate

    c = OURO_1_4B
    d, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], \
        c["num_hidden_layers"]
    per_layer = 4 * d * d + 3 * d * i + 4 * d  # q, k, v, o (no GQA); gate, up, down; 4 norms
    params = 2 * v * d + layers * per_layer + d + d + 1  # embedding, head, final norm, gate
    parts = memory_estimate()
    rope = parts["weights"] - 2 * params  # the RoPE tables, buffers beside the weights
    assert 0 <= rope < 64 * 2**20
    kv_per_token = SERVE["max_loops"] * layers * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    assert parts["kv_cache"] == SERVE["max_batch"] * SERVE["max_len"] * kv_per_token
    assert sum(parts.values()) < 24 * 2**30
    # fp32 weights would not leave room for the same cache
    assert sum(memory_estimate(dtype=torch.float32).values()) > 24 * 2**30


# ---- Huginn: prelude, adapter, recurrent core, coda ------------------------------------------------
@pytest.mark.parametrize("options", [
    {},  # tied head, query/key bias, their RoPE buffer stored
    dict(tie_embeddings=False),
    dict(lm_head=True, freqs_cis=False),  # a tied head stored anyway
    dict(qk_bias=False, num_key_value_heads=2, n_layers_in_coda=2, n_layers=6),
], ids=["tied", "untied", "tied_head_stored", "gqa_no_bias"])
@torch.no_grad()
def test_huginn_logits_equal_their_computation_at_every_loop(tmp_path, options):
    folder, config, weights = huginn_folder(tmp_path, **options)
    model, meta = load_model(folder)
    assert meta["public"]["model_type"] == "huginn_raven" and model.config.n_loops == 4
    assert model.config.tie_embeddings == config["tie_embeddings"]
    idx = tokens(model, (2, 11))
    theirs, _ = huginn_forward(weights, config, idx, 6)
    for n_loops in range(1, 7):
        torch.testing.assert_close(model(idx, n_loops=n_loops), theirs[n_loops - 1],
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_huginn_random_initial_state_is_theirs_given_the_same_draw(tmp_path):
    """state_init "like-init" (what their code does): a normal draw of std sqrt(2/5d),
    truncated at 3 std, times sqrt(d); with that state, their logits."""
    folder, config, weights = huginn_folder(tmp_path, state_init="like-init")
    model, _ = load_model(folder)
    idx = tokens(model, (3, 40))
    torch.manual_seed(5)
    ours = model(idx, n_loops=3)
    torch.manual_seed(5)
    state = model.prepare(idx).initial_state
    std = math.sqrt(2 / (5 * 32)) * math.sqrt(32)
    assert state.abs().max() <= 3 * std and abs(state.std().item() - 0.986 * std) < 0.05
    theirs, _ = huginn_forward(weights, config, idx, 3, state=state)
    torch.testing.assert_close(ours, theirs[-1], atol=1e-5, rtol=0)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@pytest.mark.parametrize("criterion", ["state", "kl_previous"])
@torch.no_grad()
def test_huginn_exits_by_their_criteria(tmp_path, criterion):
    """After an exact prefill, a decoded token stops where Huginn's published criteria stop
    it in their cached generation, computed here from their computation: "latent-diff"
    ||x_t - x_{t-1}|| / ||x_t|| (our `state` on the raw latent) and "kl" KL(p_{t-1} || p_t)
    from a uniform p_0, its logits those of its exit loop."""
    folder, config, weights = huginn_folder(tmp_path, std=0.2)
    model, _ = load_model(folder)
    idx = tokens(model, (6, 8), seed=2)
    _, latents = huginn_forward(weights, config, idx, 6)

    def read_out_at(loops: list[int]) -> torch.Tensor:
        """As their cached generation: the prompt's coda keys are of its 6 loops, the
        token's read-out is of its latent after `loops[row]` loops."""
        mixed = latents[-1].clone()
        mixed[:, -1] = torch.stack([latents[n - 1][r, -1] for r, n in enumerate(loops)])
        return huginn_read_out(weights, config, mixed)[:, -1]
    logp = [torch.log_softmax(read_out_at([t] * 6), dim=-1) for t in range(1, 7)]
    uniform = torch.full_like(logp[0], -math.log(logp[0].size(-1)))
    if criterion == "state":
        x = [lat[:, -1] for lat in latents]
        measure = [torch.full((6,), math.inf)] + [
            (x[t] - x[t - 1]).norm(dim=-1) / x[t].norm(dim=-1) for t in range(1, 6)]
    else:
        measure = [_kl(([uniform] + logp)[t], logp[t]) for t in range(6)]
    measure = torch.stack(measure, dim=1)  # (rows, loops)
    seen = set()
    values = measure[:, 1:].flatten().sort().values
    # thresholds half-way between the measured values: none sits on a tie
    for q in ((values[:-1] + values[1:]) / 2)[::4].tolist():
        below = measure < q
        expected = torch.where(below.any(1), below.float().argmax(1) + 1, 6)
        logits, spent = last_token_decoded(model, idx, 6, AdaptiveLoops(q, criterion))
        assert torch.equal(spent, expected), q
        torch.testing.assert_close(logits, read_out_at(expected.tolist()), atol=ATOL, rtol=0)
        seen |= set(spent.tolist())
    assert len(seen) > 2, seen


@torch.no_grad()
def test_huginn_import_hf_keeps_one_tied_matrix(tmp_path):
    from safetensors import safe_open

    from loopedlm.data.hf_import import import_public_model

    folder, _, _ = huginn_folder(tmp_path, vocab_size=290)
    write_tokenizer(folder)
    out = import_public_model(folder, tmp_path / "imported")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    direct, _, _, _ = load_run(folder)
    imported, _, _, _ = load_run(out)
    assert imported.lm_head.weight is imported.transformer.wte.weight
    idx = tokens(direct, (1, 6))
    assert torch.equal(imported(idx, n_loops=3), direct(idx, n_loops=3))


def test_huginn_missing_weight_is_named_in_their_names(tmp_path):
    config = tiny_huginn_config()
    weights = huginn_weights(config)
    del weights["transformer.core_block.1.attn.qk_bias"]
    folder = write_huginn_folder(tmp_path / "missing", config, weights)
    with pytest.raises(ValueError, match=r"missing transformer\.core_block\.1\.attn\.qk_bias"):
        load_model(folder)


# ---- every command takes the folder -----------------------------------------------------------
@pytest.mark.parametrize("family", list(FOLDERS))
def test_sample_info_and_eval_take_a_bf16_folder(tmp_path, capsys, task_data_fixtures, family):
    """The commands on a folder of bf16 weights, as published: sample (adaptive), info, and
    eval at 1, 2, 4 and 8 loops (the budget table: perplexity and every CORE task)."""
    from loopedlm.cli import main

    folder, _, _ = FOLDERS[family](tmp_path, vocab_size=290, dtype=torch.bfloat16)
    write_tokenizer(folder)
    assert main(["sample", str(folder), "--prompt", "the cat", "--max-tokens", "4",
                 "--temperature", "0", "--adaptive-threshold", "0.5"]) == 0
    assert "the cat" in capsys.readouterr().out
    assert main(["info", str(folder)]) == 0
    assert f"backbone              {family}" in capsys.readouterr().out
    wiki = tmp_path / "wiki.valid.raw"
    wiki.write_text(" = The cat = \n \n the cat sat on the mat . \n" * 4)
    out = tmp_path / "eval"
    assert main(["eval", str(folder), "--n-loops", "1,2,4,8", "--tasks", "core",
                 "--max-examples", "1", "--wikitext", str(wiki), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    loops = {"1", "2", "4", "8"}
    assert set(results["metrics"]["wikitext_ppl"]) == set(results["metrics"]["core"]) == loops
    assert all(math.isfinite(v) for v in results["metrics"]["wikitext_ppl"].values())
    assert results["tasks"] and all(set(by_loops) == loops for by_loops in results["tasks"].values())
    assert "| wikitext_ppl |" in table and (out / "budget.png").exists()


@pytest.mark.parametrize("family", list(FOLDERS))
@torch.no_grad()
def test_prompts_prefilled_together_equal_prompts_prefilled_one_by_one(tmp_path, family):
    """`prefill_many` on a public model: Ouro's prompts run in one pass, Huginn's one at a
    time (its coda's read-out attends over the whole prompt); either way each prompt's last
    logits and the decoding after them equal prefilling the prompts one by one."""
    folder, _, _ = FOLDERS[family](tmp_path)
    model, _ = load_model(folder)
    idx = tokens(model, (3, 10), seed=8)
    lengths = [4, 7, 5]
    params = SequenceParams(n_loops=4)
    alone = DecodeEngine(model, max_batch=3, max_loops=4)
    expected = [alone.prefill(r, idx[r, :n], params)[-1] for r, n in enumerate(lengths)]
    together = DecodeEngine(model, max_batch=3, max_loops=4)
    got = together.prefill_many([(r, idx[r, :n], params) for r, n in enumerate(lengths)])
    for logits, want in zip(got, expected, strict=True):
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    for t in range(2):  # each row's next token (its own position), teacher-forced
        feed = torch.stack([idx[r, n + t] for r, n in enumerate(lengths)])
        torch.testing.assert_close(together.decode(feed)[0], alone.decode(feed)[0], atol=ATOL,
                                   rtol=0)
