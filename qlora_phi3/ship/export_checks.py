"""What ``qlora-phi3 export`` checks before any work, and the table of GGUF types it writes.

The flags (``--quant``, ``--name``), the source (a Phi-3 directory this exporter writes faithfully), ``--out`` (never
the source, never a folder of someone else's files) and whether llama.cpp is there for K-quants and the check:
all refused with one line, before a weight is loaded or a file written. Shared by the merged export
(``ship/export.py``) and the adapter export (``ship/adapter_export.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.errors import UserError
from qlora_phi3.family import family_for_config

__all__ = ["DEFAULT_CHECK_SAMPLES", "DEFAULT_QUANTS", "GGUF_EXTRA", "QUANTS", "REPORT_NAME", "Quant", "check_out",
           "check_phi3_dir", "check_phi3_source", "check_samples_flag", "default_name", "llama_cpp_for", "llama_cpp_module", "parse_quants", "read_json",
           "safe_name"]

REPORT_NAME = "export_report.json"
# pip prints nothing while it compiles: say how long, and how to watch it, before the user starts it.
GGUF_EXTRA = "pip install -v 'qlora-phi3[gguf]'  (builds llama-cpp-python from source with cmake and a C++ " \
             "compiler: 6-12 minutes on 2 idle cores, silent without -v)"


@dataclass(frozen=True)
class Quant:
    name: str
    by: str  # "gguf": written by the gguf package here; "llama.cpp": llama_model_quantize on a 16-bit GGUF
    top1_min: float  # the check's floor for next-token top-1 agreement with the merged 16-bit model
    bits_per_weight: float  # of the large matrices, for the size arithmetic (block scales included)


# Floors from the issue: f16/bf16/q8_0 are within rounding of the 16-bit model (>= 99%); 4-6 bit K-quants
# change the weights enough to flip near-ties (>= 95%, the floor for q4_k_m, kept for the larger K-quants).
# Bits per weight: q8_0 = 32 int8 + one f16 scale per block = 8.5; Q4_K = 4.5, Q5_K = 5.5, Q6_K = 6.5625
# (ggml's block layouts); q4_k_m / q5_k_m keep some tensors at Q6_K, so a file lands slightly above.
QUANTS = {q.name: q for q in (
    Quant("f16", "gguf", 0.99, 16.0),
    Quant("bf16", "gguf", 0.99, 16.0),
    Quant("q8_0", "gguf", 0.99, 8.5),
    Quant("q6_k", "llama.cpp", 0.95, 6.5625),
    Quant("q5_k_m", "llama.cpp", 0.95, 5.5),
    Quant("q4_k_m", "llama.cpp", 0.95, 4.5),
)}
DEFAULT_QUANTS = ("q8_0",)
DEFAULT_CHECK_SAMPLES = 8


def parse_quants(quants) -> list[str]:
    names = [q.strip().lower() for q in (quants.split(",") if isinstance(quants, str) else quants)]
    names = list(dict.fromkeys(q for q in names if q))
    if not names:
        raise UserError(f"--quant is empty; choose from {', '.join(QUANTS)}.")
    unknown = [q for q in names if q not in QUANTS]
    if unknown:
        raise UserError(f"--quant {','.join(unknown)}: unknown; choose from {', '.join(QUANTS)} "
                        "(comma-separated, e.g. --quant q8_0,q4_k_m).")
    return names


def llama_cpp_module():
    """The llama_cpp module, or None when the [gguf] extra is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import logging

    # Its C library logs every tensor at load; errors still come through.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e}).") from None


def check_phi3_dir(model_dir: Path) -> dict:
    """Refuse a model directory this exporter cannot write faithfully; returns its config.json."""
    config = read_json(model_dir / "config.json")
    if config.get("model_type") != "phi3":
        raise UserError(f"{model_dir / 'config.json'}: model_type is {config.get('model_type')!r}, not 'phi3'; "
                        "qlora-phi3 export writes Phi-3 models only (for other models use llama.cpp's "
                        "convert_hf_to_gguf.py).")
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise UserError(f"{model_dir / 'config.json'}: the weights are quantized ({method}); export a 16-bit "
                        "model (qlora-phi3 merge writes one).")
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; export needs the model's fast tokenizer next to it "
                        "(qlora-phi3 merge saves it).")
    model = read_json(model_dir / "tokenizer.json").get("model", {})
    if family_for_config(config).tokenizer_kind == "byte_bpe":
        if model.get("type") != "BPE" or not model.get("merges"):
            raise UserError(f"{model_dir / 'tokenizer.json'}: a {model.get('type')} tokenizer without merges; "
                            "Phi-4-mini uses a byte-level BPE vocabulary (o200k), which is what llama.cpp's 'gpt2' "
                            "tokenizer runs.")
    elif model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UserError(f"{model_dir / 'tokenizer.json'}: a {model.get('type')} tokenizer without byte fallback; "
                        "Phi-3 uses a SentencePiece BPE vocabulary (byte_fallback), which is what llama.cpp's "
                        "'llama' tokenizer runs.")
    return config


def check_out(out: Path, source: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory.")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise UserError(f"--out {out} would replace the directory it exports from ({source}); choose another.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--out {out} is not empty; add --force to replace it (it is replaced only once the "
                            "new export is complete), or choose a new directory.")
        # --force deletes --out in the end: only ever a previous export, never a folder of someone's files.
        if not ((out / REPORT_NAME).is_file() or any(out.glob("*.gguf"))):
            raise UserError(f"--out {out} holds files that are not an export (no {REPORT_NAME}, no *.gguf); "
                            "--force replaces only a previous export. Choose a new directory.")


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-'.")
    return cleaned



def llama_cpp_for(flag: str, quants, check: bool | None, checked: str):
    """llama-cpp-python if installed, and whether to run the check (``None``: when it is installed); refuses, before
    any work, K-quants in ``quants`` (given with ``flag``) or a ``--check`` of ``checked`` without it."""
    llama_cpp = llama_cpp_module()
    need = [q for q in quants if QUANTS[q].by == "llama.cpp"]
    if need and llama_cpp is None:
        raise UserError(f"{flag} {','.join(need)} needs llama.cpp's quantizer (llama-cpp-python), which is not "
                        f"installed: {GGUF_EXTRA}. f16, bf16 and q8_0 need nothing extra.")
    if check and llama_cpp is None:
        raise UserError(f"--check runs {checked} in llama.cpp, which needs llama-cpp-python: {GGUF_EXTRA}. "
                        "Or pass --no-check.")
    return llama_cpp, llama_cpp is not None if check is None else check



def default_name(src) -> str:
    p = src.path.parent if src.path.name in ("adapter", "merged") else src.path
    return safe_name(p.resolve().name)



def check_samples_flag(check_samples: int) -> None:
    if check_samples < 1:
        raise UserError(f"--check-samples {check_samples}: the check needs at least 1 conversation.")


def check_phi3_source(path: str, base: str | None, revision: str | None, adapter: bool = False):
    """What ``path`` holds (:func:`~qlora_phi3.ship.artifacts.resolve_source`), refused unless it is a Phi-3 model or
    an adapter on a Phi-3 base whose shapes and revision match (``adapter``: only that, for ``export --adapter``);
    returns (source, the base's config or None)."""
    from qlora_phi3.ship.artifacts import check_base, resolve_source

    src = resolve_source(path, base, revision)
    if src.kind == "merged" and adapter:
        raise UserError(f"{path} is a merged model: it has no adapter to export. Export it without --adapter, or "
                        "give the run directory (or its adapter/).")
    if src.kind == "merged":
        check_phi3_dir(src.path)
        return src, None
    base_config = check_base(src)
    if getattr(base_config, "model_type", None) != "phi3":
        raise UserError(f"{src.adapter_dir}: its base {src.model_cfg.name_or_path} is a "
                        f"{getattr(base_config, 'model_type', '?')!r} model, not Phi-3; qlora-phi3 export "
                        "writes Phi-3 models only.")
    return src, base_config
