"""The package's layers import only downward: core < data < model < memory < run < out < evaluate < cli.

Every import is checked, lazy ones inside functions included (an AST walk over every module), so a
lower layer never reaches up for a convenience and the next feature cannot knot the layers together."""

import ast
from pathlib import Path

import qlora_phi3

PACKAGE = Path(qlora_phi3.__file__).parent
ORDER = ["core", "data", "model", "memory", "run", "out", "evaluate", "cli"]


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
