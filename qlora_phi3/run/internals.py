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

__all__ = ["CHECKED_TRANSFORMERS", "CHECKED_TRL", "PRIVATE_TRAINER_METHODS", "TRL_TRAINER_METHODS", "UPSTREAM",
           "Upstream", "check_trainer_internals", "check_upstream"]

CHECKED_TRANSFORMERS = "5.25.0"
CHECKED_TRL = "1.16.0"
# method name -> its parameters (after self), as overridden in checkpoints.AtomicCheckpoints
PRIVATE_TRAINER_METHODS = {"_save_checkpoint": ("model", "trial"), "_get_output_dir": ("trial",)}
# TRL trainer -> {method: its parameters (after self; a staticmethod's all)}: what run/methods overrides or calls
_PREPARE = {"_prepare_dataset": ("dataset", "processing_class", "args", "dataset_name")}  # dpo.py, kto.py
_PAIRWISE = {"tokenize_row": ("feature", "model"), "concatenated_forward": ("model", "batch"),  # pairwise.py
             "concatenated_inputs": ("batch", "is_encoder_decoder", "padding_value", "device")}
TRL_TRAINER_METHODS = {"DPOTrainer": _PREPARE, "KTOTrainer": _PREPARE, "ORPOTrainer": _PAIRWISE,
                       "CPOTrainer": _PAIRWISE,
                       "GRPOTrainer": {"_generate_and_score_completions": ("inputs",)}}  # grpo.py (token counts)


def _parameters(cls, name: str) -> tuple[str, ...] | None:
    method = getattr(cls, name, None)
    if method is None:
        return None
    params = tuple(inspect.signature(method).parameters)
    return params if isinstance(inspect.getattr_static(cls, name), staticmethod) else params[1:]


def check_trainer_internals(trainer_cls=None) -> None:
    """Raise RuntimeError naming what moved if the Trainer's private methods we override changed, or, for a TRL
    trainer in ``TRL_TRAINER_METHODS``, the methods of it that run/methods overrides or calls."""
    import transformers

    trainer_cls = trainer_cls or transformers.Trainer
    checks = [(f"Trainer.{name}", params, name, "transformers", CHECKED_TRANSFORMERS,
               "qlora-phi3's atomic checkpoints override", "qlora_phi3/run/checkpoints.py")
              for name, params in PRIVATE_TRAINER_METHODS.items()]
    checks += [(f"{trainer_cls.__name__}.{name}", params, name, "trl", CHECKED_TRL, f"qlora-phi3's "
                f"{trainer_cls.__name__} overrides or calls", "qlora_phi3/run/methods/")
               for name, params in TRL_TRAINER_METHODS.get(trainer_cls.__name__, {}).items()]
    for what, params, name, package, checked, user, home in checks:
        found = _parameters(trainer_cls, name)
        if found != params:
            import importlib

            version = importlib.import_module(package).__version__
            now = "gone" if found is None else "now (" + ", ".join(found) + ")"
            raise RuntimeError(
                f"{package} {version}: {what} is {now}, but {user} it as ({', '.join(params)}) (checked against "
                f"{package} {checked}). Install a {package} version qlora-phi3 supports (see constraints.txt) or "
                f"update {home}.")


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
    from transformers.models.phi3 import modeling_phi3

    # A property that resolves the attention actually in use, not a plain attribute that could go stale...
    assert isinstance(inspect.getattr_static(PretrainedConfig, "_attn_implementation", None), property), \
        "PretrainedConfig._attn_implementation is no longer a property"
    # ...and the one Phi-3's attention dispatches on.
    assert "self.config._attn_implementation" in inspect.getsource(modeling_phi3.Phi3Attention.forward), \
        "Phi3Attention.forward no longer picks its attention by config._attn_implementation"


def _trl_trainers():
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return DPOTrainer, KTOTrainer, ORPOTrainer, CPOTrainer, GRPOTrainer


def _check_trl_trainer_methods() -> None:
    for cls in _trl_trainers():
        check_trainer_internals(cls)


def _check_trl_experimental_paths() -> None:
    from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: F401  (simpo.py)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: F401  (orpo.py)


def _check_pairwise_padding() -> None:
    _, _, orpo, cpo, _ = _trl_trainers()
    for cls in (orpo, cpo):
        src = inspect.getsource(cls.__init__)
        assert "self.padding_value" in src or "self.pad_token_id" in src, f"{cls.__name__} pads with neither"
        # our concatenated_forward returns the five values TRL reads (a sixth, aux_loss, only for router models)
        assert "forward_output[:5]" in inspect.getsource(cls.get_batch_loss_metrics), \
            f"{cls.__name__}.get_batch_loss_metrics no longer reads concatenated_forward's first five outputs"


def _check_grpo_internals() -> None:
    GRPOTrainer = _trl_trainers()[-1]
    init, score = inspect.getsource(GRPOTrainer.__init__), inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ('"prompt"', '"completion"', '"rewards"', '"advantages"'):  # grpo_samples.py reads self._logs
        assert key in init, f"GRPOTrainer._logs no longer keeps {key}"
    for key in ('"prompt_mask"', '"completion_mask"'):  # grpo.py counts tokens from them
        assert key in score, f"GRPOTrainer._generate_and_score_completions no longer returns {key}"
    assert "fused_lm_head=True" in inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies), \
        "GRPOTrainer no longer scores completions through the fused head (run/logprobs.py patches it)"


def _check_vllm_generation() -> None:
    import trl.trainer.grpo_trainer as grpo_module
    from trl.generation.vllm_generation import VLLMGeneration

    assert "self.vllm_generation = VLLMGeneration(" in inspect.getsource(grpo_module.GRPOTrainer.__init__), \
        "GRPOTrainer.__init__ no longer builds its vLLM generation from the module's VLLMGeneration"
    assert grpo_module.VLLMGeneration is VLLMGeneration
    init = inspect.getsource(VLLMGeneration._init_vllm)
    for needed in ("self.llm = LLM(", "self._llm_weights_sleeping"):  # vllm_lora.py's _init_vllm does what TRL's does
        assert needed in init, f"VLLMGeneration._init_vllm no longer has {needed}"
    generate = inspect.getsource(VLLMGeneration.generate)
    for needed in ("self.llm.generate(vllm_prompts", "self.llm.sleep(level=2)",  # what _LoraEngine stands in for
                   'self.llm.wake_up(tags=["kv_cache"])', "self._llm_weights_sleeping"):
        assert needed in generate, f"VLLMGeneration.generate no longer calls {needed}"
    for name in ("gpu_memory_utilization", "max_model_length", "max_num_seqs", "enable_sleep_mode", "model_impl",
                 "trust_remote_code", "tensor_parallel_size"):  # read by vllm_lora.py's _init_vllm
        assert name in inspect.signature(VLLMGeneration.__init__).parameters, f"VLLMGeneration takes no {name}"


def _check_kto_kl_flag() -> None:
    _, kto, _, _, _ = _trl_trainers()
    assert "self.calculate_KL" in inspect.getsource(kto.__init__), "KTOTrainer no longer sets calculate_KL"


# What logprobs.install_label_logprobs fills in TRL's FusedCausalLMOutput.
LABEL_LOGPROB_FIELDS = ("loss", "log_probs", "entropy", "mean_logits", "is_top1", "label_mask")


def _check_fused_lm_head() -> None:
    import dataclasses
    import re

    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.kto_trainer as kto
    from trl import DPOConfig
    from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head  # noqa: F401

    fields = {f.name for f in dataclasses.fields(FusedCausalLMOutput)}
    assert set(LABEL_LOGPROB_FIELDS) <= fields, f"FusedCausalLMOutput fields are now {sorted(fields)}"
    # log_sum_sq_probs feeds WPO weighting (DPOConfig.use_weighting, off in our configs); aux_loss router models;
    # logits the unfused path.
    not_ours = {"log_sum_sq_probs", "aux_loss", "logits"}
    for module in (dpo, kto):
        src = inspect.getsource(module)
        assert "fused_lm_head=True" in src, f"{module.__name__} no longer calls the model with fused_lm_head=True"
        read = set(re.findall(r"\b(?:ref_)?outputs\.(\w+)", src))
        assert read <= set(LABEL_LOGPROB_FIELDS) | not_ours, f"{module.__name__} now reads {sorted(read)}"
    config = DPOConfig(output_dir="/nonexistent-never-written", report_to=[], use_cpu=True, bf16=False)
    assert config.use_weighting is False, "DPOConfig now weights by default (WPO), which needs log_sum_sq_probs"


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
    Upstream("config._attn_implementation", "run/methods/sft_trainer.py, run/tiling.py",
             "the attention actually in use (after auto and fallbacks); no public accessor", "transformers 5.25.0",
             _check_attn_implementation),
    Upstream("SFTTrainer casts LoRA weights of a quantized model to bf16", "run/methods/base.py (cast back to fp32)",
             "undocumented; we keep fp32 masters for fp16 loss scaling", "trl 1.16.0", _check_sft_bf16_cast),
    Upstream("accelerate FullyShardedDataParallelPlugin.auto_wrap_policy, set after the Trainer is built",
             "run/methods/sft.py", "PEFT's FSDP-QLoRA guide sets it on the live plugin", "accelerate 1.16.0",
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
    Upstream("DPOTrainer / KTOTrainer._prepare_dataset; ORPOTrainer / CPOTrainer.tokenize_row, concatenated_forward, "
             "concatenated_inputs (overridden or called)", "run/methods/dpo.py, kto.py, pairwise.py",
             "no public way to hand TRL pre-tokenized data or to score answers without the full logits",
             f"trl {CHECKED_TRL}", _check_trl_trainer_methods),
    Upstream("ORPOTrainer / CPOTrainer under trl.experimental", "run/methods/orpo.py, simpo.py",
             "TRL moved them out of its stable API", f"trl {CHECKED_TRL}", _check_trl_experimental_paths),
    Upstream("ORPOTrainer.padding_value / CPOTrainer.pad_token_id; the five outputs of concatenated_forward",
             "run/methods/pairwise.py", "our concatenated_forward pads and returns as TRL's does",
             f"trl {CHECKED_TRL}", _check_pairwise_padding),
    Upstream("KTOTrainer.calculate_KL", "run/methods/kto.py", "whether TRL pairs KL completions (our "
             "_prepare_dataset builds them as TRL would)", f"trl {CHECKED_TRL}", _check_kto_kl_flag),
    Upstream("GRPOTrainer._generate_and_score_completions (its masks), self._logs, the fused-head log-probs",
             "run/methods/grpo.py, run/grpo_samples.py", "token counts, samples.jsonl's completions with rewards, "
             "label-only completion log-probs", f"trl {CHECKED_TRL}", _check_grpo_internals),
    Upstream("trl.trainer.grpo_trainer.VLLMGeneration (the class GRPOTrainer builds), its _init_vllm, "
             "sync_weights and generate", "run/vllm_lora.py", "TRL's colocated vLLM has no LoRA-only sync: it merges "
             "the adapter into the base", f"trl {CHECKED_TRL}", _check_vllm_generation),
    Upstream("model(..., labels=, fused_lm_head=True) returning FusedCausalLMOutput (DPOTrainer, KTOTrainer)",
             "run/logprobs.py", "the patched forward replaces TRL's fused head with label-only chunks",
             f"trl {CHECKED_TRL}", _check_fused_lm_head),
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
