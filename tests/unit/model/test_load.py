"""Model loading decisions (model/load.py): compute dtype and attention per device, with the CUDA queries
substituted so the GPU paths are checked on the CPU."""

import pytest
import torch

from qlora_phi3.errors import UserError
from qlora_phi3.model.load import pick_attention, pick_compute_dtype


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA device of a given compute capability; is_bf16_supported() says True, as torch does on a T4
    (emulated bf16), so only the capability may decide."""
    def make(capability, name="Fake GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return make


def test_pre_ampere_falls_back_to_fp16_even_though_torch_claims_bf16(gpu):
    gpu((7, 5), "Tesla T4")
    choice = pick_compute_dtype("auto", "cuda:0")
    assert choice.value == "float16" and "pre-Ampere" in choice.reason
    with pytest.raises(UserError, match="Tesla T4 has no native bf16"):
        pick_compute_dtype("bfloat16", "cuda:0")
    assert pick_compute_dtype("float16", "cuda:0").value == "float16"


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0)])
def test_ampere_and_newer_use_bf16(gpu, capability):
    gpu(capability)
    assert pick_compute_dtype("auto", "cuda:0").value == "bfloat16"


@pytest.fixture
def cpu(monkeypatch):
    """A CPU with or without a native bf16 flag, as torch's own probe reports it."""
    def make(**flags):
        caps = {"architecture": "x86_64", "avx2": True, **flags}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    return make


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "bf16"])
def test_cpu_with_native_bf16_computes_in_bf16(cpu, flag):
    cpu(**{flag: True})
    choice = pick_compute_dtype("auto", "cpu")
    assert choice.value == "bfloat16" and "native bf16" in choice.reason


def test_cpu_without_native_bf16_computes_in_fp32_and_says_why(cpu):
    cpu(avx512_f=True, avx512_bf16=False, amx_tile=False)  # an AVX-512 CPU without the BF16 extension
    choice = pick_compute_dtype("auto", "cpu")
    assert choice.value == "float32" and "emulated" in choice.reason
    asked = pick_compute_dtype("bfloat16", "cpu")  # the user's word stands, with the cost named
    assert asked.value == "bfloat16" and "10x slower" in asked.reason


def test_cpu_flags_fall_back_to_proc_cpuinfo_without_torchs_probe(monkeypatch):
    from qlora_phi3 import machine

    monkeypatch.setattr(machine, "_torch_capabilities", lambda: None)
    monkeypatch.setattr(machine, "_proc_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert pick_compute_dtype("auto", "cpu").value == "float32"
    monkeypatch.setattr(machine, "_proc_cpuinfo_flags", lambda: {"avx2", "avx512_bf16"})
    assert pick_compute_dtype("auto", "cpu").value == "bfloat16"


def test_flash_attention_only_with_flash_attn_on_ampere(gpu, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real_find_spec(name, *a))
    gpu((8, 6))
    assert pick_attention("auto", "cuda:0").value == "flash_attention_2"
    gpu((7, 5))
    assert pick_attention("auto", "cuda:0").value == "sdpa"
    with pytest.raises(UserError, match="Ampere"):
        pick_attention("flash_attention_2", "cuda:0")
    assert pick_attention("auto", "cpu").value == "sdpa"
