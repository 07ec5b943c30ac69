"""Imports point one way (DESIGN.md, "Layout"), read from the source with `ast`: imports inside functions count."""

import ast
import pathlib

import pytest

DRET = pathlib.Path(__file__).resolve().parents[1] / "dret"
HIGH = ("dret.eval", "dret.trainer", "dret.train", "dret.export")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(DRET.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in DRET.rglob("*.py")}


def _imports(path: pathlib.Path) -> set[str]:
    """Every dret module a file imports, at module level or inside a function: `from a import b` is a.b when that is
    a module, else a."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m == "dret" or m.startswith("dret.")}


GRAPH = {_module_name(p): _imports(p) for p in DRET.rglob("*.py")}  # module -> the dret modules it imports


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_one_way(module):
    embedder_side = _under(module, ("dret.models",)) or module in ("dret.model", "dret.encode", "dret.pooling")
    forbidden = (HIGH if embedder_side else ("dret.trainer", "dret.train", "dret.export")
                 if _under(module, ("dret.eval",)) else ("dret.eval",) if module == "dret.trainer" else ())
    assert not [m for m in GRAPH[module] if _under(m, forbidden)], f"{module} imports upward"


def test_no_import_cycles():
    """Depth-first search over every import, lazy ones included."""
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(GRAPH[module] - {module}):
            if state.get(other) == "open":
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
