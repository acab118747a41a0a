"""``qlora-phi3 export``: GGUF files for llama.cpp, Ollama and LM Studio, offline, each proven by running it.

Top to bottom: check the flags, the source and ``--out`` (no weights loaded yet); merge first when given a
run or adapter directory (the existing ``merge``, with its checks and report); write f16 / bf16 / q8_0 with
the ``gguf`` package alone (no compiler, no network); make K-quants (q4_k_m, q5_k_m, q6_k) from a 16-bit
GGUF with llama.cpp's own quantizer (``llama_model_quantize`` in llama-cpp-python, the ``[gguf]`` extra);
write an Ollama ``Modelfile``; then load every file in llama.cpp and compare it with the merged 16-bit model
in transformers on held-out conversations (``--check``, on when llama-cpp-python is installed). Everything
is written into a staging directory beside ``--out`` that is renamed at the very end.

Why a writer of our own instead of llama.cpp's ``convert_hf_to_gguf.py``: the converter is not part of any
installable package (it lives in the llama.cpp source tree, which we cannot fetch offline), it needs the
SentencePiece ``tokenizer.model`` that transformers does not save, and it names the model after its directory,
while llama.cpp applies Phi-3's whitespace rules after special tokens only when ``general.name`` says Phi-3
(llama-vocab.cpp). The ``gguf`` package provides the format: the writer, the PHI3 tensor names and keys and the
numpy quantizers; this module only decides what goes in, following the converter's Phi-3 class.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlora_phi3.errors import UserError
from qlora_phi3.family import PHI3, TokenizerFamily, family_for_config, family_for_tokenizer
from qlora_phi3.files import atomic_write_json, partial_dir, publish_dir
from qlora_phi3.data.split import held_out_records
from qlora_phi3.out.merge import merge, phi3_model_name
from qlora_phi3.ui import console, warn

__all__ = ["CheckFailed", "ExportResult", "QUANTS", "export", "write_gguf", "modelfile_text"]

REPORT_NAME = "export_report.json"
MODELFILE_NAME = "Modelfile"
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
_LLAMA_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                 "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
DEFAULT_QUANTS = ("q8_0",)
DEFAULT_CHECK_SAMPLES = 8
# Ollama allocates the whole num_ctx KV cache up front; Phi-3-mini's is 384 KiB per token in f16
# (2 x 32 layers x 32 heads x 96 x 2 bytes), 48 GiB at 128k. Longer contexts are left for the user to raise.
MODELFILE_MAX_CTX = 4096


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


# --------------------------------------------------------------------------------------------- checks


def _parse_quants(quants) -> list[str]:
    names = [q.strip().lower() for q in (quants.split(",") if isinstance(quants, str) else quants)]
    names = list(dict.fromkeys(q for q in names if q))
    if not names:
        raise UserError(f"--quant is empty; choose from {', '.join(QUANTS)}.")
    unknown = [q for q in names if q not in QUANTS]
    if unknown:
        raise UserError(f"--quant {','.join(unknown)}: unknown; choose from {', '.join(QUANTS)} "
                        "(comma-separated, e.g. --quant q8_0,q4_k_m).")
    return names


def _llama_cpp():
    """The llama_cpp module, or None when the [gguf] extra is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import logging

    # Its C library logs every tensor at load; errors still come through.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e}).") from None


def check_phi3_dir(model_dir: Path) -> dict:
    """Refuse a model directory this exporter cannot write faithfully; returns its config.json."""
    config = _read_json(model_dir / "config.json")
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
    model = _read_json(model_dir / "tokenizer.json").get("model", {})
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


def _check_out(out: Path, source: Path, force: bool) -> None:
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


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-'.")
    return cleaned


# --------------------------------------------------------------------------------------------- writer


def _vocab(model_dir: Path, n_vocab: int):
    """Tokens, scores and token types for llama.cpp's SentencePiece ('llama') tokenizer, from tokenizer.json.

    tokenizer.json keeps SentencePiece's pieces in id order but not their scores; llama.cpp merges the
    adjacent pair whose merged piece scores highest, and the BPE merge list is SentencePiece's pieces sorted
    by score (transformers builds it that way), so minus the rank of the first merge that makes a piece
    reproduces the order llama.cpp needs. Types and the special-token scores follow convert_hf_to_gguf.py's
    Phi-3 vocabulary (control for special added tokens, user-defined for the others, unused [PADn] fillers
    up to the embedding size)."""
    import gguf

    tj = _read_json(model_dir / "tokenizer.json")
    model = tj["model"]
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for i, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, i)
    pieces = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if len(pieces) > n_vocab:
        raise UserError(f"{model_dir / 'tokenizer.json'}: {len(pieces)} tokens but the model's embedding has only "
                        f"{n_vocab} rows; the tokenizer does not belong to this model.")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    byte_re = re.compile(r"<0x[0-9A-F]{2}>")
    for piece, i in pieces:
        tokens[i] = piece
        if piece == model.get("unk_token"):
            scores[i], types[i] = 0.0, T.UNKNOWN
        elif byte_re.fullmatch(piece):
            scores[i], types[i] = 0.0, T.BYTE
        else:  # pieces no merge makes (single characters) are never a merge result: any score below all merges
            scores[i], types[i] = -float(rank.get(piece, len(merges) + i)), T.NORMAL
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if i >= n_vocab:
            raise UserError(f"{model_dir / 'tokenizer.json'}: added token {added['content']!r} has id {i}, beyond "
                            f"the model's {n_vocab} embedding rows.")
        tokens[i], scores[i] = added["content"], -1000.0
        types[i] = T.CONTROL if added.get("special") else T.USER_DEFINED
    return tokens, scores, types


def _byte_bpe_vocab(model_dir: Path, n_vocab: int):
    """Tokens and types for llama.cpp's byte-level BPE ('gpt2') tokenizer, as convert_hf_to_gguf.py's
    ``_set_vocab_gpt2`` writes them: the vocabulary in id order, added tokens as control or user-defined,
    and ``[PADn]`` (unused) for embedding rows no token maps to (o200k's gaps, and the rows past 200028)."""
    import gguf

    tj = _read_json(model_dir / "tokenizer.json")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [T.UNUSED] * n_vocab
    for piece, i in tj["model"]["vocab"].items():
        if i >= n_vocab:
            raise UserError(f"{model_dir / 'tokenizer.json'}: token {piece!r} has id {i}, beyond the model's "
                            f"{n_vocab} embedding rows; the tokenizer does not belong to this model.")
        tokens[i], types[i] = piece, T.NORMAL
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if i >= n_vocab:
            raise UserError(f"{model_dir / 'tokenizer.json'}: added token {added['content']!r} has id {i}, beyond "
                            f"the model's {n_vocab} embedding rows.")
        tokens[i] = added["content"]
        # The converter's rule (does_token_look_special): '<|...|>' is control even when not marked special, as
        # Phi-4-mini's tool markup; llama.cpp then never prints it as text.
        looks_special = added["content"].startswith("<|") and added["content"].endswith("|>")
        types[i] = T.CONTROL if added.get("special") or looks_special else T.USER_DEFINED
    return tokens, types


def _config(model_dir: Path):
    from transformers import AutoConfig

    try:  # AutoConfig reads every Phi-3 config revision (rope_scaling 'su' -> 'longrope') into one shape
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir / 'config.json'}: cannot read it ({str(e).splitlines()[0]}).") from None


def _rope(config) -> tuple[dict, int, int]:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size) // config.num_attention_heads
    orig_ctx = getattr(config, "original_max_position_embeddings", None) or rope.get(
        "original_max_position_embeddings") or config.max_position_embeddings
    return rope, rope_dims, orig_ctx


def phi3_tensor_names(n_layers: int):
    """Hugging Face Phi-3 tensor name -> llama.cpp's (``tensor_name(names, "model.layers.0.self_attn.qkv_proj
    .weight")`` is ``blk.0.attn_qkv.weight``); shared with the GGUF LoRA writer (out/adapter_export.py), whose
    tensors are named after the base tensor they change."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, n_layers)


def tensor_name(names, hf_name: str) -> str | None:
    """llama.cpp's name for ``hf_name`` (a weight or bias), None where its Phi-3 graph has no place for it."""
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _tensor_plan(model_dir: Path, n_layers: int):
    """(gguf name, hf name, shard file, shape) for every weight, in file order; refuses unknown tensors."""
    from safetensors import safe_open

    tmap = phi3_tensor_names(n_layers)
    plan = []
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{model_dir}: no *.safetensors weights.")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(".rotary_emb.inv_freq"):
                    continue  # recomputed by llama.cpp from the rope keys
                name = tensor_name(tmap, hf_name)
                if name is None:
                    raise UserError(f"{shard}: tensor {hf_name!r} has no place in llama.cpp's Phi-3 graph; this is "
                                    "not a plain Phi3ForCausalLM checkpoint (LoRA weights not merged?).")
                plan.append((name, hf_name, shard, tuple(f.get_slice(hf_name).get_shape())))
    return plan


def target_type(qtype, gguf_name: str, shape: tuple):
    """The converter's rule: 1-D tensors and norms stay F32; a matrix whose rows do not split into blocks
    falls back to F16."""
    import gguf

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def gguf_types(quant: str):
    """(tensor type, file type) of a type the gguf package writes: f16, bf16 or q8_0."""
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}[quant]


def write_gguf(model_dir: str | Path, dest: str | Path, quant: str, name: str) -> dict:
    """Write the 16-bit Phi-3 model in ``model_dir`` as one GGUF of type ``quant`` (f16, bf16 or q8_0).

    Streams one tensor at a time (the header and tensor table go first), so peak memory is the largest
    tensor in float32, not the model. Returns {tensor type: count}.
    """
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    model_dir, dest = Path(model_dir), Path(dest)
    config = _config(model_dir)
    Q = gguf.GGMLQuantizationType
    qtype, ftype = gguf_types(quant)
    n_vocab = config.vocab_size
    rope, rope_dims, orig_ctx = _rope(config)

    family = family_for_config(config)
    w = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(phi3_model_name(name, family))
    w.add_context_length(config.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(orig_ctx)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_file_type(ftype)
    # 0 = no sliding window: llama.cpp reads a non-zero value as Phi-3's (4k-mini's 2047) attention window.
    w.add_sliding_window(config.sliding_window or 0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    extra = []  # (gguf name, float32 array): 128k models' rope factors
    if rope.get("long_factor"):
        long_f, short_f = rope["long_factor"], rope.get("short_factor")
        if not short_f or len(long_f) != len(short_f) or len(long_f) != rope_dims // 2:
            raise UserError(f"{model_dir / 'config.json'}: rope long_factor/short_factor must both have "
                            f"{rope_dims // 2} entries (rotary dims / 2).")
        scale = config.max_position_embeddings / orig_ctx
        # HF's longrope attention scaling: sqrt(1 + ln(scale) / ln(original context)) unless configured.
        attn_factor = rope.get("attention_factor") or (
            (1 + np.log(scale) / np.log(orig_ctx)) ** 0.5 if scale > 1.0 else 1.0)
        w.add_rope_scaling_attn_factors(float(attn_factor))
        for key, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long_f), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short_f)):
            extra.append((gguf.TENSOR_NAMES[key] + ".weight", np.asarray(factors, dtype=np.float32)))

    from qlora_phi3.model.load import auto_tokenizer

    if family.tokenizer_kind == "byte_bpe":
        # As convert_hf_to_gguf.py for Phi-4-mini / Phi-4: the 'gpt2' tokenizer with the o200k split ('gpt-4o') or
        # cl100k's ('dbrx'), which llama.cpp's converter detects from the ids of its probe text; merges from
        # tokenizer.json.
        tokens, types = _byte_bpe_vocab(model_dir, n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(family.llama_cpp_pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    else:
        tokens, scores, types = _vocab(model_dir, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, n_vocab=n_vocab)  # bos/eos/unk/pad ids and the chat template
    tokenizer = auto_tokenizer(str(model_dir))
    end_id = tokenizer.convert_tokens_to_ids(family.end_token)
    eot_id = tokenizer.convert_tokens_to_ids(family.eos_token)
    # A missing token reads as unk's id; Phi-4-mini's unk *is* <|endoftext|>, so compare the text too.
    missing = lambda i, text: i is None or (i == tokenizer.unk_token_id and tokenizer.unk_token != text)  # noqa: E731
    if missing(end_id, family.end_token) or missing(eot_id, family.eos_token):
        raise UserError(f"{model_dir}: the tokenizer has no {family.end_token} / {family.eos_token} token; not a "
                        "Phi chat model.")
    special.special_token_ids["eos"] = eot_id  # the family's eos, as its config.json (Phi-4: <|im_end|>)
    special.special_token_ids["eot"] = end_id  # <|end|> (Phi-4: <|im_end|>) closes every turn: llama.cpp stops on it
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    # Training (data/encode.py) and our chat tokenize the chat template's text without adding special tokens;
    # llama.cpp front ends tokenize the rendered prompt with add_special=true, so add_bos must be off or every
    # prompt would start with a <s> the model never saw (a template that writes <s> itself still gets it).
    special.add_special_token["bos"] = False
    special.add_special_token["eos"] = False
    special.add_to_gguf(w, quiet=True)

    plan = _tensor_plan(model_dir, config.num_hidden_layers)
    types_used: dict[str, int] = {}
    kinds = []
    for name, _, _, shape in plan:
        kind = target_type(qtype, name, shape)
        kinds.append(kind)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, kind))) if kind not in (Q.F32, Q.F16) \
            else int(np.prod(shape)) * (4 if kind == Q.F32 else 2)
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
        types_used[kind.name] = types_used.get(kind.name, 0) + 1
    for name, arr in extra:
        w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=Q.F32)
        types_used["F32"] = types_used.get("F32", 0) + 1

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    handles = {}
    try:
        for (name, hf_name, shard, _), kind in zip(plan, kinds):
            if shard not in handles:
                handles[shard] = safe_open(str(shard), framework="pt")  # torch: numpy cannot read bf16
            data = handles[shard].get_tensor(hf_name).to(torch.float32).numpy()
            w.write_tensor_data(gguf.quants.quantize(data, kind))
        for _, arr in extra:
            w.write_tensor_data(arr)
    finally:
        handles.clear()
        w.close()
    return types_used


@contextlib.contextmanager
def _c_stderr_to(path: Path):
    """llama.cpp's quantizer writes a line per tensor straight to file descriptor 2, past Python's logging:
    send it to a file (its tail goes into the error if quantizing fails)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _llama_quantize(llama_cpp, src: Path, dest: Path, quant: str) -> None:
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    log = dest.with_name(f".{dest.name}.log")
    with _c_stderr_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    log.unlink()
    if rc != 0 or not dest.is_file():
        raise UserError(f"llama.cpp could not quantize {src.name} to {quant} (llama_model_quantize returned {rc}): "
                        + " | ".join(tail))


def _tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------- Modelfile

# Phi-3's chat template (tokenizer_config.json) in Ollama's Go template language: '<|role|>\n' + content +
# '<|end|>\n' per message, then '<|assistant|>\n' when the last message is not the assistant's.
OLLAMA_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|{{ .Role }}|>\n"
    "{{ .Content }}<|end|>\n"
    "{{ if $last }}{{ if ne .Role \"assistant\" }}<|assistant|>\n"
    "{{ end }}{{ end }}\n"
    "{{- end }}"
)


# Phi-4-mini's: the same turns without the newlines ('<|role|>' + content + '<|end|>').
OLLAMA_TEMPLATE_NO_NEWLINE = (OLLAMA_TEMPLATE.replace("|>\n{{ .Content }}<|end|>\n", "|>{{ .Content }}<|end|>")
                              .replace("<|assistant|>\n{{ end }}", "<|assistant|>{{ end }}"))


def ollama_template(family: TokenizerFamily) -> str:
    """The family's chat template in Ollama's language: Phi-3's, Phi-4-mini's without the newlines, Phi-4's with its
    '<|im_start|>ROLE<|im_sep|>' header and '<|im_end|>'."""
    template = OLLAMA_TEMPLATE if family.role_newline else OLLAMA_TEMPLATE_NO_NEWLINE
    return (template.replace("<|{{ .Role }}|>", family.role_header.format(role="{{ .Role }}"))
            .replace("<|assistant|>", family.role_header.format(role="assistant"))
            .replace("<|end|>", family.end_token))


def modelfile_text(gguf_name: str, context_length: int, adapter: str | None = None, from_note: str = "",
                   family: TokenizerFamily = PHI3) -> str:
    """An Ollama Modelfile: ``FROM ./gguf_name``, then ``ADAPTER ./adapter`` (a GGUF LoRA) when given, with
    ``from_note`` (comment lines) above FROM; the family's chat template (:func:`ollama_template`), its stops and a
    context length."""
    num_ctx = min(context_length, MODELFILE_MAX_CTX)
    note = "" if num_ctx == context_length else (
        f"# The model supports {context_length} tokens; Ollama allocates the KV cache for all of num_ctx up front,\n"
        "# so raise it only as far as your memory allows.\n")
    return (f"# Ollama: ollama create NAME -f Modelfile   (written by qlora-phi3 export)\n"
            f"{from_note}FROM ./{gguf_name}\n"
            + (f"ADAPTER ./{adapter}\n" if adapter else "")
            + f'TEMPLATE """{ollama_template(family)}"""\n'
            + "".join(f'PARAMETER stop "{t}"\n' for t in family.stop_tokens)
            + f"{note}PARAMETER num_ctx {num_ctx}\n")


# --------------------------------------------------------------------------------------------- the check


@dataclass
class _Conversation:
    text: str  # the chat-formatted conversation, as training rendered it
    ids: list[int]  # what training fed the model for it
    answer_pos: list[int]  # positions whose next token is part of an assistant reply (the eval-loss positions)
    ref_top1: list[int] = field(default_factory=list)  # the merged 16-bit model's argmax there
    ref_logits: object = None  # its float32 logits there (answer positions x vocabulary), for max |logit diff|
    prompt: str = ""  # everything before the last assistant reply, with the generation prompt
    reply_tokens: int = 0


def _conversations(records, tokenizer) -> list[_Conversation]:
    from qlora_phi3.data.encode import encode_conversation
    from qlora_phi3.phi3 import IGNORE_INDEX

    out = []
    for rec in records:
        msgs = rec.messages
        replies = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not replies:
            continue
        last = replies[-1]
        ids, labels = encode_conversation(tokenizer, msgs[: last + 1])
        text = tokenizer.apply_chat_template(msgs[: last + 1], tokenize=False)
        answer = [p for p in range(len(ids) - 1) if labels[p + 1] != IGNORE_INDEX]
        prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        reply = len(tokenizer(msgs[last]["content"], add_special_tokens=False)["input_ids"])
        out.append(_Conversation(text, ids, answer, prompt=prompt, reply_tokens=reply))
    return out


def _reference(model_dir: Path, convs: list[_Conversation], adapter_dir: Path | None = None) -> str:
    """Fill in the merged model's top-1 next tokens and logits (or, with ``adapter_dir``, those of the 16-bit
    model in ``model_dir`` with that adapter applied by PEFT, unmerged); returns how they were computed."""
    import torch
    from transformers import AutoModelForCausalLM

    # float32 on the CPU: the exact function of the 16-bit weights (CPU half-precision matmuls round
    # differently from one build to the next); on a GPU, the weights' own dtype.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map={"": device},
                                                 attn_implementation="sdpa", use_safetensors=True).eval()
    if adapter_dir is not None:
        from qlora_phi3.out.artifacts import load_adapter

        model = load_adapter(model, adapter_dir)
    with torch.no_grad():
        for c in convs:
            logits = model(input_ids=torch.tensor([c.ids], device=device)).logits[0, c.answer_pos].float()
            c.ref_top1 = logits.argmax(-1).tolist()
            c.ref_logits = logits.cpu().numpy()
    how = f"transformers, {model.dtype} on {device}" + (" (PEFT adapter, unmerged)" if adapter_dir else "")
    del model
    gc.collect()
    return how


# A near-tie: llama.cpp's top-1 is a token the merged model scores within this many logits of its own top-1 (a lead
# under half a logit: at most 1.65x as likely). Rounding swaps such pairs without the file computing anything else
# (on the tiny models, f16 moves logits by up to 0.012 and q8_0 by up to 0.63; every swap measured was at a lead
# under 0.12: docs/models.md). A model trained a few steps has many (about 5% of its answer positions lead by under
# 0.05), a trained one few. Counted beside plain top-1, which the pass mark keeps, so that a failed top-1 says
# whether its disagreements are near-ties; max |logit diff| is the number that shows a file computes the same model.
NEAR_TIE_LOGITS = 0.5


def _check_gguf(llama_cpp, path: Path, convs: list[_Conversation], tokenizer, top1_min: float,
                lora_path: Path | None = None, generate: bool = True) -> dict:
    """Run ``path`` (with the GGUF LoRA ``lora_path`` applied, scale 1) in llama.cpp on ``convs``: token ids,
    top-1 and max |logit diff| against the reference, and (``generate``) whether greedy generation stops at
    <|end|>."""
    import numpy as np

    family = family_for_tokenizer(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(family.end_token)
    longest = max(max(len(c.ids) for c in convs), max(len(tokenizer(c.prompt, add_special_tokens=False)["input_ids"])
                                                      + 2 * c.reply_tokens + 16 for c in convs))
    n_ctx = min(max(longest + 8, 64), 1 << 15)
    # Threads: llama-cpp-python's default (half the logical CPUs, about the physical cores). More threads
    # than cores make ggml's spinning thread sync cost 250 ms per token on a busy 2-core machine (measured).
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          verbose=False, seed=0, lora_path=str(lora_path) if lora_path else None)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    try:
        ids_equal, mismatch = 0, None
        agree = total = near_ties = 0
        max_diff = 0.0
        stopped, first_stop = 0, []
        for c in convs:
            got = llm.tokenize(c.text.encode("utf-8"), add_bos=True, special=True)
            if got == c.ids:
                ids_equal += 1
            elif mismatch is None:
                at = next((i for i, (a, b) in enumerate(zip(got, c.ids)) if a != b), min(len(got), len(c.ids)))
                mismatch = {"position": at, "transformers": c.ids[max(0, at - 2): at + 3],
                            "llama_cpp": got[max(0, at - 2): at + 3]}
            # Logits for the ids training used, so top-1 is measured even where tokenization differs.
            llm.reset()
            llm.eval(c.ids)
            logits = np.asarray(llm.scores[: len(c.ids)])[c.answer_pos]
            top1 = logits.argmax(-1)
            agree += int((top1 == np.asarray(c.ref_top1)).sum())
            total += len(c.answer_pos)
            if c.ref_logits is not None and len(c.answer_pos):
                max_diff = max(max_diff, float(np.abs(logits - c.ref_logits).max()))
                rows, ref_top1 = np.arange(len(top1)), np.asarray(c.ref_top1)
                lead = c.ref_logits[rows, ref_top1] - c.ref_logits[rows, top1]  # the merged model's preference
                near_ties += int(((top1 != ref_top1) & (lead < NEAR_TIE_LOGITS)).sum())
            if not generate:
                continue
            # Greedy generation from the chat template, as a llama.cpp front end would run it.
            prompt = llm.tokenize(c.prompt.encode("utf-8"), add_bos=True, special=True)
            llm.reset()
            llm.eval(prompt)
            stop = None
            for _ in range(2 * c.reply_tokens + 16):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    stop = tok
                    break
                llm.eval([tok])
            stopped += stop == end_id
            first_stop.append(tokenizer.convert_ids_to_tokens(stop) if stop is not None else None)
        eog = {t: bool(llama_cpp.llama_vocab_is_eog(vocab, tokenizer.convert_tokens_to_ids(t))) for t in family.stop_tokens}
    finally:
        llm.close()
    top1 = agree / max(total, 1)
    result = {
        "token_ids_equal": ids_equal, "conversations": len(convs),
        "top1_agreement": round(top1, 6), "top1_positions": total, "top1_min": top1_min,
        "near_tie_flips": near_ties, "top1_agreement_except_near_ties": round((agree + near_ties) / max(total, 1), 6),
        "max_abs_logit_diff": round(max_diff, 6),
        "stopped_at_end": stopped if generate else None, "stop_tokens": first_stop, "eog_tokens": eog,
    }
    if mismatch:
        result["first_token_mismatch"] = mismatch
    problems = []
    if ids_equal < len(convs):
        problems.append(f"token ids differ from transformers on {len(convs) - ids_equal}/{len(convs)} conversations "
                        f"(first at token {mismatch['position']}: {mismatch['transformers']} vs {mismatch['llama_cpp']})")
    if top1 < top1_min:
        problems.append(f"top-1 agreement {top1:.1%} < {top1_min:.0%} over {total} answer positions"
                        + (f" ({near_ties} of the {total - agree} disagreements are near-ties: the merged model scores "
                           f"llama.cpp's pick within {NEAR_TIE_LOGITS} logit of its own)" if near_ties else ""))
    if generate and stopped < len(convs):
        problems.append(f"greedy generation stopped at {family.end_token} on {stopped}/{len(convs)} prompts "
                        f"(stops: {first_stop})")
    if not all(eog.values()):
        problems.append(f"llama.cpp does not end generation on {[t for t, v in eog.items() if not v]}")
    result["passed"] = not problems
    result["problems"] = problems
    return result


# --------------------------------------------------------------------------------------------- export


def llama_cpp_for(flag: str, quants, check: bool | None, checked: str):
    """llama-cpp-python if installed, and whether to run the check (``None``: when it is installed); refuses, before
    any work, K-quants in ``quants`` (given with ``flag``) or a ``--check`` of ``checked`` without it."""
    llama_cpp = _llama_cpp()
    need = [q for q in quants if QUANTS[q].by == "llama.cpp"]
    if need and llama_cpp is None:
        raise UserError(f"{flag} {','.join(need)} needs llama.cpp's quantizer (llama-cpp-python), which is not "
                        f"installed: {GGUF_EXTRA}. f16, bf16 and q8_0 need nothing extra.")
    if check and llama_cpp is None:
        raise UserError(f"--check runs {checked} in llama.cpp, which needs llama-cpp-python: {GGUF_EXTRA}. "
                        "Or pass --no-check.")
    return llama_cpp, llama_cpp is not None if check is None else check


# A failed export next to a good one goes to "<out>-failed", never over it.
FAILED_SUFFIX = "-failed"


def _default_name(src) -> str:
    p = src.path.parent if src.path.name in ("adapter", "merged") else src.path
    return _safe_name(p.resolve().name)


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
    from qlora_phi3.out.artifacts import check_base, resolve_source

    t0 = time.perf_counter()
    names = _parse_quants(quants)
    if check_samples < 1:
        raise UserError(f"--check-samples {check_samples}: the check needs at least 1 conversation.")
    llama_cpp, check = llama_cpp_for("--quant", names, check, "each file")
    hide_load_progress_bars()
    src = resolve_source(path, base, revision)
    if src.kind == "merged":
        check_phi3_dir(src.path)
    else:
        base_config = check_base(src)
        if getattr(base_config, "model_type", None) != "phi3":
            raise UserError(f"{src.adapter_dir}: its base {src.model_cfg.name_or_path} is a "
                            f"{getattr(base_config, 'model_type', '?')!r} model, not Phi-3; qlora-phi3 export "
                            "writes Phi-3 models only.")
    out_dir = Path(out).expanduser()
    _check_out(out_dir, src.path, force)
    stem = _safe_name(name) if name else _default_name(src)

    stage = partial_dir(out_dir)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        if src.kind == "merged":
            model_dir, merge_report = src.path, None
        else:  # a staging subdirectory, removed before publishing: the GGUFs are the product
            model_dir = stage / "merged"
            merge_report = merge(str(src.path), str(model_dir), base=base, revision=revision,
                                 report_samples=check_samples).report
        config = check_phi3_dir(model_dir)
        files, rows = _write_all(llama_cpp, model_dir, stage, stem, names, config)
        family = family_for_config(config)
        (stage / MODELFILE_NAME).write_text(modelfile_text(files[names[0]].name, config["max_position_embeddings"],
                                                           family=family), encoding="utf-8")
        checks, reference = {}, None
        if check:
            checks, reference = _run_checks(llama_cpp, src, model_dir, files, check_samples)
        else:
            warn("not checked: llama-cpp-python is not installed, so the files were not run in llama.cpp "
                 f"({GGUF_EXTRA})." if llama_cpp is None else "not checked (--no-check).")
        if model_dir != src.path:
            shutil.rmtree(model_dir)
        for q in names:
            rows[q]["check"] = checks.get(q)
        report = {
            "source": str(src.path), "kind": src.kind, "out_dir": str(out_dir), "name": stem,
            "general_name": phi3_model_name(stem, family), "modelfile_from": files[names[0]].name,
            "files": rows, "checked": bool(check), "reference": reference,
            "merge": {"merged_worse_than_trained": merge_report["merged_worse_than_trained"],
                      "explanation": merge_report["explanation"]} if merge_report else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        atomic_write_json(stage / REPORT_NAME, report)
        failed = [q for q in names if checks.get(q) and not checks[q]["passed"]]
        kept = None
        if failed and out_dir.is_dir() and any(out_dir.iterdir()):
            # A good earlier export stays where it is: the failed one goes beside it, for inspection.
            kept, out_dir = out_dir, out_dir.with_name(out_dir.name + FAILED_SUFFIX)
            report["out_dir"] = str(out_dir)
            atomic_write_json(stage / REPORT_NAME, report)
        publish_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # never leave a half-written export behind
        raise
    result = ExportResult(out_dir, {q: out_dir / p.name for q, p in files.items()}, report)
    if failed:
        raise CheckFailed("; ".join(f"{q}: " + "; ".join(checks[q]["problems"]) for q in failed)
                          + f". The files are in {out_dir} with the numbers in {REPORT_NAME}"
                          + (f" (the earlier export in {kept} is left as it was)" if kept else "")
                          + "; if the merged model itself does not stop or answer well (`qlora-phi3 chat` on a "
                          "merged dir shows it), train longer before exporting.", result)
    return result


def _write_all(llama_cpp, model_dir: Path, stage: Path, stem: str, names: list[str], config: dict,
               general_name: str | None = None):
    """``<stem>-<quant>.gguf`` in ``stage`` for each of ``names``, named ``general_name`` inside (default:
    ``stem``, made to say Phi-3); returns ({quant: path}, {quant: report row})."""
    general_name = general_name or stem
    files, rows = {}, {}
    sixteen = "bf16" if config.get("torch_dtype", config.get("dtype")) == "bfloat16" else "f16"
    intermediate = None
    for q in sorted(names, key=lambda q: QUANTS[q].by != "gguf"):  # 16-bit files first: K-quants start from one
        dest = stage / f"{stem}-{q}.gguf"
        t = time.perf_counter()
        with console().status(f"writing {dest.name}..."):
            if QUANTS[q].by == "gguf":
                types = write_gguf(model_dir, dest, q, general_name)
            else:
                if intermediate is None:
                    intermediate = files.get(sixteen) or stage / f".{stem}-{sixteen}.gguf"
                    if not intermediate.exists():
                        write_gguf(model_dir, intermediate, sixteen, general_name)
                _llama_quantize(llama_cpp, intermediate, dest, q)
                types = _tensor_types(dest)  # llama.cpp picks per tensor (and falls back where rows do not fit)
        files[q] = dest
        rows[q] = {"file": dest.name, "bytes": dest.stat().st_size, "seconds": round(time.perf_counter() - t, 2),
                   "tensor_types": types, "written_by": QUANTS[q].by}
    if intermediate is not None and intermediate.name.startswith("."):
        intermediate.unlink(missing_ok=True)
    return {q: files[q] for q in names}, {q: rows[q] for q in names}


def _run_checks(llama_cpp, src, model_dir: Path, files: dict, n: int):
    from qlora_phi3.model.load import auto_tokenizer

    tokenizer = auto_tokenizer(str(model_dir))
    records, where = held_out_records(src.recipe, src.run, tokenizer, src.max_seq_len, n)
    convs = _conversations(records, tokenizer)
    with console().status("reference: the merged model in transformers..."):
        how = _reference(model_dir, convs)
    checks = {}
    for q, path in files.items():
        with console().status(f"running {path.name} in llama.cpp..."):
            checks[q] = _check_gguf(llama_cpp, path, convs, tokenizer, QUANTS[q].top1_min)
    return checks, {"conversations": len(convs), "source": where, "model": how,
                    "answer_positions": sum(len(c.answer_pos) for c in convs)}
