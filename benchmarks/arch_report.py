"""Print the architecture figures of issue 10 for the package (no third-party imports).

    python benchmarks/arch_report.py            # the figures
    python benchmarks/arch_report.py --list     # and every offending file/function/access

Figures: files in loopedlm/ over 400 lines, functions over 60 lines, import cycles between
loopedlm modules (function-local imports counted), imports against the subpackage order
(LAYERS), accesses to another object's `_name`
(anything but self/cls), and the share of the repository's non-test Python lines that lie
in loopedlm/.
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
        f"files over {MAX_FILE_LINES} lines": long_files(files),
        f"functions over {MAX_FUNCTION_LINES} lines": long_functions(files),
        "import cycles": cycles(import_graph(files)),
        "imports against the layer order": upward_imports(import_graph(files)),
        "accesses to another object's _name": private_accesses(files),
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
