"""Data parallel through an existing launcher (torchrun / accelerate), on the CPU with 2 gloo processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cpu_dtype

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# No dropout, no warmup, no clipping: every difference left would be a difference in the gradients.
# Packed rows (the default). Two steps of 16 rows stay inside the first epoch (160 conversations pack into ~50
# rows): at an epoch's ragged end accelerate fills each rank's last batch by repeating rows (even_batches), so
# a run that crosses it differs from one process, packed or not.
COMMON = ["data.max_samples=160", "train.eval_steps=0", "train.save_steps=0", "train.max_steps=2", "lora.dropout=0",
          "train.warmup_ratio=0", "train.max_grad_norm=1e9", "train.loss_chunk_tokens=0", "train.sample_prompts=0"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_two_process_ddp_equals_single_process_with_same_effective_batch(tmp_path, qlora, monkeypatch):
    # The single process is this one (one thread, as each DDP rank: OMP_NUM_THREADS=1 in _env).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = qlora("train", f"train.output_dir={tmp_path / 'single'}", *COMMON, "train.micro_batch_size=8",
                       "train.grad_accum=2")
    finally:
        torch.set_num_threads(threads)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "qlora_phi3", "train",
                          f"train.output_dir={tmp_path / 'ddp'}", *COMMON, "train.micro_batch_size=8",
                          "train.grad_accum=1"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    # Only rank 0 prints and writes.
    assert ddp.stdout.count("evaluating the untrained adapter (step 0)") == 1
    assert "effective batch = 8 (micro) x 1 (accum) x 2 (processes) = 16" in ddp.stdout
    adapters = list((tmp_path / "ddp").rglob("adapter_model.safetensors"))
    assert adapters == [tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["effective_batch"] == 16 and run["status"] == "completed"
    a = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    b = load_file(adapters[0])
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 1e-3 for v in a.values())  # it trained
    for k in a:
        # Same samples per step and averaged gradients: equal up to the order of floating-point sums.
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


def test_fsdp_recipe_stores_4bit_weights_in_the_compute_dtype():
    from qlora_phi3.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "phi3_mini_4k_fsdp.yaml")
    assert recipe.model.quant_storage == recipe.model.compute_dtype == "bfloat16"


def test_fsdp_launch_with_uint8_storage_is_refused_before_loading(tmp_path, monkeypatch):
    import pytest

    from qlora_phi3.config import load_recipe
    from qlora_phi3.errors import UserError
    from qlora_phi3.run.train import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(UserError, match=f"model.quant_storage={cpu_dtype()}"):  # the compute dtype: fp32 without
        train(recipe)  # native bf16
