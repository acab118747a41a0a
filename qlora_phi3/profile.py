"""The profiler: real training steps for every configuration of a grid, peak memory and speed of each.

``qlora-phi3 profile RECIPE --grid lora.r=8,16,64 data.max_seq_len=512,2048`` runs, for each
combination, a few warm-up steps (not counted) and then ``--steps`` measured optimizer steps on
batches of exactly ``micro_batch_size x max_seq_len`` synthetic tokens, through the same code as
``train``: ``model.load_model`` (4-bit base), ``lora.attach_lora`` and the optimizer that
``train.optimizer`` names (built by transformers' own optimizer factory, as the Trainer does).

The step loop is written by hand because TRL's trainer owns its loop: it cannot reset the memory
peaks between configurations nor stop a configuration that runs out of memory and go on.

Between configurations everything of the last one (LoRA, gradients, optimizer states, activations)
is freed and the memory held is checked against the level before the first configuration, so one
configuration's memory never leaks into the next one's figure. The 4-bit base is loaded once and
kept (it is the same for every configuration unless the grid varies ``model.*`` keys).
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Recipe, load_recipe, recipe_to_dict
from .errors import UserError

__all__ = ["PHI3_MINI_4K_SIZES", "ProfileRow", "grid_recipes", "parse_grid", "profile", "render_table",
           "write_random_phi3", "write_results"]

# microsoft/Phi-3-mini-4k-instruct's shapes (its config.json), for random-weight stand-ins (no download).
PHI3_MINI_4K_SIZES = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                          original_max_position_embeddings=4096)
LEAK_TOLERANCE_GIB = 1 / 1024  # 1 MiB: small tensors a library caches once (e.g. bitsandbytes' code tables)


@dataclass
class ProfileRow:
    """One configuration's result. Memory in GiB; ``status`` is ok, oom or error."""
    overrides: dict
    lora_r: int
    max_seq_len: int
    micro_batch_size: int
    gradient_checkpointing: str
    optimizer: str
    status: str = "ok"
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    driver_used_gib: float | None = None
    estimated_gib: float | None = None
    estimate_error_pct: float | None = None  # (estimated - measured) / measured, against reserved on CUDA
    fits_budget: bool | None = None
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    baseline_gib: float | None = None  # memory held before this configuration started (leak check)
    message: str = ""


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["lora.r=8,16", "data.max_seq_len=512"]`` -> ``[("lora.r", ["8", "16"]), ("data.max_seq_len", ["512"])]``."""
    axes, seen = [], set()
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid item '{item}' is not key=v1,v2,... (e.g. --grid lora.r=8,16,64 "
                            "data.max_seq_len=512,2048).")
        key, values = item.split("=", 1)
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise UserError(f"--grid item '{item}' lists no values; give them comma-separated: {key}=8,16.")
        if key in seen:
            raise UserError(f"--grid names '{key}' twice; list all its values in one item: {key}=a,b,c.")
        seen.add(key)
        axes.append((key, vals))
    return axes


def grid_recipes(recipe_path: str | None, overrides: list[str], grid: list[str]) -> list[tuple[dict, Recipe]]:
    """Every combination of the grid as a validated recipe (recipe < overrides < grid values)."""
    axes = parse_grid(grid)
    out = []
    for combo in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
        point = {key: value for (key, _), value in zip(axes, combo)}
        recipe = load_recipe(recipe_path, overrides + [f"{k}={v}" for k, v in point.items()])
        out.append((point, recipe))
    return out


def write_random_phi3(out_dir: Path, seed: int = 0, **sizes) -> Path:
    """A Phi-3 with random weights and the given sizes, saved like a Hub model (config + safetensors).

    For memory and speed profiling only: the figures depend on shapes, not on trained values. Its
    tokenizer is not needed (the profiler feeds synthetic token ids).
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**{"tie_word_embeddings": False, "sliding_window": None, "pad_token_id": 32000,
                           "bos_token_id": 1, "eos_token_id": 32000, **sizes})
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).to(torch.bfloat16)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _optimizer(params, recipe: Recipe, device: str):
    """The optimizer ``train.optimizer`` names, built by transformers' factory exactly as the Trainer builds it."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim=recipe.train.optimizer, learning_rate=recipe.train.lr,
                                 weight_decay=recipe.train.weight_decay, use_cpu=device == "cpu", report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls(params, **kwargs)


def _batch(recipe: Recipe, vocab_size: int, device: str, generator):
    """Synthetic token ids of exactly micro_batch_size x max_seq_len; every token carries loss (the worst case)."""
    import torch

    shape = (recipe.train.micro_batch_size, recipe.data.max_seq_len)
    ids = torch.randint(0, vocab_size, shape, generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _one_step(model, optimizer, batch, recipe: Recipe, device: str, dtype: str, scaler) -> None:
    """One optimizer step as our trainer takes it: autocast forward with the same loss (chunked cross-entropy
    unless ``train.loss_chunk_tokens=0``), backward, clip, step, zero grads."""
    import torch

    from .loss import model_loss

    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                        dtype=getattr(torch, dtype), enabled=dtype != "float32"):
        if recipe.train.loss_chunk_tokens:
            loss = model_loss(model, batch, recipe.train.loss_chunk_tokens)
        else:
            loss = model(**batch).loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.train.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # With gradient accumulation the gradients stay allocated through the next micro-batches' forward passes;
    # keeping them (zeroed, not freed) reproduces that peak without running grad_accum micro-batches.
    optimizer.zero_grad(set_to_none=recipe.train.grad_accum == 1)
    del loss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _detach_lora(peft_model):
    """Back to the bare 4-bit base: LoRA layers removed, checkpointing and input-grad hooks off."""
    base = peft_model.unload()
    base.disable_input_require_grads()
    if getattr(base, "is_gradient_checkpointing", False):
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()
    return base


def _row_for(point: dict, recipe: Recipe) -> ProfileRow:
    return ProfileRow(overrides=point, lora_r=recipe.lora.r, max_seq_len=recipe.data.max_seq_len,
                      micro_batch_size=recipe.train.micro_batch_size,
                      gradient_checkpointing=str(recipe.train.gradient_checkpointing).lower(),
                      optimizer=recipe.train.optimizer)


def _run_configuration(base, recipe: Recipe, row: ProfileRow, meter, device: str, dtype: str, steps: int,
                       warmup: int):
    """Run one configuration on ``base``; fill ``row``; return the bare base again (LoRA removed)."""
    import torch

    from .lora import attach_lora

    model = optimizer = batch = None
    try:
        model = attach_lora(base, recipe.lora, recipe.train.gradient_checkpointing)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, recipe, device)
        scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
        generator = torch.Generator().manual_seed(recipe.train.seed)
        vocab = model.get_base_model().config.vocab_size
        for _ in range(warmup):  # first steps allocate optimizer states and warm kernels: not timed
            batch = _batch(recipe, vocab, device, generator)
            _one_step(model, optimizer, batch, recipe, device, dtype, scaler)
        _sync(device)
        meter.reset()  # peak from here: weights + LoRA + optimizer states as they stand, plus the measured steps
        seconds = []
        for _ in range(steps):
            batch = _batch(recipe, vocab, device, generator)
            _sync(device)
            t0 = time.perf_counter()
            _one_step(model, optimizer, batch, recipe, device, dtype, scaler)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        stats = meter.read()
        row.peak_allocated_gib = round(stats.peak_allocated_gib, 4)
        row.peak_reserved_gib = round(stats.peak_reserved_gib, 4)
        row.driver_used_gib = None if stats.driver_used_gib is None else round(stats.driver_used_gib, 3)
        row.step_seconds = round(sum(seconds) / len(seconds), 4)
        row.tokens_per_second = round(recipe.train.micro_batch_size * recipe.data.max_seq_len / row.step_seconds, 1)
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is recorded and the grid goes on
        row.status = "oom" if _is_oom(e) else "error"
        row.message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    finally:
        del optimizer, batch
        if model is not None:
            for p in model.parameters():
                p.grad = None
            base = _detach_lora(model)
            del model
        _free(device)
    return base
