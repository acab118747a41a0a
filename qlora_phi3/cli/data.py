"""``qlora-phi3 data``: what a recipe's data looks like to the model, before any GPU time is spent."""

from __future__ import annotations

from qlora_phi3.cli.common import add_recipe_args, recipe_from_args

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect a recipe's training data: validation, token lengths, loss mask "
                                    "(loads the tokenizer only); for preference methods, pairs: prompt and "
                                    "answer lengths, what the limits cut, the mask of chosen and rejected; for grpo, prompts: "
                                    "token lengths against the limit and the columns the rewards receive")
    add_recipe_args(p)
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="which usable conversation to render with its loss mask (default: 0, the first)")
    p.add_argument("--out", metavar="DIR", help="folder for token_lengths.png and data_report.json "
                                                "(default: <train.output_dir>-data, beside the run)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from qlora_phi3.cli import render_data
    from qlora_phi3.methods import METHODS
    from qlora_phi3.model.load import load_tokenizer

    recipe = recipe_from_args(args)
    tokenizer = load_tokenizer(recipe.model)
    if METHODS[recipe.train.method].data == "prompts":  # prompts alone, and the columns the rewards receive
        from qlora_phi3.data.inspect_prompts import inspect_prompts

        render_data.print_prompt_inspection(inspect_prompts(recipe, tokenizer, sample=args.sample, out_dir=args.out),
                                            recipe)
    elif METHODS[recipe.train.method].preference:  # preference pairs / labelled answers
        from qlora_phi3.data.inspect_pairs import inspect_preference

        res = inspect_preference(recipe, tokenizer, sample=args.sample, out_dir=args.out)
        render_data.print_pair_inspection(res, recipe)
    else:
        from qlora_phi3.data.inspect import inspect_data

        render_data.print_data_inspection(inspect_data(recipe, tokenizer, sample=args.sample, out_dir=args.out), recipe)
    return 0
