"""The package as pyproject.toml ships it: every subpackage listed (a missing one installs without its modules),
and the lock that CI and the README install from pins what the project depends on."""

import re
import tomllib
from pathlib import Path

import qlora_phi3

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_subpackage_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    root = Path(qlora_phi3.__file__).parent
    found = {"qlora_phi3." + ".".join(p.parent.relative_to(root).parts) if p.parent != root else "qlora_phi3"
             for p in root.rglob("__init__.py")}
    found = {f for f in found if "__pycache__" not in f}
    assert found - listed == set(), "subpackages missing from [tool.setuptools] packages"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_lock_pins_every_dependency_and_extra_exactly():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    project = PYPROJECT["project"]
    wanted = list(project["dependencies"])
    for extra in ("test", "gguf", "eval"):  # what .ci/run installs
        wanted += project["optional-dependencies"][extra]
    missing = sorted({_name(r) for r in wanted} - set(pins))
    assert not missing, f"constraints.txt does not pin {missing}"
