"""The package's shape: no import circle, and the sync strategies kept in small files (issue 15).

The import graph is read from the ``import``/``from`` statements of every module under
``src/lookahead_dist`` -- module-level, function-level and ``TYPE_CHECKING`` ones alike -- without
importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "lookahead_dist"
MAX_SYNC_LINES = 800


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` names its package)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name ``from <level dots><module>`` means inside ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports by name (``from pkg import sub`` -> ``pkg.sub``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                while t and t not in mods:  # `import a.b.c` of a name inside a module: its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve():
    assert _resolve("lookahead_dist.sync.ft", False, 1, "options") == "lookahead_dist.sync.options"
    assert _resolve("lookahead_dist.sync", True, 1, "base") == "lookahead_dist.sync.base"
    assert _resolve("lookahead_dist.sync.ft", False, 2, "_keys") == "lookahead_dist._keys"
    assert _resolve("lookahead_dist.sync.ft", False, 2, None) == "lookahead_dist"


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "lookahead_dist.sync.options" in graph["lookahead_dist.sync.ft"]  # the graph sees relative imports
    assert find_cycles(graph) == []


def test_the_torchft_strategy_imports_options_outer_and_keys_only():
    deps = {d for d in import_graph()["lookahead_dist.sync.ft"] if d.startswith("lookahead_dist.sync.")}
    assert deps <= {"lookahead_dist.sync.options", "lookahead_dist.sync._outer", "lookahead_dist.sync.base"}


def test_sync_files_are_small():
    long = {p.name: n for p in sorted((SRC / PACKAGE / "sync").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_SYNC_LINES}
    assert not long, f"files under sync/ longer than {MAX_SYNC_LINES} lines: {long}"
