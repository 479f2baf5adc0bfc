"""Sweep files, run expansion and the report (on synthetic run folders)."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm.experiments.report.claims import claim_sentences
from loopedlm.experiments.report.lr_curves import lr_curves, parabola_minimum
from loopedlm.experiments.report.write import write_report
from loopedlm.experiments.sweep import Sweep, run_sweep

SWEEP = """
[sweep]
experiment = "loop_scaling"
recipe = "tiny"
seeds = [0, 1]
[train]
steps = 3
[grid]
"model.loop_mode" = ["lt", "flt"]
"model.n_loops" = [2, 3]
[[runs]]
"model.loop_mode" = "flt_res"
"model.n_loops" = 3
[eval]
loops = [1, 3]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_expand_grid_runs_and_seeds(tmp_path):
    sweep = Sweep.load(write(tmp_path, SWEEP))
    specs = sweep.expand()
    assert len(specs) == (4 + 1) * 2
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    assert "loop_mode=lt,n_loops=2,seed=1" in names
    flt_res = [s for s in specs if "flt_res" in s.name][0]
    assert flt_res.settings == {"steps": 3, "model.loop_mode": "flt_res", "model.n_loops": 3,
                                "seed": 0}
    assert '--model.loop_mode="flt_res"' in flt_res.train_args()


def test_dry_run_lists_commands(tmp_path):
    sweep = Sweep.load(write(tmp_path, SWEEP))
    rows = run_sweep(sweep, tmp_path / "out", dry_run=True)
    assert len(rows) == 10 and all(r["status"] == "planned" for r in rows)
    cmd = rows[0]["train_cmd"]
    assert cmd[1:4] == ["-m", "loopedlm", "train"] and "--steps=3" in cmd
    assert rows[0]["eval_cmd"][-2:] == ["--n-loops", "1,3"]


def test_several_grids_in_order_with_their_own_seeds(tmp_path):
    sweep = Sweep.load(write(tmp_path, """
[sweep]
seeds = [0, 1]
[[grid]]
"model.n_loops" = [2, 8]
seed = [5]
[[grid]]
"model.n_loops" = [2]
steps = [10]
[[runs]]
"model.n_loops" = 4
seed = 7
"""))
    specs = sweep.expand()
    assert [s.name for s in specs] == ["n_loops=2,seed=5", "n_loops=8,seed=5",
                                       "n_loops=2,steps=10,seed=0", "n_loops=2,steps=10,seed=1",
                                       "n_loops=4,seed=7"]
    assert specs[0].settings == {"model.n_loops": 2, "seed": 5}
    with pytest.raises(ValueError, match="non-empty list"):
        Sweep.load(write(tmp_path, "[[grid]]\n'model.n_loops' = [2]\n[[grid]]\nsteps = 3\n"))


def test_resume_only_from_a_complete_checkpoint(tmp_path):
    """Regression: a run killed before its first checkpoint has a config.json but nothing
    to resume from; asking it to resume made `loopedlm train` fail on every later try."""
    from loopedlm.model.checkpoint import (
        CONFIG_FILE,
        MODEL_FILE,
        TRAIN_META_FILE,
        TRAIN_STATE_FILE,
    )

    sweep = Sweep.load(write(tmp_path, SWEEP))
    first = sweep.expand()[0].name
    run_dir = tmp_path / "out" / first
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    cmd = run_sweep(sweep, tmp_path / "out", dry_run=True)[0]["train_cmd"]
    assert "--resume=true" not in cmd
    ckpt = run_dir / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    for name in (MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE, TRAIN_META_FILE):
        (ckpt / name).write_text("")
    assert "--resume=true" in run_sweep(sweep, tmp_path / "out", dry_run=True)[0]["train_cmd"]


@pytest.mark.parametrize("text,match", [
    ("[sweeps]\nx=1\n", "unknown section"),
    ("[sweep]\nexperment='x'\n", "unknown \\[sweep\\] key"),
    ("[grid]\n'model.n_loops' = []\n", "non-empty list"),
    ("[sweep]\nseeds = 3\n", "seeds=3"),
    ("[eval]\nloop = [1]\n", "unknown \\[eval\\] key"),
    ("[sweep\n", "not valid TOML"),
])
def test_bad_sweep_files(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        Sweep.load(write(tmp_path, text))


def test_missing_sweep_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Sweep.load(tmp_path / "nope.toml")


def fake_run(sweep_dir: Path, name: str, settings: dict, *, bpb: float, status="completed",
             steps=5, eval_loops=(1, 3)):
    run = sweep_dir / name
    run.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        loss = bpb * 3 + 1 / step
        records.append({"step": step, "loss": loss if status == "completed" or step < steps
                        else math.inf, "residual_norm": [1.0 + step, 2.0 * step],
                        "grad_norm/first_mlp": 0.5 / step})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({
        "status": status, "step": steps, "final_loss": records[-1]["loss"],
        "val_bpb": bpb if status == "completed" else None, "total_wall_time_s": 1.0,
        "params": 1000, "collapse": {"status": "ok" if status == "completed" else "collapsed"}}))
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"loops": list(eval_loops), "metrics": {
        "val_bpb": {str(n): bpb + 0.1 / n for n in eval_loops},
        "hellaswag": {str(n): 0.25 + 0.01 * n for n in eval_loops}}}))
    return {"name": name, "settings": settings, "status": status}


@pytest.mark.parametrize("experiment", ["loop_scaling", "stability", "attention", "test_time",
                                        "residual_scaling", "custom"])
def test_report_writes_tables_and_figures(tmp_path, experiment):
    rows = []
    for mode in ["lt", "flt"]:
        for n in [2, 3]:
            for seed in [0, 1]:
                for lr in [0.5, 1.0]:
                    settings = {"model.loop_mode": mode, "model.n_loops": n, "seed": seed,
                                "optim.lr_scale": lr, "model.residual_scale": "inv_loops"}
                    name = f"{mode}-{n}-{seed}-{lr}"
                    status = "collapsed" if (mode == "lt" and n == 3) else "completed"
                    rows.append(fake_run(tmp_path, name, settings, bpb=2.0 - 0.1 * n * lr,
                                         status=status))
    (tmp_path / "sweep.json").write_text(json.dumps({"experiment": experiment, "runs": rows,
                                                     "command": "loopedlm sweep x"}))
    report = write_report(tmp_path)
    text = report.read_text()
    assert "## All runs" in text and text.count("| lt-3-0-0.5 | collapsed |") == 1
    for image in [line.split("(")[1].rstrip(")") for line in text.splitlines()
                  if line.startswith("![")]:
        assert (tmp_path / image).stat().st_size > 1000
    if experiment == "loop_scaling":
        assert "Validation bits-per-byte" in text and "hellaswag" in text
    if experiment == "stability":
        assert "Collapse by configuration" in text
    if experiment == "residual_scaling":
        # lower bpb at lr 1.0 in the fake data: the grid's upper edge, no interpolation
        assert "| flt | inv_loops | - | 2 | 1x | 1.8000 ± 0.0000 (n=2) | at the grid's upper edge" \
            in text


def test_report_needs_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep.json"):
        write_report(tmp_path)


def test_report_command_names_each_report_it_writes(tmp_path, capsys):
    """`loopedlm report A B` writes one report per sweep and prints its path; `write_report`
    itself prints nothing."""
    from loopedlm.cli import main

    for name in ("a", "b"):
        rows = [fake_run(tmp_path / name, "r0", {"seed": 0}, bpb=2.0)]
        (tmp_path / name / "sweep.json").write_text(json.dumps({"runs": rows}))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    reports = [tmp_path / name / "report.md" for name in ("a", "b")]
    assert capsys.readouterr().out.splitlines() == [f"wrote {path}" for path in reports]
    assert all("| r0 | completed |" in path.read_text() for path in reports)
    write_report(tmp_path / "a")
    assert capsys.readouterr().out == ""


def test_sweep_end_to_end_then_report(tmp_path):
    """Two real (tiny) runs through `loopedlm sweep`, resumed as finished, then the report."""
    from train_helpers import make_corpus

    data_dir, tok_dir = make_corpus(tmp_path / "corpus")
    path = write(tmp_path, f"""
[sweep]
experiment = "loop_scaling"
recipe = "micro"
[train]
data_dir = "{data_dir}"
tokenizer = "{tok_dir}"
steps = 2
eval_tokens = 512
total_batch_tokens = 256
device_batch_size = 4
sequence_len = 32
sample_tokens = 2
"model.sequence_len" = 32
"model.d_model" = 32
[grid]
"model.loop_mode" = ["lt", "flt"]
"model.n_loops" = [2]
[eval]
loops = [1, 2]
args = ["--tasks", "none", "--val-batches", "1"]
""")
    sweep = Sweep.load(path)
    rows = run_sweep(sweep, tmp_path / "out")
    assert [r["status"] for r in rows] == ["completed", "completed"], rows
    assert all(r["eval_status"] == "evaluated" for r in rows)
    again = run_sweep(sweep, tmp_path / "out")  # resumable: finished runs are skipped
    assert [r["status"] for r in again] == ["skipped (finished)"] * 2
    text = write_report(tmp_path / "out").read_text()
    assert "| loop_mode=flt,n_loops=2,seed=0 | completed | 2 |" in text
    assert "val_bpb at the trained loop count" in text


def test_in_process_sweep_trains_like_train_and_survives_a_bad_run(tmp_path):
    """`--in-process` gives the run `train()` gives; a run that fails is recorded and the
    sweep goes on."""
    from train_helpers import make_corpus

    from loopedlm.train.config import build_config, parse_train_args
    from loopedlm.train.trainer import train

    data_dir, tok_dir = make_corpus(tmp_path / "corpus")
    settings = f"""
recipe = "micro"
[train]
data_dir = "{data_dir}"
tokenizer = "{tok_dir}"
steps = 2
eval_tokens = 128
total_batch_tokens = 256
device_batch_size = 4
sequence_len = 32
sample_tokens = 2
"model.sequence_len" = 32
"model.d_model" = 32
[grid]
"model.n_loops" = [0, 2]
"""
    sweep = Sweep.load(write(tmp_path, "[sweep]" + settings))
    rows = run_sweep(sweep, tmp_path / "out", in_process=True)
    assert rows[0]["status"].startswith("failed") and rows[1]["status"] == "completed"
    assert "n_loops" in (tmp_path / "out" / f"{rows[0]['name']}.log").read_text()
    swept = json.loads((tmp_path / "out" / rows[1]["name"] / "summary.json").read_text())
    args = rows[1]["train_cmd"][4:]
    recipe, overrides = parse_train_args([a.replace(str(tmp_path / "out"), str(tmp_path / "direct"))
                                         for a in args])
    direct = train(build_config(recipe, overrides))
    assert swept["final_loss"] == direct["final_loss"] and swept["val_bpb"] == direct["val_bpb"]


@settings(max_examples=40, deadline=None)
@given(vertex=st.floats(-2.5, 2.5), curvature=st.floats(0.01, 1.0), floor=st.floats(1.0, 3.0))
def test_parabola_minimum_recovers_a_sub_grid_optimum(vertex, curvature, floor):
    xs = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    ys = [floor + curvature * (x - vertex) ** 2 for x in xs]
    x, y = parabola_minimum(xs, ys)
    assert x == pytest.approx(vertex, abs=1e-6) and y == pytest.approx(floor, abs=1e-6)


def test_parabola_minimum_of_a_tie_with_the_edge_lies_between_them():
    # regression: hypothesis found vertex=-2.5, where the grid points -3 and -2 tie and the
    # edge one was taken as the minimum (None) although the vertex is inside the grid
    xs = [-3.0, -2.0, -1.0, 0.0]
    x, y = parabola_minimum(xs, [1.0 + (x + 2.5) ** 2 for x in xs])
    assert x == pytest.approx(-2.5) and y == pytest.approx(1.0)


def test_parabola_minimum_at_the_edge_is_none():
    assert parabola_minimum([0.0, 1.0, 2.0], [1.0, 2.0, 3.0]) is None
    assert parabola_minimum([0.0, 1.0, 2.0], [3.0, 2.0, 1.0]) is None


def _lr_runs(shape, scales=("none", "inv_sqrt_loops", "lambda_loops_sqrt_depth"), steps=(100,),
             seeds=(0, 1)):
    """Synthetic residual-scaling runs: val BPB = shape(scale, n, log2 lr) + seed jitter."""
    runs = []
    for scale in scales:
        for horizon in steps:
            for n in (2, 8):
                for x in range(-3, 4):
                    for seed in seeds:
                        bpb = shape(scale, n, x, horizon) + 0.0001 * seed
                        runs.append({"settings": {"model.loop_mode": "lt", "steps": horizon,
                                                  "model.residual_scale": scale,
                                                  "model.n_loops": n, "optim.lr_scale": 2.0 ** x,
                                                  "seed": seed},
                                     "summary": {"status": "completed", "val_bpb": bpb},
                                     "dir": Path("/nonexistent")})
    return runs


def test_claims_are_decided_from_the_data():
    # the paper's world: lambda beats inv_sqrt; under lambda the optimum stays at 0, under
    # the others it moves right with N
    def paper(scale, n, x, steps):
        base = {"none": 2.9, "inv_sqrt_loops": 2.8, "lambda_loops_sqrt_depth": 2.7}[scale]
        shift = 0.0 if scale == "lambda_loops_sqrt_depth" else (0.3 if n == 8 else 0.0)
        return base + 0.05 * (x - shift) ** 2

    text = " ".join(claim_sentences(lr_curves(_lr_runs(paper, steps=(100, 30)))))
    assert "Claim 1" in text and "**reproduced**" in text.split("Claim 2")[0]
    assert "**reproduced**" in text.split("Claim 2")[1]
    assert "is the same at every horizon" in text

    # the opposite world: inv_sqrt better, lambda's optimum moves a full grid step
    def other(scale, n, x, steps):
        base = {"none": 2.9, "inv_sqrt_loops": 2.6, "lambda_loops_sqrt_depth": 2.7}[scale]
        shift = 1.0 if (scale == "lambda_loops_sqrt_depth" and n == 8) else 0.0
        return base + 0.05 * (x - shift) ** 2

    text = " ".join(claim_sentences(lr_curves(_lr_runs(other))))
    claim1, claim2 = text.split("Claim 2")
    assert "**not reproduced**" in claim1 and "**not reproduced**" in claim2
    assert "+1 and the interpolated optimum +1.00 grid steps" in claim2


def test_claim_2_needs_an_interior_minimum():
    def edge(scale, n, x, steps):  # lambda at N=8 keeps improving up to the largest rate
        return 2.7 - 0.01 * x if (scale == "lambda_loops_sqrt_depth" and n == 8) else 2.7 + 0.05 * x * x

    text = " ".join(claim_sentences(lr_curves(_lr_runs(edge))))
    assert "**not reproduced**" in text.split("Claim 2")[1]
    assert "minimum at the grid's edge" in text
