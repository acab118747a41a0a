"""GRPO's optional vLLM generation (``train.generator=vllm``): a vLLM engine on the training GPU samples the
completions with the adapter loaded as a LoRA, never merged into the 4-bit base.

TRL 1.16's colocated vLLM (``trl/generation/vllm_generation.py``) syncs a PEFT model by ``merge_adapter()`` into the
base weights, pushes the merged weights into vLLM and unmerges. On a 4-bit base that merge writes the update into
NF4 blocks and back, so it rounds (docs/grpo.md). TRL has no colocated LoRA path, so this module adds what it
lacks and nothing else:

- the engine starts with ``enable_lora`` (TRL starts it without), and
- after each optimizer step the adapter is saved (safetensors, tens of MB) and every generate call carries a new
  ``LoRARequest`` for it: vLLM caches adapters by id, so a new id is what makes it read the new weights.

Everything else is TRL's: the prompts as token ids, the sampling parameters, the importance-sampling correction
from vLLM's log-probs, sleeping between rounds. TRL's sleep is level 2, which drops the weights and re-pushes them
from the trainer on waking; a LoRA-only sync never pushes the base, so here the engine sleeps at level 1 (weights
offloaded to CPU memory, KV cache dropped) and wakes its weights before each round.

Untested on vLLM itself: vLLM needs a CUDA GPU and this toolkit is developed on machines without one.
``tests/unit/run/test_vllm_lora.py`` runs TRL's GRPOTrainer through this code against a stand-in engine that loads
every saved adapter with PEFT, so the sync (what is saved, when, and that nothing merges) is tested; vLLM's side of
it (its bitsandbytes loader with a LoRA on Phi-3's fused projections, sleep mode) is not.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qlora_phi3.errors import UserError

__all__ = ["VLLM_LORA_RANKS", "check_vllm_here", "lora_only_sync", "vllm_arguments"]

ADAPTER_NAME = "default"  # PEFT's name for the adapter get_peft_model makes: the one being trained
# vLLM's choices for LoRAConfig.max_lora_rank (vllm/config/lora.py, MaxLoRARanks): the engine reserves this rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_vllm_here(device: str) -> None:
    """Before the model loads: a CUDA device and an installed vLLM (``find_spec``: nothing imported)."""
    if device != "cuda":
        raise UserError(f"train.generator=vllm needs a CUDA GPU (vLLM runs its bitsandbytes 4-bit models there), and "
                        f"this run's device is {device}; use train.generator=transformers (generate on the training "
                        "model, any device).")
    if importlib.util.find_spec("vllm") is None:
        raise UserError("train.generator=vllm: vLLM is not installed. Install a release your TRL supports "
                        "(`pip install 'trl[vllm]'`), or use train.generator=transformers.")


def _gpu_total_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def vllm_arguments(recipe) -> dict:
    """GRPOConfig's vLLM keys: colocated, sleeping between rounds, its share of the GPU from ``train.vllm_gib``."""
    t, total = recipe.train, _gpu_total_gib()
    if t.vllm_gib >= total:
        raise UserError(f"train.vllm_gib={t.vllm_gib:g} is the whole GPU ({total:.1f} GiB) and leaves nothing to "
                        "train with; vLLM needs about the 4-bit model plus its KV cache (docs/grpo.md).")
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": t.vllm_gib / total,
            "vllm_max_model_length": recipe.data.max_seq_len, "vllm_enable_sleep_mode": True}


class _LoraEngine:
    """vLLM's ``LLM`` as TRL calls it, with the current adapter in every generate call and sleep at level 1."""

    def __init__(self, llm):
        self.llm, self.request = llm, None

    def generate(self, *args, **kwargs):
        if self.request is None:
            raise RuntimeError("vLLM asked to generate before the adapter was synced (TRL's order changed)")
        return self.llm.generate(*args, lora_request=self.request, **kwargs)

    def sleep(self, level: int = 1):
        # Level 2 frees the base weights, which only a merging sync pushes back (module docstring).
        return self.llm.sleep(level=1)

    def __getattr__(self, name):
        return getattr(self.llm, name)


def _generation_class(base):
    class LoraVLLMGeneration(base):
        """TRL's VLLMGeneration, colocated, fed the adapter as a LoRA (module docstring)."""

        def _init_vllm(self):
            from transformers import is_bitsandbytes_available
            from trl.trainer.utils import ensure_master_addr_port
            from vllm import LLM

            if self.mode != "colocate" or self.tensor_parallel_size != 1:
                raise ValueError("qlora-phi3 runs vLLM colocated on each process's own GPU (tensor_parallel_size 1)")
            # As TRL's colocated start: vLLM reads the launch's ranks from the environment.
            os.environ["RANK"] = str(self.accelerator.process_index)
            os.environ["LOCAL_RANK"] = str(self.accelerator.local_process_index)
            os.environ["WORLD_SIZE"] = str(self.accelerator.num_processes)
            ensure_master_addr_port()
            quantization = None
            if is_bitsandbytes_available():
                import bitsandbytes as bnb

                if any(isinstance(m, bnb.nn.Linear4bit) for m in self.model.modules()):
                    quantization = "bitsandbytes"  # vLLM quantizes the checkpoint to 4-bit as it loads it
            rank = self.model.peft_config[ADAPTER_NAME].r
            base = self.model.name_or_path
            # A Hub id: the commit the trainer loaded (the recipe's model.revision, resolved), not the newest one.
            revision = None if Path(base).is_dir() else getattr(self.model.config, "_commit_hash", None)
            self.llm = _LoraEngine(LLM(
                model=base, revision=revision, gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_length, max_num_seqs=self.max_num_seqs,
                enable_sleep_mode=self.enable_sleep_mode, model_impl=self.model_impl,
                distributed_executor_backend="external_launcher", seed=self.accelerator.process_index,
                max_num_batched_tokens=4096, logprobs_mode="processed_logprobs", quantization=quantization,
                trust_remote_code=self.trust_remote_code,
                enable_lora=True, max_loras=1, max_lora_rank=min(x for x in VLLM_LORA_RANKS if x >= rank)))
            self._adapters = tempfile.TemporaryDirectory(prefix="qlora-phi3-vllm-lora-")
            self._version = 0
            if self.enable_sleep_mode:
                self.llm.sleep()
            self._llm_weights_sleeping = False  # TRL's flag means "re-push the weights", which never happens here
            self._asleep = self.enable_sleep_mode
            self.accelerator.wait_for_everyone()

        def sync_weights(self):
            """Save the adapter as it is now and point the engine at it under a new id; the base is untouched."""
            from vllm.lora.request import LoRARequest

            self._version += 1
            path = Path(self._adapters.name) / f"v{self._version}"
            # Only the trained adapter: a beta > 0 run continuing an adapter also holds its frozen "ref" copy.
            self.model.save_pretrained(path, selected_adapters=[ADAPTER_NAME], safe_serialization=True)
            previous = self.llm.request
            # A new id, not a new path under the old one: vLLM caches adapters (and prefix blocks) by id.
            self.llm.request = LoRARequest(lora_name=f"policy-v{self._version}", lora_int_id=self._version,
                                           lora_path=str(path))
            if previous is not None:
                shutil.rmtree(previous.lora_path, ignore_errors=True)  # vLLM has read it; the new one replaces it

        def generate(self, *args, **kwargs):
            if self._asleep:
                self.llm.wake_up(tags=["weights"])  # TRL's generate wakes the KV cache itself
                self._asleep = False
            out = super().generate(*args, **kwargs)
            self._asleep = self.enable_sleep_mode  # TRL's generate put it to sleep again
            self._llm_weights_sleeping = False
            return out

    return LoraVLLMGeneration


@contextmanager
def lora_only_sync():
    """While a GRPOTrainer is built: the vLLM generation it makes is the LoRA-fed one. TRL builds it inside
    ``GRPOTrainer.__init__`` from the module's own name, with no argument to choose the class
    (``run/internals.py`` checks that this still holds)."""
    import trl.trainer.grpo_trainer as grpo_module

    original = grpo_module.VLLMGeneration
    grpo_module.VLLMGeneration = _generation_class(original)
    try:
        yield
    finally:
        grpo_module.VLLMGeneration = original
