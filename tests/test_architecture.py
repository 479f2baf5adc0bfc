"""Issue 10's structural rules, kept from regressing: no import cycles between loopedlm
modules (function-local imports counted), imports that follow the subpackage order, and no
reach into another module's private names; and issue 23's: one KV cache, no test that
touches a private name, no test file that imports another. (Issue 10's 400-line and 60-line
caps are retired: a file is as long as its one concept needs; arch_report still prints
them.) `python benchmarks/arch_report.py --list` prints all the figures."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "arch_report", Path(__file__).resolve().parent.parent / "benchmarks" / "arch_report.py")
arch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch)


def test_length_checkers_see_long_code(tmp_path):
    long = tmp_path / "long.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(arch.MAX_FUNCTION_LINES))
    long.write_text("def f():\n" + body + "\n" * (arch.MAX_FILE_LINES - arch.MAX_FUNCTION_LINES))
    assert [n for _, n in arch.long_functions([long])] == [arch.MAX_FUNCTION_LINES + 1]
    assert arch.long_files([long]) == [(str(long), arch.MAX_FILE_LINES + 1)]


def test_one_kv_cache_and_its_writers_name_one_protocol():
    caches, writers = arch.cache_classes(arch.package_files())
    assert [c.rsplit(" ", 1)[-1] for c in caches] == ["StaticKVCache"]
    assert sum(w.endswith("(Protocol)") for w in writers) == 1


def test_no_test_touches_a_private_name():
    assert arch.test_private_accesses(arch.test_files()) == []


def test_no_test_file_imports_another():
    assert arch.test_cross_imports(arch.test_files()) == []


def test_the_n_loops_default_is_filled_and_checked_in_one_place():
    loops = arch.n_loops_default(arch.package_files())
    assert [f.rsplit(" ", 1)[-1] for f in loops["fills"]] == ["ModelConfig.loops"]
    # besides the model's one check: the HTTP schema's, the server's cap (max_loops) and the
    # one check of the draft's own count (draft_loops, below the model's)
    assert {c.rsplit(" ", 1)[-1] for c in loops["checks"]} <= {
        "ModelConfig.loops", "Field", "ServeConfig.__post_init__", "check_draft_loops"}


def _last_words(found: list[str]) -> list[str]:
    return [f.rsplit(" ", 1)[-1] for f in found]


def test_consolidation_checkers_see_what_they_count(tmp_path):
    code = tmp_path / "code.py"
    code.write_text("class KVCache:\n    def insert(self, loop, layer, k, v):\n        pass\n\n\n"
                    "def f(cfg, n):\n    n = cfg.n_loops if n is None else n\n"
                    "    if n < 1:\n        raise ValueError(f'n_loops={n}')\n\n\n"
                    "def g(cfg, n_loops, engine):\n    if n_loops is None:\n"
                    "        n_loops = cfg.n_loops\n    if engine is None:\n"
                    "        engine = make(max_loops=cfg.n_loops)\n"
                    "    check(is_int(n_loops), 'n_loops', n_loops, '>= 1')\n\n\n"
                    "def h(cfg, n_loops, given):\n    a = given if given is not None else 3\n"
                    "    b = cfg.loops(n_loops)\n    return a, b, n_loops or cfg.n_loops\n\n\n"
                    "def not_a_fill(args, default):\n"
                    "    return default if args.n_loops is None else args.n_loops\n")
    caches, writers = arch.cache_classes([code])
    assert len(caches) == 1 and len(writers) == 1
    loops = arch.n_loops_default([code])
    assert _last_words(loops["fills"]) == ["f", "g", "h"]
    assert _last_words(loops["checks"]) == ["f", "g"]
    assert _last_words(loops["calls"]) == ["h"]
    test = tmp_path / "test_x.py"
    test.write_text("from test_y import helper\nfrom loopedlm.x import _private\n\n\n"
                    "def test_a(engine):\n    engine._steps.clear()\n")
    assert len(arch.test_cross_imports([test])) == 1
    assert len(arch.test_private_accesses([test])) == 2


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
