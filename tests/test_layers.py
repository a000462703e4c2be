"""The package's structure: every import goes down the layers (docs/architecture.md), and no imports form a circle.

The imports are read from the source (module level and inside functions), so a lazy
import that runs upward or closes a circle fails here even if no test executes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moeify"

# bottom (0) to top; packages on the same rank may import each other (without circles)
LAYERS = {
    "errors": 0, "_version": 0,
    "core": 1,
    "kernels": 2, "data": 2,
    "blocks": 3,
    "models": 4,
    "methods": 5,
    "pipeline": 6,
    "eval": 7, "bench": 7, "analysis": 7, "report": 7, "compare": 7, "vllm": 7, "finetuning": 7,
    "cli": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (SRC.parent / rel).with_suffix(".py").is_file() or (SRC.parent / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """moeify modules imported anywhere in the file."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "moeify"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "moeify":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if _exists(f"{mod}.{a.name}")]
            out |= set(subs) if subs and len(subs) == len(node.names) else {mod}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package root re-exports the public API; nothing inside moeify may import it
    return LAYERS[parts[1]]


def test_every_package_has_a_layer():
    top = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if (p.suffix == ".py" or p.is_dir()) and p.name != "__pycache__"}
    assert top - {"__init__"} <= set(LAYERS), f"give these a layer in LAYERS and docs/architecture.md: {top - set(LAYERS) - {'__init__'}}"


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        if mod == "moeify":
            continue
        for dep in deps:
            if dep == "moeify":
                bad.append(f"{mod} imports the package root moeify")
            elif _layer(dep) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    return sorted(bad)


def test_no_module_imports_a_layer_above_it_or_the_package_root():
    assert _violations(_graph()) == []


def test_the_layer_check_reads_lazy_imports_and_catches_upward_ones():
    # pipeline/convert.py imports the sequential pipeline inside convert(): the graph has that edge
    assert "moeify.pipeline.sequential" in _imports(SRC / "pipeline" / "convert.py")
    assert _violations({"moeify.core.plan": {"moeify.pipeline.convert"}, "moeify.cli.app": {"moeify"}}) == [
        "moeify.cli.app imports the package root moeify", "moeify.core.plan (layer 1) imports moeify.pipeline.convert (layer 6)"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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


def test_no_import_circles():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected
