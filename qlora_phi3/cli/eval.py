"""``qlora-phi3 eval``: did the fine-tune help? lm-evaluation-harness tasks and answers on held-out chats, base
versus fine-tune, with the same settings; and the tables that ``train`` prints when ``train.eval_tasks`` asks."""

from __future__ import annotations

import argparse

__all__ = ["plan_from_args", "print_summary", "register"]

_DESCRIPTION = """\
Compare the base model with the fine-tune on lm-evaluation-harness tasks (--tasks) and/or on greedy answers to
held-out conversations (--data), with identical settings, and write lm-eval's own results JSON per model, a
summary (eval_summary.json; for a run also in its run.json) and answers.jsonl.

TARGET is a run directory (base = the adapter switched off, fine-tune = on, on the same 4-bit model as trained;
--merged: the 16-bit base and the adapter merged into it), a merged model directory, or a base model (Hub id or
local directory; --base another model to compare with).

Chat template: every request is rendered with the tokenizer's chat template, the same way for both models
(lm-eval's apply_chat_template, few-shot examples as earlier turns); --no-chat-template gives lm-eval's plain
text prompts instead (what most published base-model scores use).

Memory: on a GPU the batch size is the largest whose estimated peak (qlora_phi3/memory/eval_memory.py: weights
as loaded, one layer's no-grad working set, logits and their log-softmax, a generation task's KV cache) fits
--budget (default: the card's memory) at rows of --max-length tokens (default: the model's context), so a run of
a 12 GB recipe evaluates on the same card; lower --max-length for a bigger batch, or give --batch-size.
On a CPU the batch is 8.

Offline: tasks are found and their data loaded before any model is. A Hub task whose data is not cached fails at
once, naming --include-path; the shipped task tiny_chat_facts (the tiny chat set's facts, multiple choice) needs
no file or network: `qlora-phi3 eval runs/tiny --tasks tiny_chat_facts`. docs/evaluate.md has the details."""


def register(sub) -> None:
    p = sub.add_parser("eval", help="did the fine-tune help? lm-eval tasks and held-out answers, base vs fine-tune",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET", help="run directory, merged model directory, or base model (Hub id or "
                                                    "local directory)")
    p.add_argument("--tasks", metavar="LIST", default="",
                   help="comma-separated lm-eval tasks or groups, e.g. tiny_chat_facts or arc_easy,hellaswag")
    p.add_argument("--include-path", metavar="DIR", action="append", default=[],
                   help="folder of your own lm-eval task YAMLs (repeatable); the shipped tasks are always found")
    p.add_argument("--out", metavar="DIR", help="where results go (default: RUN/eval for a run, else ./eval/NAME)")
    p.add_argument("--limit", type=float, metavar="N",
                   help="only the first N documents of each task (and N conversations of --data); below 1, a fraction")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples per request (default: the task's)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="requests per forward (default: chosen for --budget on a GPU, 8 on a CPU)")
    p.add_argument("--max-length", type=int, metavar="TOKENS",
                   help="longest request; longer ones keep their last TOKENS (default: the model's context)")
    p.add_argument("--budget", metavar="SIZE", help="GPU memory the batch size is chosen for, e.g. 12GiB "
                                                   "(default: the card's)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="render requests with the chat template, for both models (default: on)")
    p.add_argument("--merged", action="store_true",
                   help="for a run: the 16-bit base and the adapter merged into it, instead of 4-bit as trained")
    p.add_argument("--base", metavar="NAME_OR_PATH", help="for a model TARGET: compare it with this model")
    p.add_argument("--data", nargs="?", const="held-out", metavar="FILE",
                   help="greedy answers to the last user turn of each conversation of FILE (any format `qlora-phi3 "
                        "data` reads), base and fine-tune side by side in answers.jsonl, with exact match and token "
                        "F1; --data alone: the run's own held-out split")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer length cap for --data "
                                                                                 "(default 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.set_defaults(func=_run)


def plan_from_args(args):
    from qlora_phi3.errors import UserError
    from qlora_phi3.evaluate.compare import EvalPlan
    from qlora_phi3.evaluate.tasks import parse_tasks
    from qlora_phi3.units import parse_size

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 16),
                             ("--num-fewshot", args.num_fewshot, 0), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low}.")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit:g}: must be more than 0 (a count, or a fraction below 1).")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    return EvalPlan(tasks=parse_tasks(args.tasks), include_paths=list(args.include_path), limit=limit,
                    num_fewshot=args.num_fewshot, batch_size=args.batch_size, max_length=args.max_length,
                    budget_bytes=parse_size(args.budget, "--budget") if args.budget else None,
                    chat_template=args.chat_template, data=args.data, max_new_tokens=args.max_new_tokens,
                    device=args.device)


def _run(args) -> int:
    from qlora_phi3.evaluate.compare import evaluate_target
    from qlora_phi3.ui import info

    summary = evaluate_target(args.target, plan_from_args(args), out=args.out, merged=args.merged, base=args.base)
    print_summary(summary)
    info(f"results: {summary['files']['summary']}" + (" (and run.json)" if summary["kind"] == "run" else ""))
    return 0


def _num(x, fmt: str = "{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_summary(summary: dict) -> None:
    """The before/after table of lm-eval's numbers, then the answers table and scores."""
    from rich.table import Table

    from qlora_phi3.ui import console, info

    settings = summary["settings"]
    if summary["rows"]:
        two = any(r["base"] is not None for r in summary["rows"])
        shots = "task default" if settings["num_fewshot"] is None else settings["num_fewshot"]
        table = Table(title=f"lm-eval {summary.get('lm_eval_version') or ''}: chat template "
                            f"{'on' if settings['chat_template'] else 'off'}, few-shot {shots}, "
                            f"limit {_num(settings['limit'], '{}')}, batch {settings['batch_size']}",
                      title_justify="left")
        for col in ("task", "metric", *(["base", "fine-tune", "delta"] if two else ["value"]), "stderr"):
            table.add_column(col, justify="left" if col in ("task", "metric") else "right", no_wrap=col != "task")
        for r in summary["rows"]:
            stderr = (f"±{_num(r['base_stderr'], '{:.3f}')} / ±{_num(r['finetune_stderr'], '{:.3f}')}" if two
                      else f"±{_num(r['finetune_stderr'], '{:.3f}')}")
            if two:
                better = r["higher_is_better"] is not False
                good = r["delta"] is not None and r["delta"] != 0 and (r["delta"] > 0) == better
                colour = "green" if good else ("red" if r["delta"] else "")
                delta = f"[{colour}]{_num(r['delta'], '{:+.4f}')}[/]" if colour else _num(r["delta"], "{:+.4f}")
                table.add_row(r["task"], r["metric"], _num(r["base"]), _num(r["finetune"]), delta, stderr)
            else:
                table.add_row(r["task"], r["metric"], _num(r["finetune"]), stderr)
        console().print(table)
    for label, m in summary["models"].items():
        info(f"  {label}: {m['description']} ({m['seconds']:.0f} s)")
    if summary.get("answers"):
        _print_answers(summary)


def _print_answers(summary: dict, shown: int = 5) -> None:
    from rich.markup import escape
    from rich.table import Table

    from qlora_phi3.ui import console, info

    labels = list(summary["answers"])
    table = Table(title=f"answers to held-out conversations ({summary.get('data')}), the first {shown}",
                  title_justify="left", show_lines=True)
    for col in ("prompt", "reference", *labels):
        table.add_column(col.replace("finetune", "fine-tune"), overflow="fold")
    def cell(text: str) -> str:  # data, not markup: a "[...]" in a chat prints as written; the file has it whole
        return escape(text if len(text) <= 160 else text[:157] + "...")

    def answer(row: dict, label: str) -> str:
        return cell(row[label]) + ("" if row[f"{label}_exact_match"] else f" [dim](F1 {row[f'{label}_f1']:.2f})[/]")

    for row in summary["answer_rows"][:shown]:
        table.add_row(cell(row["prompt"]), cell(row["reference"]), *(answer(row, label) for label in labels))
    console().print(table)
    for label, score in summary["answers"].items():
        info(f"  {label}: exact match {score['exact_match']:.1%}, token F1 {score['token_f1']:.3f} over "
             f"{score['n']} conversations")
