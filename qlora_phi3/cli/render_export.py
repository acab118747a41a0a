"""What ``qlora-phi3 export`` shows of an :class:`~qlora_phi3.ship.export.ExportResult`: the table of the files written
with their llama.cpp check (also when a check failed: the numbers behind the error), then where they are and how
to run them. One pair for a merged export, one for ``--adapter``."""

from __future__ import annotations

from rich.markup import escape

from qlora_phi3.ship.export import MODELFILE_NAME, ExportResult
from qlora_phi3.ui import console, info

__all__ = ["print_adapter_export_done", "print_adapter_export_table", "print_export_done", "print_export_table"]


def _verdict(check: dict) -> str:
    return "[green]pass[/]" if check["passed"] else "[bold red]FAIL[/]"


def print_export_table(report: dict) -> None:
    """Each GGUF's size and write time; checked: token ids, top-1 and stops against the merged model."""
    from rich.table import Table

    table = Table(title=f"export: {report['out_dir']}", title_justify="left",
                  caption=("checked in llama.cpp against the merged model in transformers on "
                           f"{report['reference']['conversations']} held-out conversations"
                           if report["checked"] else "not checked in llama.cpp"), caption_justify="left")
    for col in ("quant", "MiB", "s"):
        table.add_column(col, justify="left" if col == "quant" else "right")
    if report["checked"]:
        for col in ("token ids =", "top-1 =", "stops at <|end|>", "check"):
            table.add_column(col, justify="right")
    for q, row in report["files"].items():
        cells = [q, f"{row['bytes'] / 2**20:.2f}", f"{row['seconds']:.1f}"]
        c = row.get("check")
        if c:
            cells += [f"{c['token_ids_equal']}/{c['conversations']}", f"{c['top1_agreement']:.1%}",
                      f"{c['stopped_at_end']}/{c['conversations']}", _verdict(c)]
        table.add_row(*cells)
    console().print(table)


def print_export_done(result: ExportResult) -> None:
    stem, first = result.report["name"], next(iter(result.files.values()))
    info(f"[bold green]exported[/] {', '.join(result.files)} in {result.report['seconds']:.0f}s: "
         f"[bold]{result.out_dir}[/]")
    info(f"next: `ollama create {stem} -f {result.out_dir / MODELFILE_NAME} && ollama run {stem}`, or llama.cpp: "
         f"`llama-cli -m {first} -cnv`")


def print_adapter_export_table(report: dict) -> None:
    """Each LoRA file's size and alpha; checked: the base GGUF with it in llama.cpp against base + adapter."""
    from rich.table import Table

    checked = report["checked"]
    table = Table(title=f"export --adapter: {report['out_dir']}", title_justify="left", caption_justify="left",
                  caption=(f"{report['reference']['base_gguf']} + LoRA in llama.cpp against the 16-bit base + adapter "
                           f"in transformers on {report['reference']['conversations']} held-out conversations; the "
                           f"base alone agrees on {report['base_alone']['top1_agreement']:.1%}"
                           if checked else "not checked in llama.cpp"))
    for col in ("file", "MiB", "alpha"):
        table.add_column(col, justify="left" if col == "file" else "right")
    if checked:
        for col in ("token ids =", "top-1 =", "max |Δlogit|", "stops at <|end|>", "check"):
            table.add_column(col, justify="right")
    for row in report["files"].values():
        cells = [row["file"], f"{row['bytes'] / 2**20:.2f}", f"{row['lora_alpha']:g}"]
        c = row.get("check")
        if c:
            cells += [f"{c['token_ids_equal']}/{c['conversations']}", f"{c['top1_agreement']:.1%}",
                      f"{c['max_abs_logit_diff']:.4f}", f"{c['stopped_at_end']}/{c['conversations']}", _verdict(c)]
        table.add_row(*cells)
    console().print(table)


def print_adapter_export_done(result: ExportResult) -> None:
    from qlora_phi3.ship.adapter_export import base_label

    report, modelfile = result.report, result.out_dir / MODELFILE_NAME
    stem = report["name"]
    how = f"ollama create {stem} -f {modelfile}"
    if not report["base_file"]:  # FROM names a base this export did not write: say how to write exactly that file
        how = (f"its FROM names {report['modelfile_from']}, not written; `{report['modelfile_from_command']}` "
               f"writes it (or point FROM at your GGUF of {base_label(report['base_model'], report['revision'])}), "
               f"then {how}")
    info(f"[bold green]exported[/] the adapter as {', '.join(p.name for p in result.files.values())} in "
         f"{report['seconds']:.0f}s: [bold]{result.out_dir}[/]  (Ollama: {escape(how)})")
