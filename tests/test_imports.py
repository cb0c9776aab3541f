"""The package's shape: no import cycles, no import that runs back up the pipeline's layers, and a
docstring on every package saying what it owns.

Imports are read with `ast` (every `import`, at module level or inside a function); imports under
`if TYPE_CHECKING:` are annotations only and do not count.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "converter"

# Lowest first: a module may import from its own layer or any layer before it, never after it.
# The recipe sits above the stages (they take its sections as typed arguments, type-only imports)
# and below what reads whole recipes (artifact, the stage cache, the pipeline, the CLI).
LAYERS = ("errors", "progress", "scratch", "models", "quant", "export", "targets", "parity", "recipe",
          "artifact", "stage_cache", "pipeline", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str) -> str | None:
    """The converter module an imported name lives in (a package's `__init__` for the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str | None = None) -> set[str]:
    """Converter modules that `module` imports at run time (TYPE_CHECKING blocks skipped); `source`
    instead of the module's file, for tests of this reader."""
    path = MODULES.get(module, ROOT / "probe.py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update(filter(None, (_resolve(a.name) for a in child.names)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                for alias in child.names:  # `from converter.quant import smooth` imports the module
                    target = _resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _resolve(base)
                    if target:
                        found.add(target)
            visit(child)

    visit(ast.parse(path.read_text() if source is None else source, filename=str(path)))
    found.discard(module)
    found.discard("converter")  # the root package holds only the version
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the root package
    return LAYERS.index(parts[1])


def test_every_module_is_in_a_layer():
    unplaced = [m for m in MODULES if m != "converter" and m.split(".")[1] not in LAYERS]
    assert not unplaced, f"modules outside LAYERS (add their folder in the pipeline's order): {unplaced}"


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_a_cycle_is_found():
    """The detector itself: a planted two-module and three-module cycle are both reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_no_upward_imports():
    upward = sorted(f"{m} -> {i}" for m, deps in GRAPH.items() if m != "converter"
                    for i in deps if _layer(i) > _layer(m))
    assert upward == [], f"imports against the layer order {LAYERS}: {upward}"


def test_type_checking_imports_do_not_count():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from converter.recipe import Recipe\n"
              "from converter.errors import UserError\n\ndef f():\n    from converter.quant import smooth\n")
    assert imports_of("converter.models.probe", source) == {"converter.errors", "converter.quant.smooth"}


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and len(doc) > 40, f"{package}: no docstring saying what the package owns"
