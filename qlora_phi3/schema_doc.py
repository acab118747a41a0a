"""docs/schema.md, generated from the recipe schema's own field help, so the reference cannot drift from the code.

    python -m qlora_phi3.schema_doc > docs/schema.md

``tests/project/test_docs.py`` fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import dataclasses
import typing

from qlora_phi3.config import SECTIONS

__all__ = ["schema_markdown"]


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return f"`{text}`".replace("|", "\\|")


def schema_markdown() -> str:
    lines = ["# Recipe schema", "", "[Back to the README](../README.md)", "",
             "Every key a recipe may set, with its default and meaning, generated from `qlora_phi3/config.py` by "
             "`python -m qlora_phi3.schema_doc > docs/schema.md` (a test checks it is current). Set a key in the "
             "recipe's section or on the command line as `section.key=value`; precedence: defaults < recipe file "
             "< command line.", ""]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        lines += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            doc = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{section}.{f.name}` | {_type_name(hints.get(f.name, f.type))} | `{default!r}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown(), end="")
