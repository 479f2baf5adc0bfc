"""Print the architecture figures of issues 10 and 23 for the package.

    python benchmarks/arch_report.py                    # the figures
    python benchmarks/arch_report.py --list             # and every offender
    python benchmarks/arch_report.py --versus OTHER     # a before/after table against another
                                                        # checkout, and the modules moved

Rules (tests/test_architecture.py keeps them at 0): import cycles between loopedlm modules
(function-local imports counted), imports against the subpackage order (LAYERS), accesses
to another object's `_name` (anything but self/cls).

Figures (reported, not enforced): files over 400 lines and functions over 60 (issue 10's
caps, retired by issue 23: a file is as long as its one concept needs), the share of the
repository's non-test Python lines that lie in loopedlm/, and issue 23's consolidation
figures: modules, files in infer/, KV-cache classes and cache writers (classes with
`insert(loop, layer, k, v)`); the functions that fill the `n_loops` default and that check
a loop count by hand, and the calls of ModelConfig.loops (the one code that does both);
references to documents outside the repository ("SPEC n"); tests that touch private names
and test files that import another; and, from a probe of the CLI itself (it imports the
checkout's loopedlm, torch included, in a subprocess; --no-cli skips it), the loop-count
spellings each command takes, those its --help shows, and those that warn.

The static figures read files only (no imports), so the script measures any checkout:
`--versus` runs it on the other one (`--root OTHER`) in a subprocess.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loopedlm"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# the subpackages, bottom to top: a module may import from its own subpackage and from
# those before it, never from those after it (CONVENTIONS: cli and experiments on top,
# model at the bottom). `loopedlm/__init__.py` re-exports the model; `__main__` modules
# are entry points that nothing imports.
LAYERS = ["common", "model", "data", "infer", "evaluate", "export", "train", "experiments",
          "cli"]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def long_files(files: list[Path]) -> list[tuple[str, int]]:
    out = []
    for path in files:
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES:
            out.append((shown(path), n))
    return out


def long_functions(files: list[Path]) -> list[tuple[str, int]]:
    out = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append((f"{shown(path)}:{node.lineno} {node.name}", n))
    return out


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """module -> loopedlm modules it imports anywhere (top level or inside functions)."""
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        name = module_name(path)
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run against LAYERS (a lower subpackage importing a higher one), and
    modules outside every subpackage (besides the package root and its __main__)."""
    out = []
    for module, targets in sorted(graph.items()):
        if module.endswith("__main__"):
            continue
        here = layer_of(module)
        if here is None:
            if module != "loopedlm":
                out.append(f"{module} is in no subpackage of {LAYERS}")
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if there is not None and LAYERS.index(there) > LAYERS.index(here):
                out.append(f"{module} ({here}) imports {target} ({there})")
    return out


# torch.Tensor's own underscored attributes (torch's business, not a loopedlm module's): a
# view's base, and the in-place version counter that tells a weight was changed
TENSOR_ATTRIBUTES = {"_base", "_version"}


def private_accesses(files: list[Path]) -> list[str]:
    """`obj._name` where obj is not self/cls, `_name` is not defined in the same module, and
    obj is not a module from outside loopedlm (torch._dynamo and the like are other
    projects' business)."""
    out = []
    for path in files:
        tree = ast.parse(path.read_text())
        external = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                external.update((a.asname or a.name).split(".")[0] for a in node.names
                                if not a.name.startswith("loopedlm"))
            elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("loopedlm") \
                    and not node.level:
                external.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loopedlm"):
                out.extend(f"{shown(path)}:{node.lineno} imports {a.name}"
                           for a in node.names if a.name.startswith("_"))
        # names this module defines itself (its classes' `self._x`, its `_functions`) are
        # its own business: the rule is about reaching into another module
        own = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")
               and isinstance(n.ctx, ast.Store)}
        own |= {n.name for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr in own:
                continue
            attr = node.attr
            if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")) \
                    or attr in TENSOR_ATTRIBUTES:
                continue
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in external):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) \
                    and base.func.id == "super":
                continue
            out.append(f"{shown(path)}:{node.lineno} .{attr}")
    return out


# ---- issue 23: one engine, one cache, one home per value ---------------------------------------
def _functions(tree: ast.AST):
    """(qualified name, node) of every function, methods as Class.method."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((f"{prefix}{child.name}", child))
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)
    walk(tree, "")
    return out


def cache_classes(files: list[Path]) -> tuple[list[str], list[str]]:
    """(KV caches: classes named *KVCache or *CacheRows (views of one), not Protocols; cache
    writers: classes with a method `insert(self, loop, layer, k, v)`, a Protocol naming them
    marked as such)."""
    caches, writers = [], []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            protocol = any(isinstance(b, ast.Name) and b.id == "Protocol" for b in node.bases)
            where = f"{shown(path)}:{node.lineno} {node.name}" + (" (Protocol)" if protocol else "")
            if node.name.endswith(("KVCache", "CacheRows")) and not protocol:
                caches.append(where)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "insert" \
                        and [a.arg for a in item.args.args] == ["self", "loop", "layer", "k", "v"]:
                    writers.append(where)
    return caches, writers


HF_CODE = "export/hf_code/"  # the model code shipped in exported folders: it cannot import
# loopedlm (it runs with torch and transformers alone), so it keeps its own default and check


def _none_test(test: ast.AST) -> tuple[ast.AST, bool] | None:
    """(x, True) for `x is None`, (x, False) for `x is not None`, else None."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 \
            and isinstance(test.comparators[0], ast.Constant) \
            and test.comparators[0].value is None \
            and isinstance(test.ops[0], ast.Is | ast.IsNot):
        return test.left, isinstance(test.ops[0], ast.Is)
    return None


def _reads_n_loops(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "n_loops" for n in ast.walk(node))


def _names(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, ast.Name | ast.Attribute)}


def _fills(fn: ast.AST) -> bool:
    """A written-out fill of the n_loops default, where the value used when `x` is None reads
    an `.n_loops`: `<y>.n_loops if x is None else x` (or `x if x is not None else
    <y>.n_loops`), `x or <y>.n_loops`, or `if x is None: x = ... <y>.n_loops ...` (x a
    `*loops` name)."""
    for n in ast.walk(fn):
        test = _none_test(n.test) if isinstance(n, ast.IfExp | ast.If) else None
        if isinstance(n, ast.IfExp) and test is not None \
                and _reads_n_loops(n.body if test[1] else n.orelse):
            return True
        if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.Or) \
                and isinstance(n.values[-1], ast.Attribute) and n.values[-1].attr == "n_loops":
            return True
        if isinstance(n, ast.If) and test is not None and test[1] and any(
                isinstance(b, ast.Assign) and _reads_n_loops(b.value)
                and ast.unparse(test[0]) in [ast.unparse(t) for t in b.targets]
                and "loops" in ast.unparse(test[0]) for b in n.body):
            return True
    return False


def _compares_with_one(node: ast.AST, names: set[str] | None) -> bool:
    """A comparison with 1 (`< 1`, `>= 1`, `1 <= x`) of an expression naming a `*loops` name
    (or one of `names`); with names=None, of anything."""
    for n in ast.walk(node):
        if not isinstance(n, ast.Compare):
            continue
        sides = [n.left, *n.comparators]
        for a, op, b in zip(sides, n.ops, sides[1:], strict=False):
            one_right = isinstance(b, ast.Constant) and b.value == 1 \
                and isinstance(op, ast.Lt | ast.GtE)
            one_left = isinstance(a, ast.Constant) and a.value == 1 \
                and isinstance(op, ast.LtE | ast.Gt)
            other = a if one_right else b if one_left else None
            if other is not None and (names is None or any(
                    name.endswith("loops") or name in names for name in _names(other))):
                return True
    return False


def _mentions_n_loops(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str)
               and re.search(r"\bn_loops\b", n.value) for n in ast.walk(node))


def _checks_lower_bound(fn: ast.AST) -> bool:
    """A written-out check that a loop count is an integer >= 1: `check(..., "n_loops",
    ...)`; a comparison with 1 of a `*loops` name (or of the values of a loop over names
    that include "n_loops"); or an `if` comparing anything with 1 that raises an error
    naming n_loops."""
    loops_names = {"n_loops"}
    for n in ast.walk(fn):
        if isinstance(n, ast.For) and any(isinstance(c, ast.Constant) and c.value == "n_loops"
                                          for c in ast.walk(n.iter)):
            loops_names |= _names(n.target)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "check" \
                and len(n.args) > 1 and isinstance(n.args[1], ast.Constant) \
                and n.args[1].value == "n_loops":
            return True
        if isinstance(n, ast.If) and _compares_with_one(n.test, None) and any(
                isinstance(b, ast.Raise) and b.exc is not None and _mentions_n_loops(b.exc)
                for b in n.body):
            return True
    return _compares_with_one(fn, loops_names)


def _calls_loops(fn: ast.AST) -> bool:
    """A call `<config>.loops(...)` (ModelConfig.loops, the one code that fills the default
    and checks a count), not counting ModelConfig's own call in `validate`."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == "loops" and not (isinstance(n.func.value, ast.Name)
                                                   and n.func.value.id == "self")
               for n in ast.walk(fn))


def n_loops_default(files: list[Path]) -> dict[str, list[str]]:
    """Where the n_loops default is filled and a loop count checked (functions, as
    path:line Class.function). "fills" and "checks" are written out (the default substituted
    by hand; a count compared with 1 by hand); "calls" are the calls of ModelConfig.loops,
    the one code that does both, where a count enters. The exported model code
    (export/hf_code) keeps its own and is counted apart. A pydantic
    `n_loops: ... = Field(..., ge=1)` (the HTTP schema) counts as a check."""
    out = {"fills": [], "checks": [], "calls": [], "fills in export/hf_code": [],
           "checks in export/hf_code": []}
    for path in files:
        tree = ast.parse(path.read_text())
        apart = HF_CODE in shown(path)
        for name, fn in _functions(tree):
            where = f"{shown(path)}:{fn.lineno} {name}"
            if _fills(fn):
                out["fills in export/hf_code" if apart else "fills"].append(where)
            if _checks_lower_bound(fn):
                out["checks in export/hf_code" if apart else "checks"].append(where)
            if _calls_loops(fn) and not apart:
                out["calls"].append(where)
        for node in ast.walk(tree):  # schema fields: `n_loops: int | None = Field(None, ge=1)`
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == "n_loops" and isinstance(node.value, ast.Call) \
                    and any(k.arg in ("ge", "gt") for k in node.value.keywords):
                out["checks"].append(f"{shown(path)}:{node.lineno} n_loops Field")
    # a function that only hands a count on to ModelConfig.loops is a call, not a check
    return out


OUTSIDE = re.compile(r"\bSPEC\s*§?\s*\d|SPEC\.md|/work/shared|shared/papers")


def outside_references(root_files: list[Path]) -> list[str]:
    """Lines citing a document outside the repository: "SPEC n" (the sections of a spec
    users never see), SPEC.md, or the project's shared folders."""
    out = []
    for path in root_files:
        if path.name in ("test_docs.py", "arch_report.py", Path(__file__).name):  # they name them
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                out.append(f"{shown(path)}:{i}")
    return out


def repository_text_files() -> list[Path]:
    """README, and the text files of loopedlm/, tests/, benchmarks/, docs/ and recipes/."""
    suffixes = {".py", ".md", ".toml", ".sh", ".txt", ".html", ".js", ".yml", ".yaml", ".cfg"}
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    for folder in ("loopedlm", "tests", "benchmarks", "docs", "recipes"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file()
                        and p.suffix in suffixes and "__pycache__" not in p.parts)
    return files


def test_files() -> list[Path]:
    return sorted((ROOT / "tests").glob("*.py"))


def test_private_accesses(files: list[Path]) -> list[str]:
    """In tests: imports of a loopedlm `_name`, and `obj._name` on anything but self/cls, a
    module from outside loopedlm (torch._dynamo) or the test module's own names."""
    return private_accesses(files)


def test_cross_imports(files: list[Path]) -> list[str]:
    """Test files (test_*.py) that import another test file."""
    out = []
    for path in files:
        if not path.name.startswith("test_"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                leaf = node.module.split(".")[-1]
                if leaf.startswith("test_"):
                    out.append(f"{shown(path)}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Import):
                out.extend(f"{shown(path)}:{node.lineno} imports {a.name}" for a in node.names
                           if a.name.split(".")[-1].startswith("test_"))
    return out


# ---- the loop count on the command line (a probe of the CLI itself) -----------------------------
SPELLINGS = (("--n-loops", "5"), ("--n-loops=5",), ("--loops", "5"), ("--n_loops=5",),
             ("--model.n_loops=5",))
HELP_SPELLING = re.compile(r"--(?:model\.)?(?:n[-_])?loops\b")


def _quiet(call):
    """(result or the SystemExit code, stdout, stderr) of `call()`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = call()
        except SystemExit as exc:
            result = exc.code
        except Exception as exc:  # noqa: BLE001 - a spelling a command refuses
            result = repr(exc)
    return result, out.getvalue(), err.getvalue()


def _parsed(argv: list[str]):
    """`loopedlm ARGV` parsed only (argparse commands): the namespace or None."""
    from loopedlm import cli

    def parse():
        try:
            parser = cli.build_parser(argv[0])
        except TypeError:  # an older build_parser() that registers every command
            parser = cli.build_parser()
        return parser.parse_args(argv)
    return _quiet(parse)


def probe_cli(folder: Path) -> dict[str, list[str]]:
    """command -> the loop-count spellings it accepts (each value 5 reaching the loop count;
    "*" marks one that prints a deprecation warning), and "help: SPELLING" -> the commands
    whose --help shows it. Runs the CLI of the tree it is imported from."""
    from loopedlm.cli import main

    sweep = folder / "s.toml"
    sweep.write_text('[sweep]\nrecipe = "tiny"\n[train]\nsteps = 2\n[grid]\n'
                     '"model.loop_mode" = ["lt", "flt"]\n')

    def took(command: str, spelling: tuple[str, ...]) -> tuple[bool, str]:
        sp = list(spelling)
        if command in ("sample", "eval", "serve"):
            extra = ["--prompt", "x"] if command == "sample" else []
            ns, _, err = _parsed([command, "RUN", *extra, *sp])
            ok = isinstance(ns, object) and hasattr(ns, "__dict__") and any(
                v in (5, "5") for k, v in vars(ns).items() if "loops" in k)
            return ok, err
        argv = {"train": ["train", *sp, "--print-config"],
                "info": ["info", "tiny", *sp, "--json"],
                "sweep": ["sweep", str(sweep), "--dry-run", *sp, "--out", str(folder / "o")]}
        code, out, err = _quiet(lambda: main(argv[command]))
        if code != 0:
            return False, err
        if command == "sweep":
            return "--model.n_loops=5" in out, err
        shown = json.loads(out)
        return (shown["model"] if command == "train" else shown["config"])["n_loops"] == 5, err

    found: dict[str, list[str]] = {}
    for command in ("sample", "eval", "serve", "train", "sweep", "info"):
        for spelling in SPELLINGS:
            ok, err = took(command, spelling)
            if ok:
                mark = "*" if "deprecat" in err.lower() else ""
                found.setdefault(command, []).append(" ".join(spelling).replace("5", "N") + mark)
        _, out, _ = _quiet(lambda c=command: main([c, "--help"]))
        for spelling in sorted(set(HELP_SPELLING.findall(out))):
            found.setdefault(f"help: {spelling}", []).append(command)
    return found


def cli_figures(root: Path) -> dict[str, list[str]]:
    """The loop-count figures of the CLI of the tree at `root`, from a subprocess that
    imports that tree's loopedlm."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(root)}
        result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--root",
                                 str(root), "--probe-cli", tmp], env=env, cwd=tmp,
                                capture_output=True, text=True)
    if result.returncode != 0:
        return {"CLI probe failed": [result.stderr.strip().splitlines()[-1]]}
    found = json.loads(result.stdout)
    takes = {c: v for c, v in found.items() if not c.startswith("help: ")}
    return {
        "commands that take a loop count": [f"{c}: {', '.join(v)}" for c, v in takes.items()],
        "commands that take --n-loops N": [c for c, v in takes.items() if "--n-loops N" in v],
        "loop-count spellings in --help": [f"{c.removeprefix('help: ')} ({', '.join(v)})"
                                           for c, v in sorted(found.items())
                                           if c.startswith("help: ")],
        "spellings that warn (deprecated)": [f"{c} {s.rstrip('*')}" for c, v in takes.items()
                                             for s in v if s.endswith("*")],
    }


def consolidation_figures(files: list[Path]) -> dict[str, list[str]]:
    """Issue 23's figures, each a list of what it counts."""
    caches, writers = cache_classes(files)
    loops = n_loops_default(files)
    infer = PACKAGE / "infer"
    return {
        "modules in loopedlm/": [shown(p) for p in files],
        "files in infer/": [shown(p) for p in sorted(infer.rglob("*.py"))],
        "KV-cache classes": caches,
        "cache writers (insert(loop, layer, k, v))": writers,
        "functions that fill the n_loops default (written out)": loops["fills"],
        "functions that check a loop count >= 1 (written out)": loops["checks"],
        "calls of ModelConfig.loops (where a count enters)": loops["calls"],
        "fills and checks in export/hf_code (standalone exported code)":
            loops["fills in export/hf_code"] + loops["checks in export/hf_code"],
        "references outside the repository, in loopedlm/": outside_references(files),
        "references outside the repository, anywhere": outside_references(repository_text_files()),
        "test accesses to private names": test_private_accesses(test_files()),
        "test files that import a test file": test_cross_imports(test_files()),
    }


def package_share() -> tuple[int, int]:
    def lines(paths):
        return sum(len(p.read_text().splitlines()) for p in paths)
    everything = [p for p in ROOT.rglob("*.py")
                  if not any(part.startswith(".") or part in ("tests", "build") or "venv" in part
                             for part in p.relative_to(ROOT).parts)]
    return lines(package_files()), lines(everything)


def all_figures(cli: bool = True) -> dict[str, list[str]]:
    files = package_files()
    figures = {
        "import cycles": [" -> ".join(c) for c in cycles(import_graph(files))],
        "imports against the layer order": upward_imports(import_graph(files)),
        "accesses to another object's _name": private_accesses(files),
        f"files over {MAX_FILE_LINES} lines (reported only)":
            [f"{p} {n}" for p, n in long_files(files)],
        f"functions over {MAX_FUNCTION_LINES} lines (reported only)":
            [f"{f} {n}" for f, n in long_functions(files)],
        **consolidation_figures(files),
    }
    if cli:
        figures.update(cli_figures(ROOT))
    return figures


def set_root(root: Path) -> None:
    global ROOT, PACKAGE
    ROOT, PACKAGE = root.resolve(), root.resolve() / "loopedlm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list every offender")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--versus", type=Path, default=None, metavar="OTHER_CHECKOUT",
                        help="also measure another checkout: a before/after table, and the "
                             "modules removed and added")
    parser.add_argument("--no-cli", action="store_true",
                        help="skip the CLI probe (it imports loopedlm, torch included)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON")
    parser.add_argument("--probe-cli", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_root(args.root)
    if args.probe_cli:
        print(json.dumps(probe_cli(Path(args.probe_cli))))
        return 0
    figures = all_figures(cli=not args.no_cli)
    if args.json:
        print(json.dumps(figures))
        return 0
    if args.versus is not None:
        return print_versus(args.versus, figures, args)
    for label, items in figures.items():
        print(f"{label}: {len(items)}")
        if args.list:
            for item in items:
                print(f"    {item}")
    inside, total = package_share()
    print(f"non-test Python lines in loopedlm/: {inside} of {total} ({100 * inside / total:.1f}%)")
    return 0


def print_versus(other: Path, figures: dict[str, list[str]], args: argparse.Namespace) -> int:
    """A Markdown table: each figure in `other` (before) and here (after)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--root", str(other), "--json"]
    if args.no_cli:
        command.append("--no-cli")
    before = json.loads(subprocess.run(command, capture_output=True, text=True,
                                       check=True).stdout)
    print(f"| figure | before ({other}) | after ({ROOT}) |\n|---|---|---|")
    for label in dict.fromkeys([*before, *figures]):
        b, a = before.get(label), figures.get(label)
        print(f"| {label} | {'-' if b is None else len(b)} | {'-' if a is None else len(a)} |")
        if args.list:
            for name, items in (("before", b or []), ("after", a or [])):
                for item in items:
                    print(f"|  | {item if name == 'before' else ''} | "
                          f"{item if name == 'after' else ''} |")
    old = {m.removeprefix(str(other.resolve()) + "/") for m in before["modules in loopedlm/"]}
    new = set(figures["modules in loopedlm/"])
    print(f"\nmodules only before ({len(old - new)}): " + ", ".join(sorted(old - new)))
    print(f"modules only after ({len(new - old)}): " + ", ".join(sorted(new - old)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
