"""Checks an exported folder with `transformers` alone: run as a script, in an interpreter where
loopedlm is NOT importable (`sys.modules["loopedlm"] = None`), so the folder's code provably
needs only torch and transformers. tests/test_export_hf.py runs it with the pinned
transformers; benchmarks/nightly.sh with the oldest version the README claims.

    python tests/hf_check.py FOLDER [FOLDER ...]

Beside each FOLDER lies FOLDER.expected.safetensors: `ids` and `logits_nK`, loopedlm's
logits at K loops. Prints one JSON line per folder; exits 1 if any check fails.
"""

import json
import sys
import traceback
from pathlib import Path

sys.modules["loopedlm"] = None  # any `import loopedlm` now raises ImportError

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

TOL = 1e-5  # fp32 rounding, absolute and relative
torch.set_num_threads(1)  # tiny models: one thread is fastest, and two spin on a busy machine


def close(a, b):
    return bool(((a - b).abs() <= TOL + TOL * b.abs()).all())


def check_logits(model, expected):
    ids = expected["ids"]
    for name, logits in expected.items():
        if name.startswith("logits_n"):
            n = int(name[len("logits_n"):])
            with torch.no_grad():
                got = model(ids, n_loops=n).logits
            assert close(got, logits), f"logits at n_loops={n} differ by {(got - logits).abs().max()}"


def check_cached_decoding(model, ids):
    """Prefill, then one token at a time through the cache == the full forward."""
    for n in (1, 3):
        with torch.no_grad():
            full = model(ids, n_loops=n, use_cache=False).logits
            cache = DynamicCache()
            split = max(1, ids.size(1) - 4)
            steps = [model(ids[:, :split], n_loops=n, past_key_values=cache).logits]
            for t in range(split, ids.size(1)):
                steps.append(model(ids[:, t:t + 1], n_loops=n, past_key_values=cache).logits)
        assert len(cache.layers) == model.cache_slots(n), "a cache layer per (loop, block)"
        assert close(torch.cat(steps, 1), full), f"cached decoding differs at n_loops={n}"


def padded_batch(rows, pad_id):
    """Left-padded ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_generate(model, tok, ids):
    if tok is not None:
        prompts = ["The king said", "Good night, sweet", "a"]
        rows = [tok(p).input_ids for p in prompts]
        assert all(r[0] == tok.bos_token_id for r in rows), "the tokenizer adds BOS"
        batch = tok(prompts, padding=True, return_tensors="pt")
        ids_b, mask = batch.input_ids, batch.attention_mask
        pad = tok.pad_token_id
    else:
        rows = [ids[0, :n].tolist() for n in (5, 3, 8)]
        pad = 0
        ids_b, mask = padded_batch(rows, pad)
    for n in (1, 3):
        kw = dict(n_loops=n, max_new_tokens=6, do_sample=False, pad_token_id=pad,
                  eos_token_id=None if tok is None else model.generation_config.eos_token_id)
        with torch.no_grad():
            together = model.generate(ids_b, attention_mask=mask, **kw)[:, ids_b.size(1):]
            for r, row in enumerate(rows):
                alone = model.generate(torch.tensor([row]), **kw)[0, len(row):].tolist()
                got = together[r].tolist()[:len(alone)]
                assert got == alone, f"batched row {r} {got} != alone {alone} at n_loops={n}"


def check_api(model, ids):
    with torch.no_grad():
        out = model(ids[:, :6], n_loops=4, output_hidden_states=True)
    assert len(out.hidden_states) == 5, "hidden states: the embedding and each of 4 loops"
    for bad in (0, -1):
        try:
            model(ids[:, :4], n_loops=bad)
        except ValueError as exc:
            assert "n_loops" in str(exc), str(exc)
        else:
            raise AssertionError(f"n_loops={bad} was accepted")
        try:
            model.generate(ids[:, :4], n_loops=bad, max_new_tokens=2)
        except ValueError as exc:
            assert "n_loops" in str(exc), str(exc)
        else:
            raise AssertionError(f"generate(n_loops={bad}) was accepted")


def check_folder(folder):
    import transformers

    report = {"folder": folder.name, "transformers": transformers.__version__}
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    tok = None
    if (folder / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    if tok is not None:
        specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        assert None not in specials and len(specials) == 3, f"bos/eos/pad {specials}"
    expected = load_file(str(folder.parent / f"{folder.name}.expected.safetensors"))
    for check in (lambda: check_logits(model, expected),
                  lambda: check_cached_decoding(model, expected["ids"][:1]),
                  lambda: check_generate(model, tok, expected["ids"]),
                  lambda: check_api(model, expected["ids"][:1])):
        check()
    report["ok"] = True
    return report


def main(folders):
    failed = 0
    for folder in folders:
        try:
            report = check_folder(Path(folder))
        except Exception as exc:  # report every folder, then fail
            failed += 1
            report = {"folder": folder, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "trace": traceback.format_exc(limit=3)}
        print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
