"""Upstream private APIs and undocumented behaviours that qlora-phi3 relies on, each registered in one place.

Every entry names what we lean on, where, why there is no public way, the version it was checked against,
and a check that fails when it moves. ``tests/unit/run/test_internals.py`` runs every check, so a release of
transformers, TRL, PEFT, accelerate, bitsandbytes or torch that renames or reshapes one of them fails a test
naming it, instead of training a different model in silence. :func:`check_trainer_internals` also runs
whenever a trainer is built, because atomic checkpoints would otherwise silently stop being atomic.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable

__all__ = ["CHECKED_TRANSFORMERS", "PRIVATE_TRAINER_METHODS", "UPSTREAM", "Upstream", "check_trainer_internals",
           "check_upstream"]

CHECKED_TRANSFORMERS = "5.25.0"
# method name -> its parameters (after self), as overridden in checkpoints.AtomicCheckpoints
PRIVATE_TRAINER_METHODS = {"_save_checkpoint": ("model", "trial"), "_get_output_dir": ("trial",)}


def check_trainer_internals(trainer_cls=None) -> None:
    """Raise RuntimeError naming what moved if the Trainer's private methods we override changed."""
    import transformers

    trainer_cls = trainer_cls or transformers.Trainer
    for name, params in PRIVATE_TRAINER_METHODS.items():
        method = getattr(trainer_cls, name, None)
        found = None if method is None else tuple(inspect.signature(method).parameters)[1:]
        if found != params:
            now = "gone" if method is None else "now (" + ", ".join(found) + ")"
            raise RuntimeError(
                f"transformers {transformers.__version__}: Trainer.{name} is {now}, but qlora-phi3's atomic checkpoints "
                f"override it as ({', '.join(params)}) (checked against transformers {CHECKED_TRANSFORMERS}). "
                "Install a transformers version qlora-phi3 supports (see constraints.txt) or update "
                "qlora_phi3/run/checkpoints.py.")


@dataclass(frozen=True)
class Upstream:
    """One thing we rely on that its library does not promise."""
    what: str
    used_in: str
    why: str
    checked: str  # "package version" it was checked against
    check: Callable[[], None]  # raises AssertionError/AttributeError/ImportError when it moved


def _source_digest(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


# The copied layer body in run/tiling.py mirrors these two functions; their source, hashed at the checked version.
# A new hash means upstream changed the layer: re-read it against run/tiling.py, then update the digests.
PHI3_LAYER_DIGESTS = {"Phi3DecoderLayer.forward": "ea4ff3fefd5ea80e", "Phi3Attention.forward": "006f9a6e76b28dde"}


def _check_phi3_layer_copy() -> None:
    from transformers.models.phi3 import modeling_phi3 as m

    for name, digest in PHI3_LAYER_DIGESTS.items():
        cls, method = name.split(".")
        found = _source_digest(getattr(getattr(m, cls), method))
        assert found == digest, f"{name} source changed (digest {found}, checked {digest})"


def _check_attn_implementation() -> None:
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config._attn_implementation = "sdpa"
    assert config._attn_implementation == "sdpa"


def _check_sft_bf16_cast() -> None:
    from trl import SFTTrainer

    src = inspect.getsource(SFTTrainer.__init__)
    assert "param.data.to(torch.bfloat16)" in src, "SFTTrainer no longer casts LoRA weights to bf16"


def _check_fsdp_plugin() -> None:
    import dataclasses

    from accelerate.utils import FullyShardedDataParallelPlugin

    assert "auto_wrap_policy" in {f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)}


def _check_warmup_ratio() -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="/nonexistent-never-written", warmup_steps=0.1, report_to=[])
    assert args.get_warmup_steps(100) == 10, "warmup_steps=0.1 is no longer a ratio of the total steps"


def _check_python_dispatch() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    assert callable(getattr(TorchDispatchMode, "__torch_dispatch__", None))


def _check_quant_state() -> None:
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    assert dequantize_4bit(packed, state).shape == (64, 64)
    from bitsandbytes.nn import Params4bit

    assert "quant_state" in inspect.signature(Params4bit.__new__).parameters


def _check_peft_default_adapter() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = torch.nn.Linear(8, 8)

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["qkv_proj"]))
    layer = model.base_model.model.qkv_proj
    assert isinstance(layer.lora_A, torch.nn.ModuleDict) and "default" in layer.lora_A
    assert layer.r["default"] == 2 and "default" in layer.scaling


UPSTREAM: tuple[Upstream, ...] = (
    Upstream("Trainer._save_checkpoint / _get_output_dir (overridden)", "run/checkpoints.py",
             "no public hook redirects where a checkpoint is written or runs after it is complete",
             "transformers 5.25.0", lambda: check_trainer_internals()),
    Upstream("Phi3DecoderLayer.forward and Phi3Attention.forward (mirrored)", "run/tiling.py",
             "transformers has no tiling option; the tiled layer copies their body", "transformers 5.25.0",
             _check_phi3_layer_copy),
    Upstream("config._attn_implementation", "run/trainer.py, run/tiling.py",
             "the attention actually in use (after auto and fallbacks); no public accessor", "transformers 5.25.0",
             _check_attn_implementation),
    Upstream("SFTTrainer casts LoRA weights of a quantized model to bf16", "run/trainer.py (cast back to fp32)",
             "undocumented; we keep fp32 masters for fp16 loss scaling", "trl 1.16.0", _check_sft_bf16_cast),
    Upstream("accelerate FullyShardedDataParallelPlugin.auto_wrap_policy, set after the Trainer is built",
             "run/trainer.py", "PEFT's FSDP-QLoRA guide sets it on the live plugin", "accelerate 1.16.0",
             _check_fsdp_plugin),
    Upstream("TrainingArguments.warmup_steps given a float < 1 is a ratio", "run/train.py",
             "transformers 5 dropped warmup_ratio in favour of this", "transformers 5.25.0", _check_warmup_ratio),
    Upstream("torch.utils._python_dispatch.TorchDispatchMode", "memory/meter.py",
             "the live-tensor peak on a CPU needs every allocation; torch has no public CPU allocator stats",
             "torch 2.13.0", _check_python_dispatch),
    Upstream("bitsandbytes quant_state (Params4bit) and dequantize_4bit(A, quant_state)", "model/lora.py (LoftQ)",
             "PEFT's LoftQ replacement is CUDA-only; we dequantize the 4-bit base ourselves", "bitsandbytes 0.50.2",
             _check_quant_state),
    Upstream("PEFT LoRA layers keep adapters in lora_A / lora_B ModuleDicts keyed 'default', r and scaling dicts",
             "model/lora.py, ship/merge.py", "OLoRA/LoftQ initialisation writes the adapter weights directly",
             "peft 0.21.2", _check_peft_default_adapter),
)


def check_upstream() -> list[str]:
    """What moved: one line per registry entry whose check fails (empty when all hold)."""
    moved = []
    for entry in UPSTREAM:
        try:
            entry.check()
        except Exception as e:  # any failure of a check is news: report it with the entry
            moved.append(f"{entry.what} ({entry.used_in}; checked against {entry.checked}): "
                         f"{type(e).__name__}: {e}")
    return moved
