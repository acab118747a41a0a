"""The ``qlora-phi3`` command: parses arguments and dispatches. Nothing heavy is imported here, so
``--help`` answers instantly; each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import os
import sys

from qlora_phi3 import __version__
from qlora_phi3.errors import UserError

__all__ = ["main"]


def _recipe_keys_help() -> str:
    from qlora_phi3.config import field_help

    lines = ["recipe keys (override any with section.key=value):"]
    for key, doc, default in field_help():
        lines.append(f"  {key} (default {default!r})\n      {doc}")
    return "\n".join(lines)


def _add_recipe_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("recipe", nargs=None if required else "?", metavar="RECIPE",
                   help="recipe YAML file" + ("" if required else " (default: the embedded tiny CPU recipe)"))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lora.r=32")
    # Every recipe-taking command lists the keys it accepts.
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _recipe_keys_help() if not p.epilog else f"{p.epilog}\n\n{_recipe_keys_help()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-phi3",
        description="QLoRA fine-tuning of Microsoft Phi-3 Mini on one consumer GPU (or offline on a CPU).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `qlora-phi3 COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"qlora-phi3 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # One function per command, each adding its own subparser (keep this list in README order).
    for add in (_add_train, _add_data, _add_merge, _add_export, _add_chat, _add_estimate, _add_fit, _add_profile):
        add(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with a recipe (no recipe: the tiny offline demo)")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its last checkpoint")
    p.add_argument("--force", action="store_true", help="delete the run already in train.output_dir and start over")
    p.set_defaults(func=_cmd_train)


def _split_recipe_and_overrides(args) -> tuple[str | None, list[str]]:
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)  # `qlora-phi3 train lora.r=8`: overrides on the default recipe
        recipe = None
    return recipe, overrides


def _default_recipe() -> str:
    from qlora_phi3.config import RECIPES_DIR

    return str(RECIPES_DIR / "tiny_cpu.yaml") if (RECIPES_DIR / "tiny_cpu.yaml").is_file() else None


def _recipe_from_args(args):
    """The recipe named on the command line (default: the tiny CPU one) with its overrides applied."""
    from qlora_phi3.config import load_recipe

    recipe_path, overrides = _split_recipe_and_overrides(args)
    recipe = load_recipe(recipe_path or _default_recipe(), overrides)
    _quiet_libraries()
    return recipe


def _cmd_train(args) -> int:
    recipe = _recipe_from_args(args)
    from qlora_phi3.run.train import train

    train(recipe, resume=args.resume, force=args.force)
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect a recipe's training data: validation, token lengths, loss mask "
                                    "(loads the tokenizer only)")
    _add_recipe_args(p)
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="which usable conversation to render with its loss mask (default: 0, the first)")
    p.add_argument("--out", metavar="DIR", help="folder for token_lengths.png and data_report.json "
                                                "(default: <train.output_dir>-data, beside the run)")
    p.set_defaults(func=_cmd_data)


def _cmd_data(args) -> int:
    recipe = _recipe_from_args(args)
    from qlora_phi3.data.inspect import inspect_data

    inspect_data(recipe, sample=args.sample, out_dir=args.out)
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a trained adapter into its 16-bit base (on the CPU) and check the result",
                       description="Reload the adapter's base model in 16-bit, merge the LoRA weights with PEFT, save "
                                   "one standalone model (sharded safetensors, config, generation config, tokenizer "
                                   "with chat template) and a merge report comparing it with the 4-bit base + adapter "
                                   "as trained.")
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR", help="a run directory (train.output_dir) or its adapter/")
    p.add_argument("--out", required=True, metavar="DIR", help="where the merged model goes (must be empty or new)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="dtype of the merged weights (default float16: 3 more mantissa bits than bfloat16, so small "
                        "LoRA updates survive the rounding)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (only once the new model is complete)")
    p.add_argument("--base", metavar="NAME_OR_PATH",
                   help="merge into this copy of the base model (e.g. a local download) instead of the one the adapter "
                        "names; its shapes and revision must match")
    p.add_argument("--revision", metavar="REV", help="base model revision (default: the one the adapter was trained on)")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="largest safetensors shard (default 2GB)")
    p.add_argument("--report-samples", type=int, default=8, metavar="N",
                   help="held-out conversations the merge report evaluates (default 8)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    _quiet_libraries()
    from qlora_phi3.out.merge import merge

    merge(args.source, args.out, dtype=args.dtype, force=args.force, base=args.base, revision=args.revision,
          max_shard_size=args.max_shard_size, report_samples=args.report_samples)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="GGUF files for llama.cpp, Ollama and LM Studio, each checked by running it",
                       description="Write the model as GGUF (merging a run or adapter first), an Ollama Modelfile and "
                                   "export_report.json; then load every file in llama.cpp and compare it with the "
                                   "merged model in transformers (token ids, next-token top-1, stop at <|end|>).")
    p.add_argument("source", metavar="RUN_OR_MERGED_DIR", help="a run directory, its adapter/, or a merged model dir")
    p.add_argument("--out", required=True, metavar="DIR", help="where the GGUF files go (must be empty or new)")
    p.add_argument("--quant", default="q8_0", metavar="LIST",
                   help="comma-separated GGUF types (default q8_0): f16, bf16, q8_0 (no extra needed); q6_k, q5_k_m, "
                        "q4_k_m (llama.cpp's quantizer: pip install 'qlora-phi3[gguf]'). The Modelfile uses the first")
    p.add_argument("--force", action="store_true", help="replace a previous export in --out (only once the new one is complete)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="run each file in llama.cpp and compare with the merged model (default: on when "
                        "llama-cpp-python is installed)")
    p.add_argument("--check-samples", type=int, default=8, metavar="N", help="held-out conversations checked (default 8)")
    p.add_argument("--name", metavar="NAME", help="file name stem: NAME-QUANT.gguf (default: the source directory's name)")
    p.add_argument("--base", metavar="NAME_OR_PATH", help="merge into this copy of the base model (as in merge)")
    p.add_argument("--revision", metavar="REV", help="base model revision (as in merge)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    _quiet_libraries()
    from qlora_phi3.out.export import export

    export(args.source, args.out, quants=args.quant, force=args.force, check=args.check, name=args.name,
           base=args.base, revision=args.revision, check_samples=args.check_samples)
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a merged model, an adapter (on its 4-bit base) or a run directory")
    p.add_argument("source", metavar="MODEL_OR_ADAPTER_DIR", help="merged model dir, adapter dir or run dir")
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit (default: interactive)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer length cap (default 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args) -> int:
    _quiet_libraries()
    from qlora_phi3.out.chat import chat

    chat(args.source, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens, device=args.device)
    return 0


def _add_estimate(sub) -> None:
    p = sub.add_parser("estimate", help="predict peak GPU memory of a recipe from the model config alone "
                                        "(no weights loaded), with a breakdown")
    _add_recipe_args(p)
    p.add_argument("--budget", metavar="SIZE", help="memory to fit in, e.g. 12GB, 12GiB, 8g, 12000MB")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default) adds the CUDA context and allocator overhead; cpu: live tensors only")
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args) -> int:
    recipe_path, overrides = _split_recipe_and_overrides(args)
    from qlora_phi3.memory.estimate import run_estimate

    est = run_estimate(recipe_path or _default_recipe(), overrides, args.budget, args.device)
    if args.budget:
        from qlora_phi3.memory.estimate import parse_budget

        return 0 if est.fits(parse_budget(args.budget)) else 1
    return 0


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="largest max_seq_len and micro_batch_size predicted to fit a memory budget, "
                                   "written as a ready recipe")
    _add_recipe_args(p)
    p.add_argument("--budget", metavar="SIZE", required=True, help="GPU memory, e.g. 12GB, 8GiB, 12000MB")
    p.add_argument("--out", metavar="FILE", help="recipe to write (default: ./<recipe>_fit_<budget>gib.yaml)")
    p.set_defaults(func=_cmd_fit)


def _cmd_fit(args) -> int:
    recipe_path, overrides = _split_recipe_and_overrides(args)
    from qlora_phi3.memory.fit import run_fit

    run_fit(recipe_path or _default_recipe(), overrides, args.budget, args.out)
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure peak memory and tokens/s of real training steps over a grid of "
                                       "settings, beside the estimate")
    _add_recipe_args(p)
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="recipe keys and values to combine, e.g. lora.r=8,16,64 data.max_seq_len=512,2048 "
                        "train.micro_batch_size=1,2 train.gradient_checkpointing=true,false")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per configuration, not measured (default 1)")
    p.add_argument("--budget", metavar="SIZE", help="memory budget to check each configuration against, e.g. 12GB")
    p.add_argument("--out", metavar="DIR", help="folder for profile.csv/json/png (default: profiles/<recipe name>)")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    recipe_path, overrides = _split_recipe_and_overrides(args)
    _quiet_libraries()
    from qlora_phi3.run.profile import run_profile

    run_profile(recipe_path or _default_recipe(), overrides, args.grid, args.steps, args.warmup, args.budget,
                args.out)
    return 0


def _quiet_libraries() -> None:
    """Warnings that confuse users more than they help (see PITFALLS #12), silenced once here."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*use_cache=True.*")
    # train.py says this itself, once, in words that name our setting.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    for name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "transformers", "trl", "peft", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    # Before anything can initialise CUDA: expandable segments cut fragmentation on small cards (PITFALLS #7).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UserError as e:
        from qlora_phi3.ui import error

        error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        from qlora_phi3.ui import error

        error("interrupted.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
