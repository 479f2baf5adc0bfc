"""Bad inputs (issue 13): over 60 of them across the command line, configuration, data,
checkpoints and prompts. Each must end with a non-zero exit code (0 only where the input is
accepted on purpose, noted in the table) and one line naming the problem, never a traceback.

The cases also produce docs/bad_inputs.md (exit code and first line of each message); the
test fails when the committed file is out of date. Regenerate it with

    LOOPEDLM_UPDATE_DOCS=1 python -m pytest tests/test_bad_inputs.py
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reference_huginn import huginn_weights, tiny_huginn_config, write_huginn_folder
from reference_ouro import ouro_weights, tiny_ouro_config, write_ouro_folder
from train_helpers import make_corpus

from loopedlm.cli import exit_codes, main

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md"
TINY = ["--model.depth=2", "--model.d_model=32", "--model.n_head=2", "--model.sequence_len=32",
        "--model.n_loops=2", "--total_batch_tokens=256", "--device_batch_size=4", "--steps=2",
        "--eval_tokens=256", "--device=cpu", "--progress=false", "--sample_tokens=4"]


def _shard_folder(root: Path, name: str, write_bad) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["the king said good night"] * 8}), folder / "b_val.parquet")
    write_bad(folder / "a_train.parquet")
    return folder


def _cases(root: Path, data_dir: Path, tok: Path, run: Path) -> list[tuple[str, str, list[str]]]:
    """(area, what is wrong, argv) for every case; paths live under `root`."""
    (root / "notes.txt").write_text("not a folder")
    (root / "empty").mkdir()
    one = root / "one_shard"
    one.mkdir()
    shutil.copy(sorted(data_dir.glob("*.parquet"))[0], one / "a.parquet")
    (root / "broken.toml").write_text("steps = = 3\n")
    (root / "wiki.raw").write_text("")
    shards = {
        "no_text": lambda p: pq.write_table(pa.table({"content": ["x"]}), p),
        "int_text": lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
        "not_parquet": lambda p: p.write_bytes(b"PAR1 this is not parquet" * 10),
        "empty_file": lambda p: p.write_bytes(b""),
        "truncated": lambda p: (pq.write_table(pa.table({"text": ["a doc"] * 50}), p),
                                p.write_bytes(p.read_bytes()[:-40])),
        "not_utf8": lambda p: pq.write_table(
            pa.table({"text": pa.array([b"caf\xe9"], type=pa.binary())}), p),
    }
    bad = {name: _shard_folder(root / "shards", name, write) for name, write in shards.items()}

    def damaged(name: str, damage) -> Path:
        copy = root / "runs" / name
        shutil.copytree(run, copy)
        for ckpt in (copy / "checkpoints").glob("step_*"):
            damage(ckpt)
        return copy

    def cut(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))

    truncated = damaged("truncated_model", lambda c: cut(c / "model.safetensors"))
    flipped = damaged("bit_flip", lambda c: flip(c / "model.safetensors"))
    no_config = damaged("no_config", lambda c: (c / "config.json").unlink())
    bad_json = damaged("bad_config", lambda c: (c / "config.json").write_text("{oops"))
    bad_manifest = damaged("bad_manifest", lambda c: (c / "manifest.json").write_text("[]"))
    bad_state = damaged("truncated_state", lambda c: cut(c / "train_state.pt"))
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    def ouro(name: str, drop: str = "", add: str = "", **config_changes) -> str:
        """A tiny Ouro folder (published format), with a changed config or weights."""
        weights = ouro_weights(tiny_ouro_config())
        weights.pop(drop, None)
        if add:
            weights[add] = weights["model.norm.weight"].clone()
        return str(write_ouro_folder(root / "ouro" / name, tiny_ouro_config(**config_changes),
                                     weights))

    def huginn(name: str, drop: str = "", add: str = "", **config_changes) -> str:
        """A tiny Huginn folder (published format), with a changed config or weights."""
        weights = huginn_weights(tiny_huginn_config())
        weights.pop(drop, None)
        if add:
            weights[add] = weights["transformer.ln_f.weight"].clone()
        return str(write_huginn_folder(root / "huginn" / name,
                                       tiny_huginn_config(**config_changes), weights))

    r, t = str(run), [f"--data_dir={data_dir}", f"--tokenizer={tok}", *TINY]
    d = lambda name: [f"--data_dir={bad[name]}", f"--tokenizer={tok}", *TINY]  # noqa: E731
    fresh = lambda name: [f"--run_dir={root / 'new' / name}"]  # noqa: E731
    syn = lambda name: ["--out", str(root / "synthetic" / name)]  # noqa: E731
    return [
        # ---- command line
        ("cli", "no command", []),
        ("cli", "unknown command", ["frobnicate"]),
        ("cli", "sample without a run", ["sample"]),
        ("cli", "sample without --prompt", ["sample", r]),
        ("cli", "--max-tokens not a number", ["sample", r, "--prompt", "a", "--max-tokens", "x"]),
        ("cli", "negative temperature", ["sample", r, "--prompt", "a", "--temperature", "-1"]),
        ("cli", "top-p above 1", ["sample", r, "--prompt", "a", "--top-p", "2"]),
        ("cli", "top-k of 0", ["sample", r, "--prompt", "a", "--top-k", "0"]),
        ("cli", "0 loops", ["sample", r, "--prompt", "a", "--n-loops", "0"]),
        ("cli", "unknown adaptive criterion",
         ["sample", r, "--prompt", "a", "--adaptive-criterion", "nope"]),
        ("cli", "adaptive threshold below 0",
         ["sample", r, "--prompt", "a", "--adaptive-threshold", "-1"]),
        ("cli", "adaptive prompt without a threshold",
         ["sample", r, "--prompt", "a", "--adaptive-prompt"]),
        ("cli", "0 cache slots", ["sample", r, "--prompt", "a", "--cache-slots", "0"]),
        ("cli", "draft loops not below n_loops",
         ["sample", r, "--prompt", "a", "--n-loops", "2", "--draft-loops", "2"]),
        ("cli", "0 draft loops", ["sample", r, "--prompt", "a", "--draft-loops", "0"]),
        ("cli", "eval at 0 loops", ["eval", r, "--n-loops", "0"]),
        ("cli", "eval loops not numbers", ["eval", r, "--n-loops", "a,b"]),
        ("cli", "misspelt task", ["eval", r, "--tasks", "helaswag"]),
        ("cli", "missing WikiText file", ["eval", r, "--wikitext", str(root / "no.raw")]),
        ("cli", "0 examples per task", ["eval", r, "--max-examples", "0"]),
        ("cli", "info of an unknown preset", ["info", "nonsense"]),
        ("cli", "info override without '='", ["info", "tiny", "--set", "n_loops"]),
        ("cli", "info override of an unknown field", ["info", "tiny", "--set", "n_loopz=3"]),
        ("cli", "info --key=value of an unknown field", ["info", "tiny", "--n_loopz=3"]),
        ("cli", "info --key=value of 0 loops", ["info", "tiny", "--n_loops=0"]),
        ("cli", "info at 0 loops", ["info", "tiny", "--n-loops", "0"]),
        ("cli", "info --n-loops without a count", ["info", "tiny", "--n-loops"]),
        ("cli", "info --key=value with a section", ["info", "tiny", "--model.n_loops=3"]),
        ("cli", "info stray argument after the preset", ["info", "tiny", "six"]),
        ("cli", "tokenizer from a missing folder",
         ["tokenizer", "train", "--data", str(root / "no_corpus"), "--vocab-size", "300", "--out",
          str(root / "tok")]),
        ("cli", "tokenizer info of a missing tokenizer", ["tokenizer", "info", "nope"]),
        ("cli", "FineWeb-Edu with 1 shard", ["data", "fineweb-edu", "--shards", "1"]),
        ("cli", "synthetic: unknown task", ["data", "synthetic", "sudoku", *syn("s1")]),
        ("cli", "synthetic: 0 hops", ["data", "synthetic", "chain", "--hops", "0-4", *syn("s2")]),
        ("cli", "synthetic: hops not a range", ["data", "synthetic", "chain", "--hops", "1,3",
                                                *syn("s3")]),
        ("cli", "synthetic: hops not numbers", ["data", "synthetic", "chain", "--hops", "a-b",
                                                *syn("s4")]),
        ("cli", "synthetic: documents too short for the hops",
         ["data", "synthetic", "chain", "--seq-len", "40", *syn("s5")]),
        ("cli", "synthetic: an option of the other task",
         ["data", "synthetic", "chain", "--alphabet", "4", *syn("s6")]),
        ("cli", "synthetic: 0 training documents",
         ["data", "synthetic", "phop", "--train-docs", "0", *syn("s7")]),
        ("cli", "synthetic: perm asking every letter",
         ["data", "synthetic", "perm", "--asked", "16", *syn("s8")]),
        ("cli", "synthetic: compose with no functions",
         ["data", "synthetic", "compose", "--functions", "0", *syn("s9")]),
        ("cli", "eval --tasks synthetic of a run trained on text", ["eval", r, "--tasks",
                                                                    "synthetic"]),
        ("cli", "eval adaptive threshold not a number",
         ["eval", r, "--tasks", "synthetic", "--adaptive-threshold", "fast"]),
        ("cli", "eval adaptive threshold below 0",
         ["eval", r, "--tasks", "synthetic", "--adaptive-threshold", "-0.1"]),
        ("cli", "eval adaptive threshold without synthetic tasks",
         ["eval", r, "--adaptive-threshold", "0.1"]),
        ("cli", "plot of a missing run", ["plot", str(root / "no_run")]),
        ("cli", "sweep file missing", ["sweep", str(root / "no_sweep.toml")]),
        ("cli", "sweep with a misspelt train setting", ["sweep", "loop_scaling_tiny", "--stepz=2"]),
        ("cli", "sweep setting the seed the sweep owns", ["sweep", "loop_scaling_tiny",
                                                          "--seed=1"]),
        ("cli", "report of a missing sweep", ["report", str(root / "no_sweep")]),
        ("cli", "import a missing nanochat checkpoint",
         ["import-nanochat", str(root / "no_nanochat"), str(root / "out")]),
        # ---- configuration (`loopedlm train`)
        ("config", "unknown recipe", ["train", "tinny"]),
        ("config", "recipe that is not TOML", ["train", str(root / "broken.toml")]),
        ("config", "two recipes", ["train", "tiny", "small"]),
        ("config", "misspelt setting", ["train", "--stepz=10"]),
        ("config", "unknown section", ["train", "--modle.n_loops=3"]),
        ("config", "steps = 0", ["train", "--steps=0"]),
        ("config", "steps not a number", ["train", "--steps=ten"]),
        ("config", "unknown loop mode", ["train", "--model.loop_mode=flt2"]),
        ("config", "0 loops", ["train", "--model.n_loops=0"]),
        ("config", "0 loops (the --n-loops shorthand)", ["train", "--n-loops", "0"]),
        ("config", "--n-loops without a count", ["train", "--n-loops", "--steps=2"]),
        ("config", "heads do not divide d_model", ["train", "--model.d_model=100",
                                                   "--model.n_head=3"]),
        ("config", "unknown preset", ["train", "--preset=huge"]),
        ("config", "BPE vocabulary below 256", ["train", "--tokenizer=bpe:10"]),
        ("config", "unsupported dtype", ["train", "--dtype=float16"]),
        ("config", "unknown head loss backend", ["train", "--head_loss=fused"]),
        ("config", "cut-cross-entropy head on the CPU", ["train", *t, *fresh("cce"),
                                                          "--head_loss=cce"]),
        ("config", "boolean spelt 'maybe'", ["train", "--progress=maybe"]),
        ("config", "negative gradient clip", ["train", "--grad_clip=-1"]),
        ("config", "two horizons", ["train", "--steps=10", "--flops_budget=1e12"]),
        ("config", "batch does not divide", ["train", "--total_batch_tokens=1000"]),
        ("config", "sequence longer than the model's", ["train", "--sequence_len=100000"]),
        ("config", "unknown device", ["train", "--device=tpu"]),
        ("config", "unknown parameter basis", ["train", "--param_basis=some"]),
        ("config", "negative learning-rate scale", ["train", "--optim.lr_scale=-1"]),
        ("config", "unknown optimizer setting", ["train", "--optim.momentum=0.9"]),
        ("config", "resume without checkpoints", ["train", *t, *fresh("empty"), "--resume"]),
        ("config", "existing run without --resume", ["train", *t, f"--run_dir={run}"]),
        ("config", "resume with another model", ["train", *t, f"--run_dir={run}", "--resume",
                                                 "--model.n_loops=3"]),
        # ---- data
        ("data", "data folder missing", ["train", *fresh("d1"), *t,
                                         f"--data_dir={root / 'no_data'}"]),
        ("data", "data folder is a file", ["train", *fresh("d2"), *t,
                                           f"--data_dir={root / 'notes.txt'}"]),
        ("data", "no Parquet shards", ["train", *fresh("d3"), *t,
                                       f"--data_dir={root / 'empty'}"]),
        ("data", "one shard only (no validation split)",
         ["train", *fresh("d4"), *t, f"--data_dir={one}"]),
        *[("data", f"shard: {name.replace('_', ' ')}", ["train", *fresh(name), *d(name)])
          for name in shards],
        # ---- checkpoints
        ("checkpoint", "not a run or checkpoint", ["sample", str(root / "empty"), "--prompt", "a"]),
        ("checkpoint", "run folder missing", ["sample", str(root / "no_such_run"), "--prompt", "a"]),
        ("checkpoint", "every model.safetensors truncated",
         ["sample", str(truncated), "--prompt", "a"]),
        ("checkpoint", "truncated model.safetensors, asked for by name",
         ["sample", str(truncated / "checkpoints" / ckpt.name), "--prompt", "a"]),
        ("checkpoint", "a bit flipped in model.safetensors",
         ["info", str(flipped / "checkpoints" / ckpt.name)]),
        ("checkpoint", "config.json missing", ["eval", str(no_config), "--tasks", "none"]),
        ("checkpoint", "config.json not JSON", ["eval", str(bad_json), "--tasks", "none"]),
        ("checkpoint", "manifest.json unreadable", ["sample", str(bad_manifest), "--prompt", "a"]),
        ("checkpoint", "every train_state.pt truncated, resumed",
         ["train", *t, f"--run_dir={bad_state}", "--resume"]),
        # ---- export (a Hugging Face folder)
        ("export", "not a run or checkpoint", ["export", str(root / "empty"), str(root / "hf")]),
        ("export", "OUT exists and is not empty", ["export", r, str(root / "shards")]),
        ("export", "OUT is the run being exported", ["export", r, r, "--force"]),
        ("export", "every checkpoint's manifest unreadable",
         ["export", str(bad_manifest), str(root / "hf")]),
        ("export", "a bit flipped in the checkpoint asked for",
         ["export", str(flipped), str(root / "hf"), "--checkpoint", ckpt.name]),
        ("export", "--checkpoint of a step the run lacks",
         ["export", r, str(root / "hf"), "--checkpoint", "99"]),
        # ---- public looped models (a Hugging Face folder: Ouro)
        ("public model", "import-hf of another architecture",
         ["import-hf", ouro("llama", model_type="llama"), str(root / "imported")]),
        ("public model", "sample a folder of another architecture",
         ["sample", ouro("qwen2", model_type="qwen2"), "--prompt", "a"]),
        ("public model", "a RoPE scaling type",
         ["import-hf", ouro("yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
          str(root / "imported")]),
        ("public model", "sliding-window attention",
         ["eval", ouro("swa", use_sliding_window=True, sliding_window=8), "--tasks", "none"]),
        ("public model", "a weight missing",
         ["sample", ouro("missing", drop="model.norm.weight"), "--prompt", "a"]),
        ("public model", "an unknown weight",
         ["import-hf", ouro("extra", add="model.layers.0.self_attn.q_norm.weight"),
          str(root / "imported")]),
        ("public model", "a Huginn with another injection type",
         ["sample", huginn("additive", injection_type="additive"), "--prompt", "a"]),
        ("public model", "a Huginn weight missing",
         ["eval", huginn("missing", drop="transformer.adapter.weight"), "--tasks", "none"]),
        ("public model", "an unknown Huginn weight",
         ["sample", huginn("extra", add="transformer.core_block.0.attn.q_norm.weight"),
          "--prompt", "a"]),
        ("public model", "exit gate criterion for a model without one",
         ["sample", r, "--prompt", "a", "--adaptive-threshold", "0.5",
          "--adaptive-criterion", "gate"]),
        # ---- prompts
        ("prompt", "empty prompt", ["sample", r, "--prompt", "", "--max-tokens", "2"]),
        ("prompt", "stop id outside the vocabulary",
         ["sample", r, "--prompt", "a", "--stop-id", "99999"]),
        ("prompt", "prompt longer than the context",
         ["sample", r, "--prompt", "the king " * 200, "--max-tokens", "2"]),
        ("prompt", "prompt of control characters",
         ["sample", r, "--prompt", "\x00\x01\x02", "--max-tokens", "2", "--temperature", "0"]),
    ]


def _path_cases(root: Path, data_dir: Path, tok: Path, run: Path, port_in_use: int
                ) -> list[tuple[str, str, list[str], dict[str, str]]]:
    """(area, what is wrong, argv, environment) of every command given a path it cannot
    write (a folder under a file: /dev/null/x, unwritable even for root), a LOOPEDLM_HOME
    that is a file, or a port it cannot listen on (issue 22: D6, D9): `port_in_use`, which
    the test holds (a free port the system chose, so that no other program's release of a
    fixed one can let the server start and never return)."""
    r, t = str(run), [f"--data_dir={data_dir}", f"--tokenizer={tok}", *TINY]
    home = {"LOOPEDLM_HOME": str(root / "notes.txt")}
    bad = "/dev/null/x"
    return [
        ("paths", "data prepare into a folder under a file", ["data", "prepare", "--out", bad], {}),
        ("paths", "data prepare with LOOPEDLM_HOME a file", ["data", "prepare"], home),
        ("paths", "data fineweb-edu into a folder under a file",
         ["data", "fineweb-edu", "--shards", "2", "--out", bad], {}),
        ("paths", "tokenizer train into a folder under a file",
         ["tokenizer", "train", "--data", str(data_dir), "--vocab-size", "300", "--out", bad], {}),
        ("paths", "train into a folder under a file", ["train", *t, f"--run_dir={bad}"], {}),
        ("paths", "train with LOOPEDLM_HOME a file (the default corpus lives there)",
         ["train", f"--run_dir={root / 'new' / 'home'}", *TINY], home),
        ("paths", "plot into a folder under a file", ["plot", r, "--out", bad], {}),
        ("paths", "eval into a folder under a file", ["eval", r, "--tasks", "none", "--out", bad],
         {}),
        ("paths", "lm-eval of a path under a file",
         ["lm-eval", "run", "--model", "loopedlm", "--model_args", f"path={bad}", "--tasks",
          "hellaswag"], {}),
        ("paths", "sample of a path under a file", ["sample", bad, "--prompt", "a"], {}),
        ("paths", "sweep into a folder under a file",
         ["sweep", "loop_scaling_tiny", "--out", bad, "--steps=1"], {}),
        ("paths", "report of a path under a file", ["report", bad], {}),
        ("paths", "info of a path under a file", ["info", bad], {}),
        ("paths", "import-nanochat of a path under a file", ["import-nanochat", bad, bad], {}),
        ("paths", "export into a folder under a file", ["export", r, bad], {}),
        ("paths", "serve a path under a file", ["serve", bad, "--port", "0"], {}),
        ("paths", "serve on port 99999", ["serve", r, "--port", "99999"], {}),
        ("paths", "serve on port -1", ["serve", r, "--port", "-1"], {}),
        ("paths", "serve on a port in use", ["serve", r, "--port", str(port_in_use)], {}),
        ("paths", "serve on an address that is not this machine's",
         ["serve", r, "--host", "192.0.2.1", "--port", "0"], {}),
        ("paths", "serve with a body limit of 0", ["serve", r, "--max-body-bytes", "0"], {}),
    ]


def _run(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr; stdout where stderr is empty, as for `loopedlm` alone)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue() or out.getvalue()


def _first_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[0]


def _clean(text: str, root: Path) -> str:
    text = text.replace(str(root), "<tmp>").replace(str(Path.home()), "~")
    # config.json holds the run's paths, so its size depends on the temporary folder's name
    text = re.sub(r"config\.json has \d+ bytes, its manifest says \d+",
                  "config.json has N bytes, its manifest says M", text)
    return text if len(text) <= 300 else text[:297] + "..."


def _show(argv: list[str], root: Path) -> str:
    hidden = {*TINY, f"--data_dir={root / 'corpus' / 'data'}", f"--tokenizer={root / 'corpus' / 'tok'}"}
    shown = " ".join(a if a and " " not in a and "\x00" not in a else repr(a)
                     for a in argv if a not in hidden)  # the same in every train case
    shown = shown.replace(str(root), "<tmp>")
    return shown if len(shown) <= 100 else shown[:97] + "..."


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[str, list[tuple[str, str, int, str]]]:
    root = tmp_path_factory.mktemp("bad")
    data_dir, tok = make_corpus(root / "corpus")
    run = root / "run"
    assert main(["train", f"--run_dir={run}", f"--data_dir={data_dir}", f"--tokenizer={tok}",
                 *TINY, "--save_every=1"]) == 0
    rows = []
    in_use = socket.socket()
    in_use.bind(("127.0.0.1", 0))
    in_use.listen()
    port = in_use.getsockname()[1]
    cases = [(*case, {}) for case in _cases(root, data_dir, tok, run)]
    for area, what, argv, env in cases + _path_cases(root, data_dir, tok, run, port):
        with mock.patch.dict(os.environ, env):
            code, stderr = _run(argv)
        # an accepted input's output is a sample and a timing: not reproducible, not shown
        first = "(accepted)" if code == 0 else _clean(_first_line(stderr), root)
        shown = " ".join([*(f"{k}={v}" for k, v in env.items()), _show(argv, root)])
        if argv[-2:] == ["--port", str(port)]:  # the port the system chose: not reproducible
            first, shown = (text.replace(f":{port}:", ":<port>:").replace(
                f"--port {port}", "--port <port>") for text in (first, shown))
        rows.append((area, what, code, shown.replace(str(root), "<tmp>"), first, stderr))
    in_use.close()
    lines = ["# Bad inputs and what loopedlm says",
             "",
             "Generated by `tests/test_bad_inputs.py` (the test fails when this file is out of",
             "date; regenerate with `LOOPEDLM_UPDATE_DOCS=1 python -m pytest "
             "tests/test_bad_inputs.py`).",
             "Each row: the input, the exit code, and the first line of the message (the line",
             "with `error`, else the first). `<tmp>` is a temporary folder; train cases also",
             "pass a small test corpus, its tokenizer and tiny-model settings (not shown).",
             "Exit codes: 0 accepted on purpose, 2 bad input, 4 out of memory, 5 a checkpoint",
             "could not be written, 6 the server cannot listen on its port (all of them:",
             "[exit_codes.md](exit_codes.md)).",
             "",
             "| # | area | input | exit | message |",
             "|---|---|---|---|---|"]
    for i, (area, what, code, shown, first, _) in enumerate(rows, 1):
        cell = first.replace("|", "\\|")
        lines.append(f"| {i} | {area}: {what} | `{shown}` | {code} | {cell} |")
    return "\n".join(lines) + "\n", rows


def test_every_bad_input_is_one_clear_line(table):
    _, rows = table
    assert len(rows) >= 60
    documented = {value for name, value in vars(exit_codes).items()
                  if name.isupper() and isinstance(value, int)}
    for area, what, code, _shown, first, stderr in rows:
        assert "Traceback" not in stderr, (what, stderr)
        assert code in documented, (what, code, stderr)
        if area == "paths":  # every command, a path, home or port it cannot use
            assert code in (exit_codes.BAD_INPUT, exit_codes.CANNOT_LISTEN), (what, stderr)
            assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr
        if area == "prompt" and code == 0:
            continue  # accepted on purpose: an empty or odd prompt still samples
        assert code != 0, (what, stderr)
        assert first, (what, stderr)


def test_the_table_in_docs_is_up_to_date(table):
    text, _ = table
    if os.environ.get("LOOPEDLM_UPDATE_DOCS") == "1":
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, (
        "docs/bad_inputs.md is out of date: LOOPEDLM_UPDATE_DOCS=1 python -m pytest "
        "tests/test_bad_inputs.py")


def test_the_table_names_no_machine_path_and_has_one_row_per_case(table):
    text, rows = table
    assert tempfile.gettempdir() not in text and str(Path.home()) not in text
    assert len([line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]) == len(rows)
