"""What every recipe-taking command shares: the RECIPE and KEY=VALUE arguments and their help."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora_phi3.config import DEFAULT_RECIPE, Recipe, field_help, load_recipe, resolve_recipe

__all__ = ["add_recipe_args", "recipe_and_overrides", "recipe_from_args"]


def _recipe_keys_help() -> str:
    """Every key with the value it takes when no recipe is named (the default recipe's), and the schema's default
    where that recipe sets another, so `train --help` shows what `qlora-phi3 train` will really use."""
    try:
        recipe = load_recipe(resolve_recipe(DEFAULT_RECIPE), [])
    except Exception:  # an incomplete install: the schema's defaults alone
        recipe = None
    lines = [f"recipe keys (override any with section.key=value; values of the default recipe, {DEFAULT_RECIPE}):"]
    for key, doc, default in field_help():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name) if recipe is not None else default
        note = f"{value!r}" if value == default else f"{value!r} in {DEFAULT_RECIPE}; schema default {default!r}"
        lines.append(f"  {key} ({note})\n      {doc}")
    return "\n".join(lines)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help=f"recipe YAML file, or the name of a shipped recipe (`qlora-phi3 recipes` lists them; "
                        f"default: {DEFAULT_RECIPE})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lora.r=32")
    # Every recipe-taking command lists the keys it accepts.
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _recipe_keys_help() if not p.epilog else f"{p.epilog}\n\n{_recipe_keys_help()}"


def recipe_and_overrides(args) -> tuple[Path, list[str]]:
    """The recipe file the command line names (a path or a shipped name; default: the tiny CPU one) and
    the overrides. ``qlora-phi3 train lora.r=8`` gives overrides on the default recipe."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides.insert(0, recipe)
        recipe = None
    return resolve_recipe(recipe or DEFAULT_RECIPE), overrides


def recipe_from_args(args) -> Recipe:
    path, overrides = recipe_and_overrides(args)
    return load_recipe(path, overrides)
