"""Issue 10: one validation module and one `--key=value` syntax for train, info and sweep.

The parser (loopedlm.common.overrides) and the checks (loopedlm.common.validation) are
tested directly; then that `loopedlm train`, `loopedlm info` and `loopedlm sweep` read the
same settings the same way, and that a sweep's command-line settings sit above its
[train] section and below its grid.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm.cli import main
from loopedlm.common import overrides as overrides_module
from loopedlm.common.overrides import (
    BOOL_WORDS,
    coerce,
    flatten,
    merge,
    parse_overrides,
    parse_value,
)
from loopedlm.common.validation import (
    ConfigError,
    check,
    check_choice,
    check_positive,
    is_int,
    is_number,
    unknown_setting,
)
from loopedlm.experiments import info as info_module
from loopedlm.experiments import sweep as sweep_module
from loopedlm.experiments.info import preset_overrides
from loopedlm.experiments.sweep import RunSpec, Sweep, run_sweep, train_overrides
from loopedlm.model.config import ModelConfig
from loopedlm.train import config as train_config_module
from loopedlm.train.config import build_config, parse_train_args


# ---- validation ---------------------------------------------------------------------------
def test_check_names_the_field_the_value_and_what_is_allowed():
    check(True, "n_loops", 0, "an integer >= 1")
    with pytest.raises(ConfigError, match=r"^n_loops=0 is not allowed: an integer >= 1$"):
        check(False, "n_loops", 0, "an integer >= 1")
    with pytest.raises(ConfigError, match=r"^optim.lr_scale=-1 is not allowed: a number > 0$"):
        check_positive("optim.lr_scale", -1)
    with pytest.raises(ConfigError, match=r"^optim.lr_scale=True is not allowed"):
        check_positive("optim.lr_scale", True)


def test_check_choice_suggests_the_closest_choice_only_when_one_is_close():
    check_choice("loop_mode", "flt", ("lt", "flt"))
    with pytest.raises(ConfigError, match=r"choose one of \['lt', 'flt'\] \(did you mean 'flt'\?\)"):
        check_choice("loop_mode", "fltt", ("lt", "flt"))
    with pytest.raises(ConfigError) as info:
        check_choice("loop_mode", "zzzzzz", ("lt", "flt"))
    assert "did you mean" not in str(info.value)


def test_unknown_setting_hint_or_list():
    assert str(unknown_setting("stepz", ["steps", "seed"])) == \
        "unknown setting 'stepz' (did you mean steps?)"
    assert str(unknown_setting("momentum", ["lr", "beta"], "optim")) == \
        "unknown setting 'optim.momentum'; known: lr, beta"


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3),
                 st.none()))
def test_is_int_and_is_number_never_take_a_bool(value):
    assert is_int(value) == (type(value) is int)
    assert is_number(value) == (type(value) in (int, float))


# ---- the parser ---------------------------------------------------------------------------
def test_parse_value_reads_toml_and_falls_back_to_the_text():
    assert parse_value("6") == 6 and parse_value("2.5") == 2.5 and parse_value("true") is True
    assert parse_value('"a b"') == "a b" and parse_value("[1, 2]") == [1, 2]
    assert parse_value("lt") == "lt" and parse_value("bpe:300") == "bpe:300"


def test_parse_overrides_flags_sections_dashes_and_the_positional():
    recipe, over = parse_overrides(["tiny", "--steps=7", "--model.n_loops=4", "--resume",
                                    "--run-dir=x"], sections=("model",), positional="recipe")
    assert recipe == "tiny"
    assert over == {"steps": 7, "model": {"n_loops": 4}, "resume": True, "run_dir": "x"}
    assert parse_overrides(["--recipe=small"], positional="recipe") == ("small", {})
    with pytest.raises(ValueError, match="unexpected argument 'small': give one recipe and"):
        parse_overrides(["tiny", "small"], positional="recipe")
    with pytest.raises(ValueError, match="unexpected argument 'x': give --key=value settings"):
        parse_overrides(["x"])
    with pytest.raises(ConfigError, match="sections are model., optim."):
        parse_overrides(["--modle.depth=3"], sections=("model", "optim"))
    with pytest.raises(ConfigError, match="have no sections"):
        parse_overrides(["--model.depth=3"])


@pytest.mark.parametrize("word", sorted(BOOL_WORDS))
def test_every_bool_word_is_coerced_for_a_bool_field(word):
    assert coerce(parse_value(word), bool, "x") is BOOL_WORDS[word]


def test_coerce_only_where_unambiguous():
    assert coerce(3, float, "x") == 3.0 and isinstance(coerce(3, float, "x"), float)
    assert coerce(4.0, int, "x") == 4 and isinstance(coerce(4.0, int, "x"), int)
    assert coerce("none", int | None, "x") is None
    assert coerce(300, str, "x") == "300"
    assert coerce("maybe", bool, "x") == "maybe"  # left for the config to reject by name


def test_merge_and_flatten():
    assert merge({"a": 1, "model": {"x": 1, "y": 2}}, {"model": {"y": 3}, "b": 2}) == \
        {"a": 1, "model": {"x": 1, "y": 3}, "b": 2}
    assert flatten({"steps": 2, "model": {"n_loops": 6}}) == {"steps": 2, "model.n_loops": 6}


# ---- one syntax for train, info and sweep ---------------------------------------------------
def test_train_info_and_sweep_share_the_parser():
    for module in (train_config_module, info_module, sweep_module):
        assert module.parse_overrides is overrides_module.parse_overrides, module.__name__
    assert info_module.coerce_fields is train_config_module.coerce_fields


MODEL_SETTINGS = ["n_loops=6", "loop_mode=lt", "residual_lambda=2", "window_pattern=LS",
                  "n_kv_head=1"]


def test_train_info_and_sweep_read_the_same_settings_the_same_way():
    """The same `--key=value` texts give the same values in all three commands."""
    from_info = preset_overrides([f"--{s}" for s in MODEL_SETTINGS])
    _, nested = parse_train_args([f"--model.{s}" for s in MODEL_SETTINGS])
    from_train = build_config("tiny", nested).model
    from_sweep = train_overrides([f"--model.{s}" for s in MODEL_SETTINGS])
    _, through_sweep = parse_train_args(RunSpec("run", from_sweep).train_args())
    assert from_info == from_train == build_config("tiny", through_sweep).model
    assert from_info == {"n_loops": 6, "loop_mode": "lt", "residual_lambda": 2.0,
                         "window_pattern": "LS", "n_kv_head": 1}
    assert preset_overrides(pairs=MODEL_SETTINGS) == from_info  # the older `--set` spelling


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_info_key_value_equals_set_and_the_config():
    code, new = _cli(["info", "tiny", "--n_loops=6", "--loop_mode=lt", "--json"])
    assert code == 0
    code, old = _cli(["info", "tiny", "--json", "--set", "n_loops=6", "loop_mode=lt"])
    assert code == 0 and json.loads(new) == json.loads(old)
    described = json.loads(new)
    assert described["config"] == ModelConfig.preset("tiny", n_loops=6, loop_mode="lt").to_dict()
    code, table = _cli(["info", "tiny", "--n_loops=6"])
    assert code == 0 and table.startswith("tiny: flt, 6 loops")


def test_info_settings_apply_to_a_run_folder(tmp_path):
    # they were silently ignored for a folder; now a run's FLOPs at another N are one call
    from loopedlm.model.checkpoint import save_model
    from loopedlm.model.gpt import LoopedGPT

    config = ModelConfig.preset("tiny", n_loops=3)
    folder = save_model(tmp_path / "m", LoopedGPT(config), {})
    code, saved = _cli(["info", str(folder), "--json"])
    code2, changed = _cli(["info", str(folder), "--n_loops=9", "--json"])
    assert code == code2 == 0
    assert json.loads(saved)["config"]["n_loops"] == 3
    assert json.loads(changed)["config"] == ModelConfig.preset("tiny", n_loops=9).to_dict()
    assert json.loads(changed) == json.loads(_cli(["info", "tiny", "--n_loops=9", "--json"])[1])


SWEEP = """
[sweep]
recipe = "tiny"
[train]
steps = 200
eval_every = 50
[grid]
"model.n_loops" = [2, 3]
"""


def test_sweep_settings_sit_above_train_and_below_the_grid(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP)
    sweep = Sweep.load(path)
    sweep.overrides = train_overrides(["--steps=2", "--model.n_loops=9", "--optim.lr_scale=2"])
    specs = sweep.expand()
    assert [s.settings["model.n_loops"] for s in specs] == [2, 3]  # the grid wins
    for spec in specs:
        assert spec.settings["steps"] == 2 and spec.settings["eval_every"] == 50
        assert spec.settings["optim.lr_scale"] == 2
        assert "--steps=2" in spec.train_args()
    assert [s.name for s in specs] == [s.name for s in Sweep.load(path).expand()]
    run_sweep(sweep, tmp_path / "out", only="no run has this name")
    manifest = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert manifest["command"].endswith("--steps=2 --model.n_loops=9 --optim.lr_scale=2")


def test_sweep_command_line_settings_reach_every_run(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP)
    code, out = _cli(["sweep", str(path), "--dry-run", "--steps=2", "--out",
                      str(tmp_path / "o")])
    lines = [line for line in out.splitlines() if line.startswith("    ")]
    assert code == 0 and len(lines) == 2
    assert all("--steps=2" in line and "--steps=200" not in line for line in lines)


@pytest.mark.parametrize("args, match", [
    (["--stepz=2"], "unknown setting 'stepz' \\(did you mean steps\\?\\)"),
    (["--optim.momentum=1"], "unknown setting 'optim.momentum'"),
    (["--run_dir=x"], "--run_dir is set by the sweep"),
    (["--modle.n_loops=2"], "sections are model., optim., collapse."),
    (["2"], "unexpected argument '2'"),
])
def test_bad_sweep_settings(args, match):
    with pytest.raises(ValueError, match=match):
        train_overrides(args)


def test_recipe_text_is_kept_as_given():
    assert parse_train_args(["--recipe=recipes/tiny.toml"])[0] == "recipes/tiny.toml"
    assert Path(parse_train_args(["recipes/tiny.toml"])[0]).name == "tiny.toml"
