"""``qlora-phi3 export RUN --adapter``: the adapter as a GGUF LoRA for llama.cpp, Ollama and LM Studio, served on
top of the base model instead of merged into it, and proven by running it.

Top to bottom: check the flags, the source and ``--out``; refuse, before any file is written, an adapter that
llama.cpp cannot apply (DoRA, an unconverted OLoRA/LoftQ checkpoint, full module copies, biases); write
``<name>-lora-<quant>.gguf`` with the ``gguf`` package (f16 or q8_0: no compiler, no network); write the base model
as ``<name>-base-<quant>.gguf`` only when asked (``--base-quant``); write an Ollama ``Modelfile`` (``FROM`` the
base GGUF, ``ADAPTER`` the LoRA); then (``--check``) run the base GGUF with the LoRA applied in llama.cpp and
compare it with the 16-bit base + adapter in transformers on held-out conversations, and report what the base
alone predicts. Everything is staged beside ``--out`` and renamed at the end, as ``export`` does.

The format is llama.cpp's (``convert_lora_to_gguf.py``, ``src/llama-adapter.cpp``): ``general.type = adapter``,
``adapter.type = lora``, one float ``adapter.lora.alpha``; for each adapted weight named ``N`` in the base GGUF,
``N.lora_a`` = PEFT's A (r x in) and ``N.lora_b`` = PEFT's B (out x r). llama.cpp adds ``alpha / r * B A x``
with r read from B's shape (``get_scale``). PEFT scales by ``lora_alpha / r``, or by ``lora_alpha / sqrt(r)``
with rsLoRA; the converter writes ``lora_alpha`` as it is, so an rsLoRA adapter converted by it is applied
sqrt(r) times too weakly (4x at r=16). We write the alpha that gives PEFT's scale, ``scale * r`` (``lora_alpha
* sqrt(r)`` for rsLoRA); where ``rank_pattern`` / ``alpha_pattern`` give modules different scales, the file's
one alpha is the most common ``scale * r`` and each other module's ratio to it is folded into its B.
"""

from __future__ import annotations

import math
import re
import shlex
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.errors import UserError
from qlora_phi3.family import family_for_config
from qlora_phi3.files import staging
from qlora_phi3.data.split import held_out_records
from qlora_phi3.ship.export import CheckFailed, ExportResult, failure_message, publish_report
from qlora_phi3.ship.export_checks import (DEFAULT_CHECK_SAMPLES, GGUF_EXTRA, QUANTS, REPORT_NAME, check_out,
                                           check_phi3_dir, check_phi3_source, check_samples_flag, default_name,
                                           llama_cpp_for, read_json, safe_name)
from qlora_phi3.ship.gguf_writer import gguf_types, phi3_tensor_names, target_type, tensor_name, write_all
from qlora_phi3.ship.llama_check import check_gguf, conversations, reference
from qlora_phi3.ship.merge import phi3_model_name
from qlora_phi3.ship.modelfile import MODELFILE_NAME, modelfile_text
from qlora_phi3.ui import console, warn

__all__ = ["LORA_QUANTS", "LoraTensor", "base_label", "check_llama_cpp_can_apply", "export_adapter", "lora_plan",
           "write_lora_gguf"]

# What the LoRA file can be: f16 (PEFT's fp32 weights rounded once), or q8_0 for the A matrices, whose rows (the
# layer's input width) split into 32-value blocks; B's rows are r values long, which do not split at r=16, so B
# stays f16 there (the converter's own fallback), and a q8_0 LoRA is only ~17% smaller (docs/adapter_export.md).
LORA_QUANTS = ("f16", "q8_0")
DEFAULT_LORA_QUANTS = ("f16",)
# PEFT initialisations that start from base + 0 (B = 0), so the adapter alone is the fine-tune.
_PLAIN_INITS = (True, False, None, "gaussian", "default")


@dataclass(frozen=True)
class LoraTensor:
    """One adapted weight: its llama.cpp name, PEFT's tensor names, its rank and PEFT's scale for it."""
    gguf_name: str  # the base tensor it changes, e.g. blk.0.attn_qkv.weight
    a_key: str  # ...qkv_proj.lora_A.weight in adapter_model.safetensors: (r, in)
    b_key: str  # ...qkv_proj.lora_B.weight: (out, r)
    rank: int
    scale: float  # PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA


# --------------------------------------------------------------------------------------------- checks


def check_llama_cpp_can_apply(src) -> dict:
    """Refuse an adapter that a GGUF LoRA cannot express, with the merged export as the way out; returns its
    adapter_config.json. Reads configs only, so it runs before anything is loaded or written."""
    from qlora_phi3.model.lora import CONVERTED_INITS
    from qlora_phi3.run.record import ADAPTER_META

    config_path = src.adapter_dir / "adapter_config.json"
    cfg = read_json(config_path)
    merged = (f"Export the merged model instead, which folds the adapter into the 16-bit base and is checked the "
              f"same way: qlora-phi3 export {src.path} --out DIR (no --adapter).")
    init = cfg.get("init_lora_weights", True)
    recipe_init = src.recipe.lora.init if src.recipe is not None else None
    if cfg.get("peft_type", "LORA") != "LORA":
        why = f"it is a {cfg.get('peft_type')} adapter, not LoRA"
    elif cfg.get("use_dora"):
        why = ("it is a DoRA adapter (use_dora: true): DoRA divides each output column of W + BA by its norm and "
               "multiplies it by a learned magnitude, and llama.cpp's LoRA only adds (alpha / r) B A x")
    elif not (isinstance(init, bool) or init in _PLAIN_INITS):
        why = (f"it was initialised with init_lora_weights={init!r}, which moves part of each base weight into the "
               "adapter: it applies only to that modified base, not to the published base in a GGUF (qlora-phi3 "
               "saves a run's final adapter/ converted to a plain LoRA on the published base; checkpoints are not)")
    elif recipe_init in CONVERTED_INITS and not (src.adapter_dir / ADAPTER_META).is_file():
        why = (f"it is a checkpoint of a lora.init={recipe_init} run, saved before the conversion to a plain LoRA "
               "on the published base that only the run's final adapter/ gets; export the final adapter/ once "
               "training ends")
        merged = "(Merging this checkpoint would meet the same problem.)"
    elif cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        what = cfg.get("modules_to_save") or "embedding rows (trainable_token_indices)"
        why = f"it also trains full copies of {what}, which a LoRA file cannot carry"
    elif cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        why = "it trains biases (bias / lora_bias), which a llama.cpp LoRA cannot carry"
    elif cfg.get("alora_invocation_tokens") or cfg.get("use_qalora") or cfg.get("target_parameters"):
        why = "it is an aLoRA / QA-LoRA / parameter-targeted adapter, which this exporter does not write"
    else:
        return cfg
    raise UserError(f"{src.adapter_dir}: llama.cpp cannot apply this adapter as a GGUF LoRA: {why}. {merged}")


def _peft_scale(cfg: dict, module: str, rank: int, where: Path) -> float:
    """PEFT's scaling for ``module`` (LoraLayer.update_layer): alpha / r, or alpha / sqrt(r) with rsLoRA, where
    rank_pattern / alpha_pattern may set r and alpha per module (matched as PEFT matches them)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg.get("r"))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg.get("lora_alpha"))
    if r != rank:
        raise UserError(f"{where}: {module} has rank {rank} in the weights but {r} in adapter_config.json; the "
                        "adapter is damaged or its config belongs to another adapter.")
    if not alpha:
        raise UserError(f"{where}: lora_alpha is {alpha!r} for {module}, so the adapter changes nothing (and "
                        "llama.cpp reads alpha 0 as 'no scaling'); check adapter_config.json.")
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def lora_plan(adapter_dir: Path, cfg: dict, n_layers: int) -> list[LoraTensor]:
    """Pair every lora_A with its lora_B and name the base tensor it changes; refuses any other tensor."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors (qlora-phi3 reads safetensors only).")
    names = phi3_tensor_names(n_layers)
    pairs: dict[str, dict[str, tuple[str, tuple]]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
            if m is None:
                hint = (" (DoRA's magnitude)" if "magnitude" in key else " (an embedding LoRA)" if "embedding" in key
                        else "")
                raise UserError(f"{weights}: tensor {key!r}{hint} is not a LoRA A/B matrix of a linear layer; "
                                "llama.cpp cannot apply it. Export the merged model instead (no --adapter).")
            pairs.setdefault(m.group(1), {})[m.group(2)] = (key, tuple(f.get_slice(key).get_shape()))
    if not pairs:
        raise UserError(f"{weights}: holds no LoRA weights.")
    plan = []
    # In layer order (blk.2 before blk.10), as the base GGUF lists them; llama.cpp pairs them by name either way.
    for module, ab in sorted(pairs.items(), key=lambda kv: [(0, int(t), "") if t.isdigit() else (1, 0, t)
                                                            for t in kv[0].split(".")]):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{weights}: {module} has lora_{next(iter(ab))} but no partner; the file is incomplete.")
        gguf_name = tensor_name(names, module + ".weight")
        if gguf_name is None or not gguf_name.endswith(".weight"):
            raise UserError(f"{weights}: {module} has no place in llama.cpp's Phi-3 graph, so a GGUF LoRA cannot "
                            "change it. Export the merged model instead (no --adapter).")
        (a_key, a_shape), (b_key, b_shape) = ab["A"], ab["B"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise UserError(f"{weights}: {module}: lora_A {a_shape} and lora_B {b_shape} do not multiply.")
        plan.append(LoraTensor(gguf_name, a_key, b_key, a_shape[0], _peft_scale(cfg, module, a_shape[0], weights)))
    return plan


def _file_alpha(plan: list[LoraTensor]) -> float:
    """The one alpha for the file: the most common scale * r, i.e. the alpha at which llama.cpp's alpha / r gives
    most modules PEFT's scale unchanged."""
    return Counter(round(t.scale * t.rank, 9) for t in plan).most_common(1)[0][0]


# --------------------------------------------------------------------------------------------- writer


def write_lora_gguf(adapter_dir: Path, dest: Path, quant: str, name: str, plan: list[LoraTensor]) -> dict:
    """Write the adapter in ``adapter_dir`` as a llama.cpp GGUF LoRA of type ``quant`` (f16 or q8_0).

    The tensors are the adapter's (megabytes), so they are converted in memory, not streamed.
    Returns {"alpha": what the file says, "tensor_types": {type: count}, "folded": modules whose B carries a ratio}.
    """
    import gguf
    from safetensors import safe_open

    qtype, ftype = gguf_types(quant)
    alpha = _file_alpha(plan)
    w = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(phi3_model_name(name))
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types: dict[str, int] = {}
    folded = []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for t in plan:
            a = f.get_tensor(t.a_key).float().numpy()
            b = f.get_tensor(t.b_key).float().numpy()
            ratio = t.scale * t.rank / alpha  # 1 unless rank_pattern / alpha_pattern gave this module its own scale
            if abs(ratio - 1.0) > 1e-9:
                b = b * ratio
                folded.append(t.gguf_name)
            for suffix, arr in ((".lora_a", a), (".lora_b", b)):
                kind = target_type(qtype, t.gguf_name + suffix, arr.shape)
                w.add_tensor(t.gguf_name + suffix, gguf.quants.quantize(arr, kind), raw_dtype=kind)
                types[kind.name] = types.get(kind.name, 0) + 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return {"alpha": alpha, "tensor_types": types, "folded": folded}


# --------------------------------------------------------------------------------------------- export


def _parse_lora_quants(quants) -> list[str]:
    names = [q.strip().lower() for q in (quants.split(",") if isinstance(quants, str) else quants)]
    names = list(dict.fromkeys(q for q in names if q))
    if not names or any(q not in LORA_QUANTS for q in names):
        raise UserError(f"--quant {','.join(names) or '(empty)'} with --adapter: the LoRA file is {' or '.join(LORA_QUANTS)} "
                        "(comma-separated; K-quants are for whole models: --base-quant q4_k_m quantizes the base).")
    return names


def _base_dir(src) -> Path:
    """The 16-bit base on this machine: a local directory, or the Hub snapshot of the adapter's revision."""
    from qlora_phi3.model.load import resolve_model_path

    cfg = src.model_cfg
    local = Path(resolve_model_path(cfg.name_or_path)).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(cfg.name_or_path, revision=cfg.revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "not available here"
        raise UserError(f"cannot get the base model {base_label(cfg.name_or_path, cfg.revision)} "
                        f"({str(e).splitlines()[0]}); download it (hf download ...) or pass --base DIR.") from None


def base_label(name_or_path: str, revision: str | None) -> str:
    """The base model as people name it: ``microsoft/Phi-3-mini-4k-instruct @ <revision>`` (no revision: the name)."""
    return f"{name_or_path}{' @ ' + revision if revision else ''}"


def export_adapter(path: str, out: str, quants=DEFAULT_LORA_QUANTS, base_quant: str | None = None,
                   force: bool = False, check: bool | None = None, name: str | None = None, base: str | None = None,
                   revision: str | None = None, check_samples: int = DEFAULT_CHECK_SAMPLES) -> ExportResult:
    """Export the adapter of ``path`` (run or adapter directory) as GGUF LoRA files in ``out``.

    Args:
        quants: LoRA file types (``LORA_QUANTS``); files are ``<name>-lora-<quant>.gguf``.
        base_quant: also write the base model as ``<name>-base-<base_quant>.gguf`` (any of ``QUANTS``).
        check: run the base GGUF with each LoRA in llama.cpp and compare with the base + adapter in transformers
            (None: when llama-cpp-python is installed). Without ``base_quant`` an f16 base is written for the
            check and not kept.
    """
    from qlora_phi3.model.load import hide_load_progress_bars

    t0 = time.perf_counter()
    names = _parse_lora_quants(quants)
    if base_quant is not None and base_quant not in QUANTS:
        raise UserError(f"--base-quant {base_quant}: unknown; choose from {', '.join(QUANTS)}.")
    check_samples_flag(check_samples)
    llama_cpp, check = llama_cpp_for("--base-quant", [base_quant] if base_quant else [], check, "the LoRA")
    hide_load_progress_bars()
    src, base_config = check_phi3_source(path, base, revision, adapter=True)
    peft_cfg = check_llama_cpp_can_apply(src)
    plan = lora_plan(src.adapter_dir, peft_cfg, base_config.num_hidden_layers)
    out_dir = Path(out).expanduser()
    check_out(out_dir, src.path, force)
    stem = safe_name(name) if name else default_name(src)
    base_dir = _base_dir(src) if (base_quant or check) else None
    with staging(out_dir) as stage:
        files, rows = _write_loras(src, stage, stem, names, plan)
        base_file, base_files, base_rows, ctx = _write_base(llama_cpp, src, base_dir, base_config, stage, stem,
                                                            base_quant)
        write_base = None if base_file else _write_base_command(src, out_dir, stem, name, names, base, revision)
        base_name = _write_modelfile(src, base_config, stage, stem, base_file, files[names[0]].name, ctx, write_base)
        checks, reference_info, base_alone = {}, None, None
        if check:
            check_base_file = base_file or base_files["f16"]
            floor = min(QUANTS[q].top1_min for q in names + [base_quant or "f16"])
            checks, base_alone, reference_info = _run_checks(llama_cpp, src, base_dir, check_base_file, files,
                                                             floor, check_samples)
        else:
            warn("not checked: llama-cpp-python is not installed, so the LoRA was not run in llama.cpp "
                 f"({_escape(GGUF_EXTRA)})." if llama_cpp is None else "not checked (--no-check).")
        for p in base_files.values():
            if p != base_file:
                p.unlink()  # written for the check only
        for q in names:
            rows[q]["check"] = checks.get(q)
        report = _report(src, peft_cfg, plan, stem, rows, base_rows.get(base_quant) if base_quant else None,
                         base_name, files[names[0]].name, check, reference_info, base_alone, write_base)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        failed = [q for q in names if checks.get(q) and not checks[q]["passed"]]
        out_dir, kept = publish_report(stage, out_dir, report, passed=not failed)
    result = ExportResult(out_dir, {q: out_dir / p.name for q, p in files.items()}, report)
    if failed:
        raise CheckFailed(failure_message(report, failed, out_dir, kept) + f"; the merged export (qlora-phi3 export "
                          f"{src.path} --out DIR) is the way out if the LoRA does not apply.", result)
    return result


def _escape(text: str) -> str:
    from rich.markup import escape  # the extra's name, [gguf], is not console markup

    return escape(text)


def _write_loras(src, stage: Path, stem: str, names: list[str], plan: list[LoraTensor]) -> tuple[dict, dict]:
    """``<stem>-lora-<quant>.gguf`` for each of ``names``; returns ({quant: path}, {quant: report row})."""
    files, rows = {}, {}
    for q in names:
        dest = stage / f"{stem}-lora-{q}.gguf"
        t = time.perf_counter()
        with console().status(f"writing {dest.name}..."):
            written = write_lora_gguf(src.adapter_dir, dest, q, stem, plan)
        files[q] = dest
        rows[q] = {"file": dest.name, "bytes": dest.stat().st_size, "seconds": round(time.perf_counter() - t, 2),
                   "lora_alpha": written["alpha"], "tensor_types": written["tensor_types"],
                   "scale_folded_into_b": written["folded"], "written_by": "gguf"}
    return files, rows


def _write_base(llama_cpp, src, base_dir: Path | None, base_config, stage: Path, stem: str, base_quant: str | None):
    """The base as ``<stem>-base-<quant>.gguf`` when asked (``base_quant``) or needed by the check (f16, removed
    after it); returns (the kept base file or None, {quant: path}, {quant: report row}, the context length)."""
    base_files, base_rows, base_config_json = {}, {}, {}
    if base_dir is not None:
        base_config_json = check_phi3_dir(base_dir)
        # The base GGUF is named after the base model: llama.cpp applies Phi-3's tokenizer rules only when the
        # name says Phi-3, which phi3_model_name ensures.
        general = src.model_cfg.name_or_path.rstrip("/").split("/")[-1].split(":")[-1]
        wanted = [base_quant] if base_quant else ["f16"]
        base_files, base_rows = write_all(llama_cpp, base_dir, stage, f"{stem}-base", wanted, base_config_json,
                                          general_name=general)
    base_file = base_files.get(base_quant) if base_quant else None
    ctx = (base_config_json or {}).get("max_position_embeddings") or base_config.max_position_embeddings
    return base_file, base_files, base_rows, ctx


# The base file a Modelfile names when the export did not write one: what `--base-quant f16` writes.
UNWRITTEN_BASE_QUANT = "f16"


def _write_base_command(src, out_dir: Path, stem: str, name: str | None, names: list[str], base: str | None,
                        revision: str | None) -> str:
    """The command that writes the base file the Modelfile names into this export: the same export again, with
    ``--base-quant``, replacing this one (only once the new one is complete and has passed its check)."""
    args = ["qlora-phi3", "export", str(src.path), "--adapter", "--base-quant", UNWRITTEN_BASE_QUANT,
            "--out", str(out_dir), "--force"]
    if name:
        args += ["--name", stem]
    if tuple(names) != DEFAULT_LORA_QUANTS:
        args += ["--quant", ",".join(names)]
    if base:
        args += ["--base", base]
    if revision:
        args += ["--revision", revision]
    return shlex.join(args)


def _write_modelfile(src, base_config, stage: Path, stem: str, base_file: Path | None, adapter: str, ctx: int,
                     write_base: str | None) -> str:
    """The Modelfile: FROM the base GGUF written here, or, when none was, the one ``write_base`` writes (said in
    comment lines above FROM); returns the name FROM gives."""
    from_note = "" if base_file else (
        f"# FROM: the base model as GGUF: {base_label(src.model_cfg.name_or_path, src.model_cfg.revision)}, "
        "the weights the adapter was trained on.\n"
        f"# This export did not write it; this command writes it here, as named below:\n#   {write_base}\n"
        "# or point FROM at your own GGUF of that exact model.\n")
    base_name = base_file.name if base_file else f"{stem}-base-{UNWRITTEN_BASE_QUANT}.gguf"
    (stage / MODELFILE_NAME).write_text(
        modelfile_text(base_name, ctx, adapter=adapter, from_note=from_note,
                       family=family_for_config(base_config)),
        encoding="utf-8")
    return base_name


def _report(src, peft_cfg: dict, plan, stem: str, rows: dict, base_row, base_name: str, adapter: str, check: bool,
            reference_info, base_alone, write_base: str | None) -> dict:
    return {
        "source": str(src.path), "kind": src.kind, "adapter_dir": str(src.adapter_dir),
        "base_model": src.model_cfg.name_or_path, "revision": src.model_cfg.revision, "out_dir": None,
        "name": stem, "adapter": {"r": peft_cfg.get("r"), "lora_alpha": peft_cfg.get("lora_alpha"),
                                  "use_rslora": bool(peft_cfg.get("use_rslora")), "tensors": 2 * len(plan),
                                  "parameters": _lora_params(src.adapter_dir, plan)},
        "files": rows, "base_file": base_row,
        "modelfile_from": base_name, "modelfile_adapter": adapter, "modelfile_from_command": write_base,
        "checked": bool(check), "reference": reference_info, "base_alone": base_alone,
        "seconds": None,
    }


def _lora_params(adapter_dir: Path, plan: list[LoraTensor]) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for t in plan for k in (t.a_key, t.b_key))


def _run_checks(llama_cpp, src, base_dir: Path, base_gguf: Path, files: dict, floor: float, n: int):
    from transformers import AutoTokenizer

    tok_dir = src.adapter_dir if (src.adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    records, where = held_out_records(src.recipe, src.run, tokenizer, src.max_seq_len, n)
    convs = conversations(records, tokenizer)
    with console().status("reference: the 16-bit base + adapter in transformers..."):
        how = reference(base_dir, convs, adapter_dir=src.adapter_dir)
    checks = {}
    for q, lora in files.items():
        with console().status(f"running {base_gguf.name} + {lora.name} in llama.cpp..."):
            checks[q] = check_gguf(llama_cpp, base_gguf, convs, tokenizer, floor, lora_path=lora)
    # The base alone: what the adapter changes (a LoRA that llama.cpp silently did not apply would score as this).
    with console().status(f"running {base_gguf.name} alone in llama.cpp..."):
        alone = check_gguf(llama_cpp, base_gguf, convs, tokenizer, floor, generate=False)
    base_alone = {"top1_agreement": alone["top1_agreement"], "max_abs_logit_diff": alone["max_abs_logit_diff"],
                  # what the pass mark says of the base alone, the file a LoRA that did not apply would act as
                  "top1_problem": next((p for p in alone["problems"] if p.startswith("top-1")), None)}
    return checks, base_alone, {"conversations": len(convs), "source": where, "model": how,
                                "answer_positions": sum(len(c.answer_pos) for c in convs),
                                "base_gguf": base_gguf.name}
