"""Issue 10's structural rules, kept from regressing: files of at most 400 lines, functions
of at most 60, no import cycles between loopedlm modules (function-local imports counted),
imports that follow the subpackage order, and no reach into another module's private
names. `python benchmarks/arch_report.py --list` prints all the figures."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "arch_report", Path(__file__).resolve().parent.parent / "benchmarks" / "arch_report.py")
arch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch)


def test_no_file_over_the_line_limit():
    assert arch.long_files(arch.package_files()) == []


def test_no_function_over_the_line_limit():
    assert arch.long_functions(arch.package_files()) == []


def test_length_checkers_see_long_code(tmp_path):
    long = tmp_path / "long.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(arch.MAX_FUNCTION_LINES))
    long.write_text("def f():\n" + body + "\n" * (arch.MAX_FILE_LINES - arch.MAX_FUNCTION_LINES))
    assert [n for _, n in arch.long_functions([long])] == [arch.MAX_FUNCTION_LINES + 1]
    assert arch.long_files([long]) == [(str(long), arch.MAX_FILE_LINES + 1)]


def test_no_import_cycles():
    assert arch.cycles(arch.import_graph(arch.package_files())) == []


def test_cycle_finder_sees_a_cycle():
    assert arch.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_access_to_another_modules_private_names():
    assert arch.private_accesses(arch.package_files()) == []


def test_private_access_finder_sees_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from loopedlm.model.gpt import _residual\n\n\n"
                   "def f(model):\n    return model._loop_body, self_ok()\n")
    found = arch.private_accesses([bad])
    assert len(found) == 2 and "imports _residual" in found[0] and "._loop_body" in found[1]


def test_imports_follow_the_subpackage_order():
    assert arch.upward_imports(arch.import_graph(arch.package_files())) == []


def test_layer_checker_sees_an_upward_import():
    graph = {"loopedlm.model.gpt": {"loopedlm.train.optim", "loopedlm.common.paths"},
             "loopedlm.train.optim": {"loopedlm.model.config"},
             "loopedlm.stray": set(), "loopedlm.train.__main__": {"loopedlm.cli.train"}}
    found = arch.upward_imports(graph)
    assert found == ["loopedlm.model.gpt (model) imports loopedlm.train.optim (train)",
                     "loopedlm.stray is in no subpackage of " + str(arch.LAYERS)]


def test_every_module_lives_in_a_subpackage():
    top = {p.name for p in arch.PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "__main__.py"}
