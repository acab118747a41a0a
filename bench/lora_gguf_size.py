"""Size of ``qlora-phi3 export --adapter``'s GGUF LoRA at Phi-3-mini's shapes, offline, without any weights.

    python bench/lora_gguf_size.py              # r=16 on qkv_proj, o_proj, gate_up_proj, down_proj
    python bench/lora_gguf_size.py --r 64

Writes a PEFT adapter shaped like a qlora-phi3 run on microsoft/Phi-3-mini-4k-instruct (zeros, fp32 as PEFT saves
it) into a temporary directory and converts it with the exporter's own writer. A GGUF's size depends only on
shapes and types, so the bytes are exact for a real adapter of that rank. Prints a markdown table beside the
merged files' sizes (bench/results/gguf_phi3_mini.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Phi-3-mini-4k: hidden 3072, MLP 8192, 32 layers; (in, out) of each fused target.
HIDDEN, MLP, LAYERS = 3072, 8192, 32
TARGETS = {"self_attn.qkv_proj": (HIDDEN, 3 * HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_up_proj": (HIDDEN, 2 * MLP), "mlp.down_proj": (MLP, HIDDEN)}
# bench/results/gguf_phi3_mini.md (exact for the real model: sizes depend on shapes only)
MERGED_BYTES = {"f16": 7_643_296_320, "q8_0": 4_061_221_440, "q4_k_m": 2_396_770_368}


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from qlora_phi3.ship.adapter_export import lora_plan, write_lora_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    r = args.r
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_rslora": False, "use_dora": False,
           "target_modules": [t.split(".")[-1] for t in TARGETS], "bias": "none"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        weights = {}
        for i in range(LAYERS):
            for target, (n_in, n_out) in TARGETS.items():
                key = f"base_model.model.model.layers.{i}.{target}"
                weights[f"{key}.lora_A.weight"] = torch.zeros(r, n_in)
                weights[f"{key}.lora_B.weight"] = torch.zeros(n_out, r)
        params = sum(t.numel() for t in weights.values())
        save_file(weights, str(adapter / "adapter_model.safetensors"))
        del weights
        plan = lora_plan(adapter, cfg, LAYERS)
        for quant in ("f16", "q8_0"):
            dest = Path(tmp) / f"lora-{quant}.gguf"
            types = write_lora_gguf(adapter, dest, quant, "phi3-mini-lora", plan)["tensor_types"]
            rows.append((f"LoRA {quant}", dest.stat().st_size, types))
    print(f"Phi-3-mini-4k, LoRA r={r} on {', '.join(t.split('.')[-1] for t in TARGETS)}: {params:,} parameters\n")
    print("| file | bytes | MB | MiB | share of merged f16 |")
    print("|---|---:|---:|---:|---:|")
    for name, size, types in rows:
        print(f"| {name} ({', '.join(f'{k} x{v}' for k, v in types.items())}) | {size:,} | {size / 1e6:.1f} | "
              f"{size / 2**20:.1f} | {size / MERGED_BYTES['f16']:.2%} |")
    for quant, size in MERGED_BYTES.items():
        print(f"| merged {quant} | {size:,} | {size / 1e6:.0f} | {size / 2**20:.0f} | {size / MERGED_BYTES['f16']:.0%} |")


if __name__ == "__main__":
    main()
