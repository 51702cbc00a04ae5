"""The package's modules import each other without cycles (read with `ast`, function-level
imports included), and the public API is re-exported from the package root."""

from __future__ import annotations

import ast
from pathlib import Path

import behemoth_interp as bi

PACKAGE = Path(bi.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its code (a `from x import y` of a
    submodule y counts as importing x.y). The package uses absolute imports only."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import of {node.module}"
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules}
    out.discard(_module_name(path))
    return out


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_the_editing_package():
    graph = _graph()
    assert "behemoth_interp.edit.tasks" in graph["behemoth_interp.edit.datasets"]
    assert "behemoth_interp.edit.registry" in graph["behemoth_interp.edit.methods.rome"]


def test_public_names_resolve_from_the_root():
    for name in bi.__all__:
        assert getattr(bi, name) is not None, name
    assert {"finetune", "lora", "rome"} <= set(bi.METHODS)
    assert {"ce", "npo", "simnpo", "dpo", "rmu", "gradient_difference", "localized"} <= set(
        bi.OBJECTIVES
    )
