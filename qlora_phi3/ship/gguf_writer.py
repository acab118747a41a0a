"""The GGUF writer: a 16-bit Phi-3 (or Phi-4-mini) directory as one GGUF of type f16, bf16 or q8_0, written with the
``gguf`` package alone (no compiler, no network), and K-quants made from a 16-bit GGUF by llama.cpp's own quantizer
(``llama_model_quantize`` in llama-cpp-python, the ``[gguf]`` extra).

Why a writer of our own instead of llama.cpp's ``convert_hf_to_gguf.py``: the converter is not part of any
installable package (it lives in the llama.cpp source tree, which we cannot fetch offline), it needs the
SentencePiece ``tokenizer.model`` that transformers does not save, and it names the model after its directory,
while llama.cpp applies Phi-3's whitespace rules after special tokens only when ``general.name`` says Phi-3
(llama-vocab.cpp). The ``gguf`` package provides the format: the writer, the PHI3 tensor names and keys and the
numpy quantizers; this module only decides what goes in, following the converter's Phi-3 class.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from qlora_phi3.errors import UserError
from qlora_phi3.family import family_for_config
from qlora_phi3.ship.export_checks import QUANTS, read_json
from qlora_phi3.ship.merge import phi3_model_name
from qlora_phi3.ui import console

__all__ = ["gguf_types", "phi3_tensor_names", "target_type", "tensor_name", "vocab_keys", "write_all", "write_gguf"]

_LLAMA_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                 "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def _vocab(model_dir: Path, n_vocab: int):
    """Tokens, scores and token types for llama.cpp's SentencePiece ('llama') tokenizer, from tokenizer.json.

    tokenizer.json keeps SentencePiece's pieces in id order but not their scores; llama.cpp merges the
    adjacent pair whose merged piece scores highest, and the BPE merge list is SentencePiece's pieces sorted
    by score (transformers builds it that way), so minus the rank of the first merge that makes a piece
    reproduces the order llama.cpp needs. Types and the special-token scores follow convert_hf_to_gguf.py's
    Phi-3 vocabulary (control for special added tokens, user-defined for the others, unused [PADn] fillers
    up to the embedding size)."""
    import gguf

    tj = read_json(model_dir / "tokenizer.json")
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

    tj = read_json(model_dir / "tokenizer.json")
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
    .weight")`` is ``blk.0.attn_qkv.weight``); shared with the GGUF LoRA writer (ship/adapter_export.py), whose
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


def write_gguf(model_dir: str | Path, dest: str | Path, quant: str, name: str, vocab=None) -> dict:
    """Write the 16-bit Phi-3 model in ``model_dir`` as one GGUF of type ``quant`` (f16, bf16 or q8_0).

    Streams one tensor at a time (the header and tensor table go first), so peak memory is the largest
    tensor in float32, not the model. ``vocab``: the model's :func:`vocab_keys`, when the caller writes several
    files of it (else read here). Returns {tensor type: count}.
    """
    import gguf

    model_dir, dest = Path(model_dir), Path(dest)
    config = _config(model_dir)
    family = family_for_config(config)
    w = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    try:
        extra = _add_model_keys(w, model_dir, config, quant, phi3_model_name(name, family))
        (vocab or vocab_keys(model_dir, config))(w)
        return _write_tensors(w, model_dir, config, quant, extra)
    finally:
        w.close()


def _add_model_keys(w, model_dir: Path, config, quant: str, general_name: str) -> list:
    """The model's shape, rope and file-type keys; returns the extra tensors they need ((gguf name, float32
    array): 128k models' rope factors)."""
    import gguf
    import numpy as np

    _, ftype = gguf_types(quant)
    rope, rope_dims, orig_ctx = _rope(config)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(general_name)
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

    extra = []
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
    return extra


def vocab_keys(model_dir: Path, config=None):
    """The tokenizer's keys, read once from ``model_dir`` (its config: ``config``, else read here), as a function
    that adds them to a GGUF writer: vocabulary, special tokens (the family's end of turn: ``<|end|>``, Phi-4's
    ``<|im_end|>``) and the chat template. One export writes them into each of its files (on Phi-4-mini's 200,064
    tokens and 446,000 merges reading them takes seconds)."""
    import gguf

    from qlora_phi3.model.load import auto_tokenizer

    config = config or _config(model_dir)
    n_vocab, family = config.vocab_size, family_for_config(config)
    if family.tokenizer_kind == "byte_bpe":
        # As convert_hf_to_gguf.py for Phi-4-mini / Phi-4: the 'gpt2' tokenizer with the o200k split ('gpt-4o') or
        # cl100k's ('dbrx'), which llama.cpp's converter detects from the ids of its probe text; merges from
        # tokenizer.json.
        tokens, types = _byte_bpe_vocab(model_dir, n_vocab)
        scores = None
        kind, pre = "gpt2", family.llama_cpp_pre
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    else:
        tokens, scores, types = _vocab(model_dir, n_vocab)
        kind, pre = "llama", "default"
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

    def add(w) -> None:
        w.add_tokenizer_model(kind)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        if scores is not None:
            w.add_token_scores(scores)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)

    return add


def _write_tensors(w, model_dir: Path, config, quant: str, extra: list) -> dict[str, int]:
    """The tensor table, then each tensor converted as it is read; returns {tensor type: count}."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    Q = gguf.GGMLQuantizationType
    qtype, _ = gguf_types(quant)
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


# GGUF key-value types by their number in the file: the byte size of each fixed-size one (8 is a string, 9 an array).
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _tensor_types(path: Path) -> dict[str, int]:
    """{tensor type: count} from the file's tensor table. The key-value section before it is stepped over, not read:
    gguf's GGUFReader builds every key's value first, 15-35 s on Phi-4-mini's 200,064 tokens and 446,000 merges."""
    import mmap
    import struct

    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise UserError(f"{path}: not a GGUF file.")
        order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # a big-endian file's version reads 0
        u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")
        n_tensors, n_kv = struct.unpack_from(order + "QQ", buf, 8)
        pos = 24

        def skip_value(kind: int, pos: int) -> int:
            if kind == 8:
                return pos + 8 + u64.unpack_from(buf, pos)[0]
            if kind == 9:
                item, count = u32.unpack_from(buf, pos)[0], u64.unpack_from(buf, pos + 4)[0]
                pos += 12
                if item in _GGUF_SCALAR_BYTES:
                    return pos + count * _GGUF_SCALAR_BYTES[item]
                for _ in range(count):
                    pos = skip_value(item, pos)
                return pos
            return pos + _GGUF_SCALAR_BYTES[kind]

        for _ in range(n_kv):
            pos = skip_value(8, pos)  # the key
            pos = skip_value(u32.unpack_from(buf, pos)[0], pos + 4)
        counts: dict[str, int] = {}
        for _ in range(n_tensors):
            pos = skip_value(8, pos)  # the name
            n_dims = u32.unpack_from(buf, pos)[0]
            pos += 4 + 8 * n_dims
            name = gguf.GGMLQuantizationType(u32.unpack_from(buf, pos)[0]).name
            counts[name] = counts.get(name, 0) + 1
            pos += 12  # the type and the data offset
    return counts



def write_all(llama_cpp, model_dir: Path, stage: Path, stem: str, names: list[str], config: dict,
               general_name: str | None = None):
    """``<stem>-<quant>.gguf`` in ``stage`` for each of ``names``, named ``general_name`` inside (default:
    ``stem``, made to say Phi-3); returns ({quant: path}, {quant: report row})."""
    general_name = general_name or stem
    files, rows = {}, {}
    sixteen = "bf16" if config.get("torch_dtype", config.get("dtype")) == "bfloat16" else "f16"
    intermediate = vocab = None

    def write(dest: Path, quant: str) -> dict:
        nonlocal vocab
        vocab = vocab or vocab_keys(model_dir)  # read once for all the files
        return write_gguf(model_dir, dest, quant, general_name, vocab)

    for q in sorted(names, key=lambda q: QUANTS[q].by != "gguf"):  # 16-bit files first: K-quants start from one
        dest = stage / f"{stem}-{q}.gguf"
        t = time.perf_counter()
        with console().status(f"writing {dest.name}..."):
            if QUANTS[q].by == "gguf":
                types = write(dest, q)
            else:
                if intermediate is None:
                    intermediate = files.get(sixteen) or stage / f".{stem}-{sixteen}.gguf"
                    if not intermediate.exists():
                        write(intermediate, sixteen)
                _llama_quantize(llama_cpp, intermediate, dest, q)
                types = _tensor_types(dest)  # llama.cpp picks per tensor (and falls back where rows do not fit)
        files[q] = dest
        rows[q] = {"file": dest.name, "bytes": dest.stat().st_size, "seconds": round(time.perf_counter() - t, 2),
                   "tensor_types": types, "written_by": QUANTS[q].by}
    if intermediate is not None and intermediate.name.startswith("."):
        intermediate.unlink(missing_ok=True)
    return {q: files[q] for q in names}, {q: rows[q] for q in names}

