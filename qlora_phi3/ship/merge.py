"""``qlora-phi3 merge``: fold a LoRA adapter into the 16-bit base and save one standalone model, then prove
the merge with a report.

Top to bottom: check the adapter and the output directory (no weights loaded yet); evaluate the model as
trained, (a) the 4-bit base + adapter; load the base in 16-bit on the CPU, evaluate (c) base + adapter
unmerged, let PEFT merge it, evaluate (b) the merged model; save it (sharded safetensors, config with the
KV cache on, generation config that stops at ``<|end|>``, tokenizer with its chat template) into a
temporary directory beside ``--out`` and rename that at the very end, so ``--out`` is complete or absent.

Why compare three models: the adapter was trained against the *4-bit* base and learned around its
quantization error, but it is merged into the *16-bit* base (users report quality drops after merging for
this reason). (c) - (a) is that base
difference; (b) - (c) is only the rounding of the merge into fp16/bf16.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from qlora_phi3.data.encode import encode_records
from qlora_phi3.data.split import held_out_records
from qlora_phi3.errors import UserError
from qlora_phi3.family import PHI3, TokenizerFamily, family_for_tokenizer
from qlora_phi3.files import atomic_write_json, atomic_write_text, publish_checked, staging
from qlora_phi3.model.load import hide_load_progress_bars, load_model, load_tokenizer, pick_compute_dtype, resolve_model_path
from qlora_phi3.model.lora import check_still_tied
from qlora_phi3.ship.artifacts import check_base, load_adapter, resolve_source, stop_token_ids
from qlora_phi3.phi3 import IGNORE_INDEX
from qlora_phi3.ui import console, info
from qlora_phi3.units import parse_size

__all__ = ["MergeResult", "merge", "phi3_model_name", "LOSS_TOLERANCE_REL", "LOSS_TOLERANCE_ABS"]

# The merged model is flagged when its eval loss exceeds the 4-bit + adapter loss by more than
# max(2% of it, 0.01 nats): 2% is well beyond run-to-run noise of a fixed eval set, and the absolute
# floor keeps a near-zero loss (a task learned perfectly) from flagging on rounding noise alone.
LOSS_TOLERANCE_REL = 0.02
LOSS_TOLERANCE_ABS = 0.01
DEFAULT_SHARD_SIZE = "2GB"  # 2 x 10^9 bytes: small enough for any filesystem and for loaders that map one at a time
REPORT_NAME = "merge_report.json"
MODELS = {"a": "4-bit base + adapter (as trained)", "b": "merged 16-bit", "c": "16-bit base + adapter (unmerged)"}


@dataclass
class MergeResult:
    out_dir: Path
    report: dict


@dataclass
class _Sample:
    input_ids: list[int]
    labels: list[int]


def _check_out(out: Path, src, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory.")
    inputs = [p.resolve() for p in (src.path, src.adapter_dir) if p is not None]
    for p in inputs:
        if out.resolve() == p or out.resolve() in p.parents:
            raise UserError(f"--out {out} would overwrite the adapter it merges ({p}); choose another directory.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--out {out} is not empty; add --force to replace it (it is replaced only once the "
                            "new model is complete), or choose a new directory.")
        # --force deletes --out in the end: only ever a model directory, never a folder of someone's files.
        if not ((out / REPORT_NAME).is_file() or ((out / "config.json").is_file() and any(out.glob("*.safetensors")))):
            raise UserError(f"--out {out} holds files that are not a model (no config.json + *.safetensors); "
                            "--force replaces only a previous merge. Choose a new directory.")


def _peak_rss_gib() -> float:
    """The process's peak resident set size so far (what the OS had to provide). Lifetime, not per phase:
    for ``qlora-phi3 merge`` the merge is the process, so this is the RAM the command needs."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes on macOS, KiB on Linux


def _eval_samples(src, tokenizer, n: int) -> tuple[list[_Sample], str]:
    records, where = held_out_records(src.recipe, src.run, tokenizer, src.max_seq_len, n)
    enc = encode_records(records, tokenizer, src.max_seq_len)
    return [_Sample(i, lab) for i, lab in zip(enc.input_ids, enc.labels)], where


def _answer_logits(model, samples: list[_Sample], autocast_dtype=None):
    """Per sample: (logits at the positions that predict assistant tokens as float32, their targets).
    Only those positions are kept: they are what eval loss is computed on, and keeping the full
    vocabulary at every position would cost tokens x 32064 x 4 bytes per model on Phi-3."""
    out = []
    for s in samples:
        ids = torch.tensor([s.input_ids])
        targets = torch.tensor(s.labels[1:])
        keep = targets != IGNORE_INDEX
        ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = model(input_ids=ids).logits[0, :-1].float()
        out.append((logits[keep], targets[keep]))
    return out


def _compare(rows, ref) -> dict:
    logits = torch.cat([r[0] for r in rows])
    targets = torch.cat([r[1] for r in rows])
    ref_logits = torch.cat([r[0] for r in ref])
    diff = (logits - ref_logits).abs()
    return {
        "eval_loss": torch.nn.functional.cross_entropy(logits, targets).item(),
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
    }


def _is_worse(loss: float, ref_loss: float) -> bool:
    return loss - ref_loss > max(LOSS_TOLERANCE_REL * ref_loss, LOSS_TOLERANCE_ABS)


def _load_16bit(src, dtype: str):
    cfg = src.model_cfg
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.name_or_path), revision=cfg.revision, dtype=getattr(torch, dtype),
            device_map={"": "cpu"}, attn_implementation="sdpa", trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights
        )
    except OSError as e:
        raise UserError(f"cannot load the base model {cfg.name_or_path} in 16-bit: {str(e).splitlines()[0]} "
                        "(it needs *.safetensors weights; download them with `hf download`).") from None


def _check_finite(model, dtype: str) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            hint = " Use --dtype bfloat16 (same range as float32)." if dtype == "float16" else ""
            raise UserError(f"the merged weight {name} has inf/NaN values in {dtype}: the adapter's update pushed "
                            f"it out of range.{hint}")


def _save(model, tokenizer, tmp: Path, shard_bytes: int) -> None:
    # Training leaves use_cache=False behind (useless under checkpointing); inference needs the KV cache.
    model.config.use_cache = True
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    model.generation_config.eos_token_id = list(dict.fromkeys(eos + stop_token_ids(tokenizer)))
    # Phi-3's config says pad = eos (32000); the tokenizer pads with <unk>. Generation and batching read the
    # config, so they must agree with the tokenizer, or padding would look like an end of text.
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, max_shard_size=shard_bytes)  # safetensors only in transformers 5
    # Training pads on the right; batched generation needs left padding so each prompt ends at the cut.
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp)
    _portable_tokenizer_config(tmp / "tokenizer_config.json", family_for_tokenizer(tokenizer))


# Load-time arguments transformers writes back into tokenizer_config.json: they describe how this machine found
# the tokenizer, and would make another machine's load behave as if told the same.
MACHINE_KEYS = ("is_local", "local_files_only", "cache_dir", "token", "revision", "trust_remote_code", "_commit_hash")


def _portable_tokenizer_config(path: Path, family: TokenizerFamily = PHI3) -> None:
    """tokenizer_config.json as users of the merged model need it, written once: no machine keys, left padding,
    and ``add_bos_token`` / ``add_eos_token`` false (training fed no <s>, data/encode.py; without the keys
    llama.cpp's converter makes every prompt start with one)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in MACHINE_KEYS:
        config.pop(key, None)
    config.update(padding_side="left", add_bos_token=False, add_eos_token=False)
    if family.tokenizer_kind == "byte_bpe":
        # As Phi-4-mini publishes it: llama.cpp's converter reads a byte-level BPE Phi only when the class says
        # GPT2Tokenizer (conversion/phi.py), else it asks for a SentencePiece tokenizer.model.
        config["tokenizer_class"] = "GPT2Tokenizer"
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def phi3_model_name(name: str, family: TokenizerFamily = PHI3) -> str:
    """``name`` as a GGUF's general.name for a model of ``family``. llama.cpp applies Phi-3's rstrip after special
    tokens exactly when general.name contains "phi3" or "phi-3" (llama-vocab.cpp). A Phi-3-family name must say it
    (without rstrip ``<|user|>\\nHi`` tokenizes differently from training); a Phi-4-mini name must not (its role
    tokens keep the whitespace after them, so rstrip would swallow a reply's leading newline)."""
    says_phi3 = re.search(r"phi-?3", name, re.IGNORECASE)
    if family.name == "phi3":
        return name if says_phi3 else f"{name} (Phi-3 fine-tune)"
    cleaned = re.sub(r"phi-?3(\.5)?", "phi", name, flags=re.IGNORECASE) if says_phi3 else name
    return cleaned if re.search(r"phi-?4", cleaned, re.IGNORECASE) else f"{cleaned} ({family.title} fine-tune)"


def _save_for_llama_cpp(src, tmp: Path, out_dir: Path, family: TokenizerFamily = PHI3) -> None:
    """What llama.cpp's ``convert_hf_to_gguf.py`` needs to turn this directory into a GGUF that runs as trained:

    * ``tokenizer.model``: it reads Phi-3's vocabulary from the SentencePiece model and refuses a directory
      without one (transformers saves only tokenizer.json): the adapter's or the base's copy (Hub cache too);
    * ``add_bos_token: false`` in tokenizer_config.json (written by :func:`_portable_tokenizer_config`);
    * a model card whose name says Phi-3: it names the GGUF after the card or the directory, and llama.cpp
      swallows the whitespace after Phi-3's special tokens only when that name contains "phi3"/"phi-3"
      (llama-vocab.cpp)."""
    import yaml
    from transformers.utils import cached_file

    base = resolve_model_path(src.model_cfg.name_or_path)
    for where, revision in ((src.adapter_dir, None), (base, src.model_cfg.revision)):
        found = None if (tmp / "tokenizer.model").is_file() else cached_file(
            str(where), "tokenizer.model", revision=revision, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False)
        if found:
            shutil.copyfile(found, tmp / "tokenizer.model")
    card = {"model_name": phi3_model_name(out_dir.name, family), "tags": ["phi3", "qlora-phi3"]}
    if not Path(base).expanduser().exists() and not base.startswith(("/", ".", "~")):
        card["base_model"] = base  # a Hub id
    (tmp / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n\nMerged by `qlora-phi3 merge` "
                                   f"from `{src.adapter_dir}`; see merge_report.json.\n", encoding="utf-8")


def _evaluate_4bit(src, samples):
    """(a): the model exactly as trained, under the autocast training used on the CPU."""
    compute = src.compute_dtype or pick_compute_dtype(src.model_cfg.compute_dtype, "cpu").value
    model = load_adapter(load_model(src.model_cfg, "cpu", compute, "sdpa"), src.adapter_dir)
    return _answer_logits(model, samples, getattr(torch, compute) if compute != "float32" else None)


def merge(path: str, out: str, dtype: str = "float16", force: bool = False, base: str | None = None,
          revision: str | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE, report_samples: int = 8
          ) -> MergeResult:
    """Merge the adapter in ``path`` (run or adapter directory) into its 16-bit base and save it to ``out``."""
    t0 = time.perf_counter()
    if dtype not in ("float16", "bfloat16"):
        raise UserError(f"--dtype {dtype}: choose float16 or bfloat16.")
    if report_samples < 1:
        raise UserError(f"--report-samples {report_samples}: the merge report needs at least 1 sample.")
    # Checked up front: save_pretrained would only reject it after the whole merge and report.
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    hide_load_progress_bars()
    src = resolve_source(path, base, revision)
    if src.kind == "merged":
        raise UserError(f"{path} is already a full model (config.json + weights, no adapter); nothing to merge.")
    out_dir = Path(out).expanduser()
    _check_out(out_dir, src, force)
    check_base(src)
    has_tokenizer = (src.adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(src.model_cfg, str(src.adapter_dir) if has_tokenizer else None)
    samples, where = _eval_samples(src, tokenizer, report_samples)
    info(f"merging [bold]{src.adapter_dir}[/] into {src.model_cfg.name_or_path}"
         f"{' @ ' + src.model_cfg.revision if src.model_cfg.revision else ''} in {dtype} on the CPU; "
         f"report on {len(samples)} samples from {where}")

    rss_start_gib = _peak_rss_gib()
    # Its checks (finite weights, a tied head still tied) raise before anything is saved, so what is published has
    # passed them; the merge report's verdict is advice, not a check.
    with staging(out_dir) as tmp:
        with console().status("(a) evaluating the 4-bit base + adapter, as trained..."):
            a = _evaluate_4bit(src, samples)
            gc.collect()  # the 4-bit model is gone before the 16-bit one arrives: peak stays one 16-bit copy
        with console().status(f"loading the base in {dtype}..."):
            model = load_adapter(_load_16bit(src, dtype), src.adapter_dir)
        with console().status("(c) evaluating the 16-bit base + adapter, unmerged..."):
            c = _answer_logits(model, samples)
        with console().status("merging (PEFT merge_and_unload)..."):
            merged = model.merge_and_unload()  # in place: the LoRA update is added to the 16-bit weights
            del model
            _check_finite(merged, dtype)
            # Tied (Phi-4-mini): LoRA never touches the shared matrix, so the merged model keeps one; saved with
            # tie_word_embeddings: true and no lm_head.weight, as published.
            check_still_tied(merged, "merging")
        with console().status("(b) evaluating the merged model..."):
            b = _answer_logits(merged, samples)
        with console().status(f"saving to {out_dir} (via {tmp.name})..."):
            _save(merged, tokenizer, tmp, shard_bytes)
            _save_for_llama_cpp(src, tmp, out_dir, family_for_tokenizer(tokenizer))
            del merged
            gc.collect()
        report = _report(src, dtype, where, samples, a, b, c)
        report["rss_at_start_gib"] = round(rss_start_gib, 3)
        report["peak_rss_gib"] = round(_peak_rss_gib(), 3)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["out_dir"] = str(out_dir)
        atomic_write_json(tmp / REPORT_NAME, report)
        publish_checked(tmp, out_dir, passed=True)
    return MergeResult(out_dir, report)


def _report(src, dtype: str, where: str, samples, a, b, c) -> dict:
    models = {key: _compare(rows, a) for key, rows in (("a", a), ("b", b), ("c", c))}
    for key, row in models.items():
        row["name"] = MODELS[key]
    loss_a, loss_b, loss_c = (models[k]["eval_loss"] for k in "abc")
    merged_worse = _is_worse(loss_b, loss_a)
    rounding_worse = _is_worse(loss_b, loss_c)
    rounding = _compare(b, c)
    return {
        "source": str(src.path),
        "adapter_dir": str(src.adapter_dir),
        "base_model": src.model_cfg.name_or_path,
        "revision": src.model_cfg.revision,
        "dtype": dtype,
        "eval_samples": {"source": where, "n_samples": len(samples),
                         "n_answer_tokens": sum(len(r[1]) for r in a)},
        "compared_on": "logits at the positions that predict assistant tokens (the eval-loss positions); "
                       "logit differences are against (a), the model as trained",
        "models": models,
        "merge_rounding_b_vs_c": {"max_abs_logit_diff": rounding["max_abs_logit_diff"],
                                  "mean_abs_logit_diff": rounding["mean_abs_logit_diff"]},
        "tolerance": {"eval_loss_rel": LOSS_TOLERANCE_REL, "eval_loss_abs": LOSS_TOLERANCE_ABS,
                      "rule": "flag when loss(b) - loss(a) > max(rel * loss(a), abs)"},
        "merged_worse_than_trained": merged_worse,
        "merge_rounding_hurt": rounding_worse,
        "explanation": _explain(merged_worse, rounding_worse, loss_a, loss_b, loss_c, dtype),
    }


def _explain(merged_worse: bool, rounding_worse: bool, loss_a: float, loss_b: float, loss_c: float,
             dtype: str) -> str:
    if not merged_worse:
        return (f"OK: the merged model's eval loss ({loss_b:.4f}) is within tolerance of the adapter on the "
                f"4-bit base as trained ({loss_a:.4f}).")
    cause = (f"The merge rounding into {dtype} itself cost quality ((b) {loss_b:.4f} vs (c) {loss_c:.4f}); "
             + ("try --dtype float16, which keeps 3 more mantissa bits. " if dtype == "bfloat16" else "")
             if rounding_worse else
             f"The merge itself is faithful ((b) matches (c) {loss_c:.4f}): the gap is the base. ")
    return (f"MERGED MODEL IS WORSE than the adapter on the 4-bit base as trained: eval loss {loss_b:.4f} vs "
            f"{loss_a:.4f}. The adapter was trained against the NF4-quantized base and learned around its "
            "quantization error; merged into the original 16-bit weights it meets a slightly different model. "
            + cause + "Options: serve the adapter on the 4-bit base (`qlora-phi3 chat ADAPTER_DIR`), or check "
            "the merged model on your own task before shipping it.")
