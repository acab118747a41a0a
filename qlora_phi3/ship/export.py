"""``qlora-phi3 export``: GGUF files for llama.cpp, Ollama and LM Studio, offline, each proven by running it.

Top to bottom: check the flags, the source and ``--out`` (no weights loaded yet: ``ship/export_checks.py``); merge
first when given a run or adapter directory (the existing ``merge``, with its checks and report); write f16 / bf16 /
q8_0 with the ``gguf`` package alone, and K-quants (q4_k_m, q5_k_m, q6_k) from a 16-bit GGUF with llama.cpp's own
quantizer (``ship/gguf_writer.py``); write an Ollama ``Modelfile`` (``ship/modelfile.py``); then load every file in
llama.cpp and compare it with the merged 16-bit model in transformers on held-out conversations (``--check``, on
when llama-cpp-python is installed: ``ship/llama_check.py``). Everything is written into a staging directory beside
``--out`` that is published at the very end, and only over an earlier export when the new one passed its check
(``files.publish_checked``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.errors import UserError
from qlora_phi3.family import family_for_config
from qlora_phi3.files import atomic_write_json, publish_checked, staging
from qlora_phi3.data.split import held_out_records
from qlora_phi3.ship.export_checks import (DEFAULT_CHECK_SAMPLES, DEFAULT_QUANTS, GGUF_EXTRA, QUANTS, REPORT_NAME,
                                           check_out, check_phi3_dir, check_phi3_source, check_samples_flag,
                                           default_name, llama_cpp_for, parse_quants, safe_name)
from qlora_phi3.ship.gguf_writer import write_all, write_gguf
from qlora_phi3.ship.llama_check import check_gguf, conversations, reference
from qlora_phi3.ship.merge import merge, phi3_model_name
from qlora_phi3.ship.modelfile import MODELFILE_NAME, modelfile_text
from qlora_phi3.ui import console, warn

# QUANTS, write_gguf, modelfile_text, MODELFILE_NAME, REPORT_NAME and DEFAULT_QUANTS are re-exported: callers
# (the CLI, bench/, tests) name them from here, the module of the command.
__all__ = ["CheckFailed", "DEFAULT_QUANTS", "ExportResult", "MODELFILE_NAME", "QUANTS", "REPORT_NAME", "export",
           "failure_message", "modelfile_text", "publish_report", "write_gguf"]


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]  # quant -> GGUF path, in the order asked for
    report: dict  # export_report.json: per file its size, seconds and check


class CheckFailed(UserError):
    """A GGUF was written but did not behave like the merged model in llama.cpp (numbers in the message); the files
    are published all the same, and ``result`` is that export, for the caller to show."""

    exit_code = 3

    def __init__(self, message: str, result: ExportResult):
        super().__init__(message)
        self.result = result



def export(path: str, out: str, quants=DEFAULT_QUANTS, force: bool = False, check: bool | None = None,
           name: str | None = None, base: str | None = None, revision: str | None = None,
           check_samples: int = DEFAULT_CHECK_SAMPLES) -> ExportResult:
    """Export ``path`` (run, adapter or merged Phi-3 directory) as GGUF files in ``out``.

    Args:
        quants: GGUF types to write (see ``QUANTS``), e.g. ``("f16", "q8_0", "q4_k_m")``.
        check: load every file in llama.cpp and compare with the merged model (None: when llama-cpp-python
            is installed).
        name: file name stem (default: the source directory's name); files are ``<name>-<quant>.gguf``.
    """
    from qlora_phi3.model.load import hide_load_progress_bars

    t0 = time.perf_counter()
    names = parse_quants(quants)
    check_samples_flag(check_samples)
    llama_cpp, check = llama_cpp_for("--quant", names, check, "each file")
    hide_load_progress_bars()
    src, _ = check_phi3_source(path, base, revision)
    out_dir = Path(out).expanduser()
    check_out(out_dir, src.path, force)
    stem = safe_name(name) if name else default_name(src)
    with staging(out_dir) as stage:
        files, report = _build(llama_cpp, src, stage, stem, names, check, base, revision, check_samples)
        failed = [q for q, row in report["files"].items() if row["check"] and not row["check"]["passed"]]
        report["seconds"] = round(time.perf_counter() - t0, 1)
        out_dir, kept = publish_report(stage, out_dir, report, passed=not failed)
    result = ExportResult(out_dir, {q: out_dir / p.name for q, p in files.items()}, report)
    if failed:
        raise CheckFailed(failure_message(report, failed, out_dir, kept)
                          + "; if the merged model itself does not stop or answer well (`qlora-phi3 chat` on a "
                          "merged dir shows it), train longer before exporting.", result)
    return result


def publish_report(stage: Path, out_dir: Path, report: dict, passed: bool) -> tuple[Path, Path | None]:
    """Publish an export's staged folder (``files.publish_checked``: a failed one is set aside, an earlier good one
    kept) with its report, which records where the files ended up."""
    def finish(dest: Path) -> None:
        report["out_dir"] = str(dest)
        atomic_write_json(stage / REPORT_NAME, report)

    return publish_checked(stage, out_dir, passed=passed, finish=finish)


def failure_message(report: dict, failed: list[str], out_dir: Path, kept: Path | None) -> str:
    """What failed, with the numbers, and where the files are (the earlier export, when kept, is named)."""
    return ("; ".join(f"{q}: " + "; ".join(report["files"][q]["check"]["problems"]) for q in failed)
            + f". The files are in {out_dir} with the numbers in {REPORT_NAME}"
            + (f" (the earlier export in {kept} is left as it was)" if kept else ""))


def _build(llama_cpp, src, stage: Path, stem: str, names: list[str], check: bool, base, revision,
           check_samples: int) -> tuple[dict, dict]:
    """The files, the Modelfile and their checks in ``stage``; returns ({quant: path}, the report so far)."""
    if src.kind == "merged":
        model_dir, merge_report = src.path, None
    else:  # a staging subdirectory, removed before publishing: the GGUFs are the product
        model_dir = stage / "merged"
        merge_report = merge(str(src.path), str(model_dir), base=base, revision=revision,
                             report_samples=check_samples).report
    config = check_phi3_dir(model_dir)
    files, rows = write_all(llama_cpp, model_dir, stage, stem, names, config)
    family = family_for_config(config)
    (stage / MODELFILE_NAME).write_text(modelfile_text(files[names[0]].name, config["max_position_embeddings"],
                                                       family=family), encoding="utf-8")
    checks, ref = {}, None
    if check:
        checks, ref = _run_checks(llama_cpp, src, model_dir, files, check_samples)
    else:
        warn("not checked: llama-cpp-python is not installed, so the files were not run in llama.cpp "
             f"({GGUF_EXTRA})." if llama_cpp is None else "not checked (--no-check).")
    if model_dir != src.path:
        shutil.rmtree(model_dir)
    for q in names:
        rows[q]["check"] = checks.get(q)
    return files, {
        "source": str(src.path), "kind": src.kind, "out_dir": None, "name": stem,
        "general_name": phi3_model_name(stem, family), "modelfile_from": files[names[0]].name,
        "files": rows, "checked": bool(check), "reference": ref,
        "merge": {"merged_worse_than_trained": merge_report["merged_worse_than_trained"],
                  "explanation": merge_report["explanation"]} if merge_report else None,
        "seconds": None,
    }


def _run_checks(llama_cpp, src, model_dir: Path, files: dict, n: int):
    from qlora_phi3.model.load import auto_tokenizer

    tokenizer = auto_tokenizer(str(model_dir))
    records, where = held_out_records(src.recipe, src.run, tokenizer, src.max_seq_len, n)
    convs = conversations(records, tokenizer)
    with console().status("reference: the merged model in transformers..."):
        how = reference(model_dir, convs)
    checks = {}
    for q, path in files.items():
        with console().status(f"running {path.name} in llama.cpp..."):
            checks[q] = check_gguf(llama_cpp, path, convs, tokenizer, QUANTS[q].top1_min)
    return checks, {"conversations": len(convs), "source": where, "model": how,
                    "answer_positions": sum(len(c.answer_pos) for c in convs)}
