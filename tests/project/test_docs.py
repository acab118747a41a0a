"""The README and docs/ stay true: every `qlora-phi3` command in them parses against the real CLI (recipe names
resolve, overrides are real keys with valid values), every `python` script or module they name exists, every
relative link resolves, the README stays a door (<= 15 KB), and docs/schema.md is what the schema generates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from qlora_phi3.cli import _build
from qlora_phi3.config import load_recipe
from qlora_phi3.cli.common import recipe_and_overrides
from qlora_phi3.schema_doc import schema_markdown

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _split_shell(line: str) -> list[str]:
    """The commands of one shell line: split on ;, && and || outside quotes, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    return [shlex.join(w) for w in commands if w]


def _commands(page: Path):
    """(line number, command) for each shell command: lines of ```bash blocks (continuations joined) and inline
    `qlora-phi3 ...` code spans."""
    text = page.read_text(encoding="utf-8")
    in_block, pending, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell") if not in_block else False
            continue
        if in_block:
            if not pending:
                start = n
            pending += line.rstrip("\\").strip() + " "
            if not line.rstrip().endswith("\\"):
                yield from ((start, c) for c in _split_shell(pending))
                pending = ""
        else:
            for span in re.findall(r"`(qlora-phi3 [^`]+)`", line):
                if len(span.split()) > 2:  # `qlora-phi3 chat` alone is a mention in prose, not a command
                    yield n, span


def _qlora_commands():
    for page in PAGES:
        for n, cmd in _commands(page):
            if cmd.startswith("qlora-phi3 ") and "<" not in cmd and "..." not in cmd:
                yield pytest.param(cmd, id=f"{page.name}:{n}")


@pytest.mark.parametrize("command", list(_qlora_commands()))
def test_every_documented_command_parses(command):
    parser, commands = _build()
    argv = shlex.split(command)[1:]
    if not argv or argv[0] not in commands:
        with pytest.raises(SystemExit) as e:  # --help / --version
            parser.parse_args(argv)
        assert e.value.code == 0, command
        return
    if "--help" in argv:
        return
    try:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"argparse refuses {command!r} (exit {e.code})")
    placeholder = any(re.fullmatch(r"[A-Z][A-Z_]*|.*=[A-Z]", w) for w in argv)  # RUN_DIR, train.max_steps=N
    if hasattr(args, "overrides") and hasattr(args, "recipe") and not placeholder and not getattr(args, "resume", 0):
        path, overrides = recipe_and_overrides(args)
        load_recipe(path, overrides)  # the recipe resolves; every override is a real key with a valid value


def test_documented_scripts_and_modules_exist():
    missing = []
    for page in PAGES:
        for n, cmd in _commands(page):
            words = shlex.split(cmd)
            words = words[words.index("python"):] if "python" in words else []
            if len(words) < 2:
                continue
            if words[1] == "-m" and words[2].startswith("qlora_phi3"):
                target = REPO / (words[2].replace(".", "/") + ".py")
                if not target.exists() and not (target.with_suffix("") / "__main__.py").exists():
                    missing.append(f"{page.name}:{n}: {words[2]}")
            elif words[1].endswith(".py") and not (REPO / words[1]).exists():
                missing.append(f"{page.name}:{n}: {words[1]}")
    assert not missing, missing


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", line):
                if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                    broken.append(f"{page.relative_to(REPO)}:{n}: {target}")
    assert not broken, broken


def test_readme_is_a_door():
    assert len((REPO / "README.md").read_bytes()) <= 15 * 1024


def test_schema_page_is_generated_from_the_schema():
    assert (REPO / "docs" / "schema.md").read_text(encoding="utf-8") == schema_markdown(), \
        "docs/schema.md is stale: python -m qlora_phi3.schema_doc > docs/schema.md"


def test_the_command_walk_finds_commands():
    """The checks above cannot pass by finding nothing."""
    assert len(list(_qlora_commands())) >= 20
