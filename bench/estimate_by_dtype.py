"""The estimator against measured CPU peaks in each compute dtype: bf16 (where training computes on a GPU or a CPU
with native bf16) and fp32 (a CPU without it), side by side on one machine.

    python bench/estimate_by_dtype.py                  # both dtypes, ~5 minutes on 2 idle cores
    python bench/estimate_by_dtype.py --dtypes float32

Each row is real training steps through ``qlora-phi3 profile``'s own path (one warm-up, one measured step, live
CPU tensors) on the tiny Phi-3 and a mini Phi-3 (the real 32,064-entry vocabulary and head dim 96, two narrow
layers, random weights), over the settings that change the estimate's terms: checkpointing, the plain and chunked
loss, eager attention, DoRA, sequence tiling, DPO, KTO and ORPO. Memory, not speed: emulated bf16 on a CPU without
native bf16 is slow but measures the same bytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def configs(dtype: str, mini: Path) -> list:
    from qlora_phi3.config import recipes_dir
    from qlora_phi3.run.profile import grid_recipes

    sft, dpo = str(recipes_dir() / "tiny_cpu.yaml"), str(recipes_dir() / "tiny_cpu_dpo.yaml")
    on_mini = [f"model.name_or_path={mini}", "lora.dropout=0.05", "train.micro_batch_size=1"]
    dt = [f"model.compute_dtype={dtype}"]
    tiny = dt + ["data.max_seq_len=128", "train.micro_batch_size=4"]
    return (grid_recipes(sft, tiny, ["train.gradient_checkpointing=true,false"])
            + grid_recipes(sft, dt + on_mini, ["data.max_seq_len=384", "train.loss_chunk_tokens=0,256"])
            + grid_recipes(sft, dt + on_mini + ["model.attn_implementation=eager"], ["data.max_seq_len=1024"])
            + grid_recipes(sft, tiny + ["train.gradient_checkpointing=false"], ["lora.use_dora=true,false"])
            + grid_recipes(sft, dt + ["data.max_seq_len=512", "train.micro_batch_size=1", "train.tile_tokens=128"],
                           ["train.gradient_checkpointing=true,false"])
            + grid_recipes(dpo, tiny, ["train.gradient_checkpointing=true,false"])
            + grid_recipes(dpo, dt + on_mini + ["data.max_seq_len=384"], ["train.loss_chunk_tokens=0,256"])
            + grid_recipes(dpo, dt + [f"model.name_or_path={mini}", "train.micro_batch_size=2", "data.max_seq_len=256"],
                           ["train.method=kto,orpo"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated compute dtypes")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from qlora_phi3.model.tiny import write_random_phi3
    from qlora_phi3.run.profile import profile
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    with tempfile.TemporaryDirectory() as tmp:
        mini = write_random_phi3(Path(tmp) / "mini-phi3", hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, vocab_size=32064,
                                 max_position_embeddings=4096)
        worst = {}
        for dtype in args.dtypes.split(","):
            rows, _ = profile(configs(dtype, mini), steps=1, warmup=1)
            print(f"\n{dtype}: measured peak / estimate (GiB), error")
            for r in rows:
                if r.status != "ok":
                    print(f"  {r.status:<8} {r.overrides}")
                    continue
                print(f"  {r.peak_allocated_gib:.4f} / {r.estimated_gib:.4f}  {r.estimate_error_pct:+5.1f}%  "
                      f"{r.overrides}")
            worst[dtype] = max((abs(r.estimate_error_pct) for r in rows if r.status == "ok"), default=float("nan"))
        print("\nlargest error: " + ", ".join(f"{d} {w:.1f}%" for d, w in worst.items()))
    return 0


if __name__ == "__main__":  # the profiler's CPU workers come from a forkserver, which re-imports this module
    raise SystemExit(main())
