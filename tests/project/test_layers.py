"""The package's layers import only downward: core < data < model < memory < run < out < cli.

Every import is checked, lazy ones inside functions included (an AST walk over every module), so a
lower layer never reaches up for a convenience and the next feature cannot knot the layers together."""

import ast
from pathlib import Path

import qlora_phi3

PACKAGE = Path(qlora_phi3.__file__).parent
ORDER = ["core", "data", "model", "memory", "run", "out", "cli"]


def _layer(module: str) -> str:
    """'qlora_phi3.run.train' -> 'run'; top-level modules (config, errors, files, ui, ...) are the core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ORDER else "core"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if module in ("qlora_phi3.__main__",):  # the entry point is the top
            continue
        own = ORDER.index(_layer(module))
        for line, imported in _imports(path):
            if imported.startswith("qlora_phi3") and ORDER.index(_layer(imported)) > own:
                wrong.append(f"{rel}.py:{line}: {_layer(module)} imports {imported} ({_layer(imported)})")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_lazy_imports(tmp_path):
    """The check cannot pass by reading only top-level imports."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from qlora_phi3.cli.common import main\n")
    assert list(_imports(src)) == [(2, "qlora_phi3.cli.common")]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, lazy imports included."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import mod`` imports the module; ``from mod import name`` the module. (Every import
                # also runs its parent packages' __init__: that edge is implied by all of them, so not counted.)
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the modules around it (Tarjan's strongly connected components of 2+ modules)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            visit(v)
    return found


def test_no_import_circle():
    """No two modules import each other, directly or around a longer circle, lazily or not: each decision has one
    home that the others import."""
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
