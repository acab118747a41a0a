"""``merge``, ``export`` and ``chat``: from a trained adapter to a model people can use."""

from __future__ import annotations

import argparse

__all__ = ["print_merge_report", "register"]


def register(sub) -> None:
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
    _add_base_args(p)
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="largest safetensors shard: 2GB = 2 x 10^9 bytes (default), or e.g. 2GiB, 500MB")
    p.add_argument("--report-samples", type=int, default=8, metavar="N",
                   help="held-out conversations the merge report evaluates (default 8)")
    p.set_defaults(func=_merge)

    p = sub.add_parser("export", help="GGUF files for llama.cpp, Ollama and LM Studio, each checked by running it",
                       description="Write the model as GGUF (merging a run or adapter first), an Ollama Modelfile and "
                                   "export_report.json; then load every file in llama.cpp and compare it with the "
                                   "merged model in transformers (token ids, next-token top-1, stop at <|end|>).")
    p.add_argument("source", metavar="RUN_OR_MERGED_DIR", help="a run directory, its adapter/, or a merged model dir")
    p.add_argument("--out", required=True, metavar="DIR", help="where the GGUF files go (must be empty or new)")
    p.add_argument("--quant", metavar="LIST",
                   help="comma-separated GGUF types (default q8_0): f16, bf16, q8_0 (no extra needed); q6_k, q5_k_m, "
                        "q4_k_m (llama.cpp's quantizer: pip install 'qlora-phi3[gguf]'). The Modelfile uses the first. "
                        "With --adapter: the LoRA file's types, f16 (default) or q8_0")
    p.add_argument("--adapter", action="store_true",
                   help="write the adapter as a GGUF LoRA (NAME-lora-QUANT.gguf, a few MB) to serve on the base model "
                        "(llama.cpp --lora, Ollama ADAPTER, LM Studio) instead of a merged model; needs a run or "
                        "adapter directory. See docs/adapter_export.md")
    p.add_argument("--base-quant", metavar="QUANT",
                   help="with --adapter: also write the base model as NAME-base-QUANT.gguf (f16, bf16, q8_0, q6_k, "
                        "q5_k_m, q4_k_m), which the Modelfile's FROM then names")
    p.add_argument("--force", action="store_true",
                   help="replace a previous export in --out (only once the new one is complete)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="run each file in llama.cpp and compare with the merged model (default: on when "
                        "llama-cpp-python is installed)")
    p.add_argument("--check-samples", type=int, default=8, metavar="N",
                   help="held-out conversations checked (default 8)")
    p.add_argument("--name", metavar="NAME",
                   help="file name stem: NAME-QUANT.gguf (default: the source directory's name)")
    _add_base_args(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("chat", help="chat with a merged model, an adapter (on its 4-bit base) or a run directory",
                       description="Chat in the terminal with a fine-tuned model: a merged directory (fp16), or an "
                                   "adapter or run directory (the adapter on its 4-bit base, as trained). Prompts are "
                                   "rendered with the model's own chat template; answers stream and stop at the "
                                   "model's end-of-turn token. Interactive by default (an empty line, 'exit' or "
                                   "Ctrl-D ends it); --prompt answers one message on stdout for scripts.")
    p.add_argument("source", metavar="MODEL_OR_ADAPTER_DIR", help="merged model dir, adapter dir or run dir")
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message on stdout and exit (status goes to "
                                                     "stderr; default: interactive)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer length cap (default 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    _add_base_args(p)
    p.set_defaults(func=_chat)


def _add_base_args(p) -> None:
    p.add_argument("--base", metavar="NAME_OR_PATH",
                   help="use this copy of the base model (e.g. a local download) instead of the one the adapter "
                        "names; its shapes and revision must match")
    p.add_argument("--revision", metavar="REV", help="base model revision (default: the one the adapter was trained on)")


def _merge(args) -> int:
    from qlora_phi3.ship.merge import REPORT_NAME, merge
    from qlora_phi3.ui import info

    result = merge(args.source, args.out, dtype=args.dtype, force=args.force, base=args.base, revision=args.revision,
                   max_shard_size=args.max_shard_size, report_samples=args.report_samples)
    report = result.report
    print_merge_report(report)
    info(f"[bold green]merged[/] in {report['seconds']:.0f}s, peak RAM {report['peak_rss_gib']:.2f} GiB RSS: "
         f"[bold]{result.out_dir}[/] (report: {result.out_dir / REPORT_NAME})")
    info(f"next: `qlora-phi3 chat {result.out_dir}` to try it, `qlora-phi3 export {result.out_dir} --out "
         f"{result.out_dir}-gguf` for llama.cpp / Ollama; it loads anywhere transformers does "
         f"(AutoModelForCausalLM.from_pretrained(\"{result.out_dir}\"))")
    return 0


def _export(args) -> int:
    from functools import partial

    from qlora_phi3.cli import render_export
    from qlora_phi3.errors import UserError
    from qlora_phi3.ship.export import CheckFailed

    if args.adapter:
        from qlora_phi3.ship.adapter_export import DEFAULT_LORA_QUANTS, export_adapter

        run = partial(export_adapter, args.source, args.out, quants=args.quant or DEFAULT_LORA_QUANTS,
                      base_quant=args.base_quant, force=args.force, check=args.check, name=args.name, base=args.base,
                      revision=args.revision, check_samples=args.check_samples)
        table, done = render_export.print_adapter_export_table, render_export.print_adapter_export_done
    elif args.base_quant:
        raise UserError("--base-quant writes the base model beside a GGUF LoRA: add --adapter, or drop it (a merged "
                        "export already contains the base).")
    else:
        from qlora_phi3.ship.export import DEFAULT_QUANTS, export

        run = partial(export, args.source, args.out, quants=args.quant or DEFAULT_QUANTS, force=args.force,
                      check=args.check, name=args.name, base=args.base, revision=args.revision,
                      check_samples=args.check_samples)
        table, done = render_export.print_export_table, render_export.print_export_done
    try:
        result = run()
    except CheckFailed as e:  # the files are written: their numbers go above the error that names the failure
        table(e.result.report)
        raise
    table(result.report)
    done(result)
    return 0


def _chat(args) -> int:
    from qlora_phi3.ship.chat import chat
    from qlora_phi3.ui import status_to_stderr

    if args.prompt is not None:
        status_to_stderr()  # stdout carries the answer alone: `chat RUN --prompt "..." > answer.txt`
    chat(args.source, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens, device=args.device,
         base=args.base, revision=args.revision)
    return 0


def print_merge_report(report: dict) -> None:
    """The three models side by side; the verdict in red when the merged model is worse than as trained."""
    from rich.table import Table

    from qlora_phi3.ui import console, info

    short = {"a": "(a) 4-bit base + adapter", "b": f"(b) merged {report['dtype']}", "c": "(c) 16-bit base + adapter"}
    n = report["eval_samples"]
    table = Table(title=f"merge report: {n['n_samples']} held-out samples, {n['n_answer_tokens']} answer tokens",
                  title_justify="left",
                  caption="(a) as trained, the reference; (c) unmerged. Logit differences vs (a), at answer tokens.",
                  caption_justify="left")
    table.add_column("model", no_wrap=True)
    for col in ("eval loss", "max |Δlogit|", "mean |Δlogit|", "top-1 = (a)"):
        table.add_column(col, justify="right")
    for key, row in report["models"].items():
        table.add_row(short[key], f"{row['eval_loss']:.4f}", f"{row['max_abs_logit_diff']:.4f}",
                      f"{row['mean_abs_logit_diff']:.4f}", f"{row['top1_agreement']:.1%}")
    console().print(table)
    r = report["merge_rounding_b_vs_c"]
    info(f"merge rounding alone, (b) vs (c): max |logit diff| {r['max_abs_logit_diff']:.4f}, "
         f"mean {r['mean_abs_logit_diff']:.4f}")
    if report["merged_worse_than_trained"]:
        console().print(f"[bold red on white] WARNING [/] [bold red]{report['explanation']}[/]")
    else:
        info(f"[green]{report['explanation']}[/]")
