"""File sizes and time of ``qlora-phi3 export`` at Phi-3-mini's shapes, offline, without its weights.

    python bench/gguf_export.py --write                    # f16, q8_0, q4_k_m; about 10 min and 14 GB of disk
    python bench/gguf_export.py --quant q8_0 --workdir /big/disk

Builds a merged-model directory shaped exactly like microsoft/Phi-3-mini-4k-instruct (Phi3Config's defaults:
hidden 3072, 32 layers, MLP 8192, vocab 32064, fp16) whose safetensors file holds zeros as a sparse file
(no download, next to no disk), with the embedded tiny model's tokenizer, and exports it with
``check=False`` (a zero model has nothing to check). Sizes are exact for Phi-3-mini: GGUF sizes depend only
on shapes and types. Times are data-independent for f16/q8_0 (numpy casts and block scales); llama.cpp's
K-quant search does a little more work on real weights. The merge step is not included (see the README's
merge section).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT = REPO / "bench" / "results" / "gguf_phi3_mini.md"


def build_zero_phi3_mini(out_dir: Path) -> Path:
    """A Phi-3-mini-4k merged directory with all-zero fp16 weights in one sparse safetensors file."""
    from transformers import AutoTokenizer, GenerationConfig, Phi3Config

    from qlora_phi3.model.tiny import TINY_MODEL_DIR

    out_dir.mkdir(parents=True, exist_ok=True)
    config = Phi3Config(vocab_size=32064, sliding_window=2047, bos_token_id=1, eos_token_id=32000,
                        pad_token_id=32000, tie_word_embeddings=False)
    config.dtype = "float16"
    config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=[32000, 32007], pad_token_id=32000).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR)).save_pretrained(out_dir)
    h, f, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    shapes = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "model.norm.weight": [h]}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.qkv_proj.weight": [3 * h, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_up_proj.weight": [2 * f, h], p + "mlp.down_proj.weight": [h, f],
                       p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = out_dir / "model.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # sparse: zeros that take no disk
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", default="f16,q8_0,q4_k_m")
    ap.add_argument("--workdir", default="/tmp/qlora-phi3-gguf-bench")
    ap.add_argument("--write", action="store_true", help=f"save the table to {RESULT.relative_to(REPO)}")
    args = ap.parse_args()
    from qlora_phi3.ui import quiet_library_noise
    from qlora_phi3.ship.export import export

    quiet_library_noise()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    model = build_zero_phi3_mini(work / "phi3-mini-zeros")
    t0 = time.perf_counter()
    result = export(str(model), str(work / "gguf"), quants=args.quant, check=False, name="phi3-mini")
    total = time.perf_counter() - t0
    params = 3_821_079_552
    lines = [
        "# qlora-phi3 export at Phi-3-mini's shapes", "",
        f"Hardware: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU. "
        f"Command: `python bench/gguf_export.py --quant {args.quant}{' --write' if args.write else ''}`", "",
        "Phi-3-mini-4k shapes (3,821,079,552 parameters), zero fp16 weights, check off; sizes are exact for the "
        "real model, times are for this machine.", "",
        "| quant | written by | bytes | GB | GiB | bits / parameter | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
    for q, row in result.report["files"].items():
        lines.append(f"| {q} | {row['written_by']} | {row['bytes']:,} | {row['bytes'] / 1e9:.2f} | "
                     f"{row['bytes'] / 2**30:.2f} | {8 * row['bytes'] / params:.2f} | {row['seconds']:.0f} |")
    lines += ["", f"Whole export: {total:.0f} s (a K-quant starts from the f16 file when that is exported too; otherwise "
              "its seconds include writing a temporary one).", ""]
    for q, row in result.report["files"].items():
        lines.append(f"- {q} tensor types: {row['tensor_types']}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULT.write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
