"""Print the architecture figures of issues 10 and 23 for the package (no third-party imports).

    python benchmarks/arch_report.py            # the figures
    python benchmarks/arch_report.py --list     # and every offending file/function/access

Rules (tests/test_architecture.py keeps them at 0): import cycles between loopedlm modules
(function-local imports counted), imports against the subpackage order (LAYERS), accesses
to another object's `_name` (anything but self/cls).

Figures (reported, not enforced): files over 400 lines and functions over 60 (issue 10's
caps, retired by issue 23: a file is as long as its one concept needs), the share of the
repository's non-test Python lines that lie in loopedlm/, and issue 23's consolidation
figures: modules, files in infer/, KV-cache classes and cache writers (classes with
`insert(loop, layer, k, v)`), the functions that fill the `n_loops` default and those that
check a loop count, "SPEC n" references in the code, tests that touch private names, and
test files that import another test file. Run it on another checkout (copy it into its
benchmarks/) for a before/after table.
"""

from __future__ import annotations

import argparse
import ast
import sys
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
            if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
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


def _mentions_n_loops(node: ast.AST) -> bool:
    import re
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str)
               and re.search(r"\bn_loops\b", n.value) for n in ast.walk(node))


def n_loops_default(files: list[Path]) -> tuple[list[str], list[str]]:
    """(functions that fill the `n_loops` default, functions that check a loop count).

    Fill: a call `<config>.loops(...)` (ModelConfig.loops: None -> the config's count), or
    `<x>.n_loops if <y> is None else <y>`, or `<y> or <x>.n_loops`. Check: a call
    `check(..., "n_loops", ...)`, a `raise` whose message names n_loops, or a pydantic
    `Field(..., ge=...)` for an n_loops field."""
    fills, checks = [], []
    for path in files:
        for name, fn in _functions(ast.parse(path.read_text())):
            where = f"{shown(path)}:{fn.lineno} {name}"
            body = [n for stmt in fn.body for n in ast.walk(stmt)]
            fill = check = False
            for n in body:
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                        and n.func.attr == "loops":
                    fill = check = True
                if isinstance(n, ast.IfExp) and isinstance(n.test, ast.Compare) \
                        and any(isinstance(c, ast.Constant) and c.value is None
                                for c in n.test.comparators) \
                        and any(isinstance(b, ast.Attribute) and b.attr == "n_loops"
                                for b in (n.body, n.orelse)):
                    fill = True
                if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.Or) \
                        and isinstance(n.values[-1], ast.Attribute) and n.values[-1].attr == "n_loops":
                    fill = True
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "check" \
                        and len(n.args) > 1 and isinstance(n.args[1], ast.Constant) \
                        and n.args[1].value == "n_loops":
                    check = True
                if isinstance(n, ast.Raise) and n.exc is not None and _mentions_n_loops(n.exc):
                    check = True
            if fill:
                fills.append(where)
            if check:
                checks.append(where)
    for path in files:  # class-level schema fields: `n_loops: int | None = Field(None, ge=1)`
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == "n_loops" and isinstance(node.value, ast.Call) \
                    and any(k.arg in ("ge", "gt") for k in node.value.keywords):
                checks.append(f"{shown(path)}:{node.lineno} n_loops Field")
    return fills, checks


def spec_references(files: list[Path]) -> list[str]:
    """Lines citing "SPEC n", a document that is not in the repository."""
    import re
    out = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bSPEC \d", line):
                out.append(f"{shown(path)}:{i}")
    return out


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


def consolidation_figures(files: list[Path]) -> dict[str, list[str]]:
    """Issue 23's figures, each a list of what it counts."""
    caches, writers = cache_classes(files)
    fills, checks = n_loops_default(files)
    infer = PACKAGE / "infer"
    return {
        "modules in loopedlm/": [shown(p) for p in files],
        "files in infer/": [shown(p) for p in sorted(infer.rglob("*.py"))],
        "KV-cache classes": caches,
        "cache writers (insert(loop, layer, k, v))": writers,
        "functions that fill the n_loops default": fills,
        "functions that check a loop count": checks,
        "SPEC references in the code": spec_references(files),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list every offender")
    args = parser.parse_args(argv)
    files = package_files()
    figures = {
        "import cycles": cycles(import_graph(files)),
        "imports against the layer order": upward_imports(import_graph(files)),
        "accesses to another object's _name": private_accesses(files),
        f"files over {MAX_FILE_LINES} lines (reported only)": long_files(files),
        f"functions over {MAX_FUNCTION_LINES} lines (reported only)": long_functions(files),
        **consolidation_figures(files),
    }
    for label, items in figures.items():
        print(f"{label}: {len(items)}")
        if args.list:
            for item in items:
                print(f"    {item}")
    inside, total = package_share()
    print(f"non-test Python lines in loopedlm/: {inside} of {total} ({100 * inside / total:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
