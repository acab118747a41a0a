"""``qlora-phi3 recipes``: the shipped recipes, and a copy of one to edit."""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora_phi3.errors import UserError

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes, or copy one out to edit it",
                       description="`qlora-phi3 recipes` lists the recipes installed with qlora-phi3; "
                                   "`qlora-phi3 recipes copy NAME [DIR]` copies one (default: the current folder). "
                                   "Any command takes a recipe's name where it takes a recipe file.")
    p.add_argument("action", nargs="?", choices=("list", "copy"), default="list")
    p.add_argument("name", nargs="?", metavar="NAME", help="recipe to copy (see the list)")
    p.add_argument("dest", nargs="?", metavar="DIR", default=".", help="folder to copy it into (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite a file of the same name in DIR")
    p.set_defaults(func=_run)


def _summary(path: Path) -> str:
    """The recipe's first header paragraph (comment lines up to the first empty one): what it is for, whole
    sentences, never cut mid-sentence."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip("# ").strip()
        if not line.startswith("#") or (not text and words):
            break
        if text:
            words.append(text)
    return " ".join(words)


def _run(args) -> int:
    from qlora_phi3.config import shipped_recipes
    from qlora_phi3.ui import console, info

    shipped = shipped_recipes()
    if not shipped:
        from qlora_phi3.config import recipes_dir

        raise UserError(f"no shipped recipes in {recipes_dir()}: this install of qlora-phi3 is incomplete; "
                        "reinstall it (pip install --force-reinstall qlora-phi3).")
    if args.action == "list":
        width = max(len(n) for n in shipped)
        for name, path in shipped.items():
            console().print(f"[bold]{name:<{width}}[/]  {_summary(path)}", markup=True)
        info(f"\nfrom {next(iter(shipped.values())).parent}; use a name wherever a recipe file goes "
             "(`qlora-phi3 train phi3_mini_4k_12gb`), or `qlora-phi3 recipes copy NAME DIR` to edit one.")
        return 0
    if not args.name:
        raise UserError(f"recipes copy: name the recipe to copy, one of {', '.join(shipped)}.")
    stem = args.name[:-5] if args.name.endswith(".yaml") else args.name
    if stem not in shipped:
        raise UserError(f"recipes copy: no shipped recipe {args.name!r}; the shipped ones are {', '.join(shipped)}.")
    dest = Path(args.dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"recipes copy: {dest} is a file; give a folder.")
    target = dest / f"{stem}.yaml"
    if target.exists() and not args.force:
        raise UserError(f"recipes copy: {target} exists; add --force to overwrite it, or choose another folder.")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped[stem], target)
    info(f"copied {stem} to [bold]{target}[/]; edit it, then `qlora-phi3 train {target}`")
    return 0
