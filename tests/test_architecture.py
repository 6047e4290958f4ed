"""The package's shape: no import cycle, no upward import between stages, no oversized file.

Every ``import`` in ``src/slim_lightning`` counts, at module level and inside functions, so a
cycle cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slim_lightning"
PKG = "slim_lightning"
MAX_LINES = 450

# the stages, bottom up: a module may import its own stage and the ones below it, never above
LAYERS = (
    ("errors", "io", "dtypes", "device", "memory", "version", "shadow"),
    ("core",),
    ("formats",),
    ("kernels",),
    ("nn",),
    ("models",),
    ("data",),
    ("checkpoint",),
    ("compress",),
    ("train",),
    ("deploy",),
    ("app",),
    ("", "generate", "summarize"),  # the package face and its `python -m` entry points
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a ``from X import Y`` of module ``X.Y`` is ``X.Y``)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [
                f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    top = module[len(PKG) + 1 :].split(".")[0] if module != PKG else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any stage of LAYERS (add it where it belongs)")


def test_graph_sees_function_level_imports():
    # a deferred import still counts: the graph must see it
    graph = _graph()
    assert f"{PKG}.deploy.hf_quantizer" in graph[PKG]  # imported inside a function


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_upward_import():
    upward = [
        f"{m} -> {t}"
        for m, targets in _graph().items()
        for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]
    assert upward == []


@pytest.mark.parametrize(
    "root", [SRC, SRC.parents[1] / "kernels"], ids=["src/slim_lightning", "kernels"]
)
def test_no_source_file_over_the_limit(root):
    long = {
        str(p.relative_to(root)): n
        for p in root.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_root_holds_only_the_face_and_a_few_leaves():
    files = sorted(p.name for p in SRC.glob("*.py"))
    leaves = {name for names in LAYERS[:1] for name in names}
    allowed = {"__init__.py", "generate.py", "summarize.py"} | {f"{n}.py" for n in leaves}
    assert set(files) <= allowed, sorted(set(files) - allowed)
