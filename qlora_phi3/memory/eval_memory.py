"""Peak memory of ``qlora-phi3 eval``, and the batch size that fits a budget.

lm-evaluation-harness runs no-grad forwards: a batch of ``rows`` requests padded to at most ``seq_len`` tokens
(``HFLM._loglikelihood_tokens``: the model's logits, then their log-softmax, both over the whole row), or, for
generation tasks, ``model.generate`` with its KV cache over the prompt and the new tokens. Nothing is saved for a
backward, so beside the weights the peak is the larger of three moments (N = rows x seq_len tokens):

* one decoder layer's forward working set, N x (2h + 4I) x c (as the estimator's no-grad forward), with the
  residual stream;
* the logits and their log-softmax, N x V x c twice, with the final hidden states;
* generation tasks only: the KV cache, 2 x L x N x kv_size x c, with one layer's working set over the prompt.

plus the attention's padding mask, rows x seq_len^2 booleans, and on a GPU the estimator's CUDA overheads. The
weights are the estimator's own terms (4-bit base and the fp32 LoRA matrices, no gradients or optimizer), or every
parameter in 16 bits for a merged model. Derived from the shapes like the training estimate; not yet measured on a
GPU (bench/gpu_check.py's eval step records the real peak beside it).
"""

from __future__ import annotations

from qlora_phi3.config import Recipe
from qlora_phi3.errors import UserError
from qlora_phi3.memory.estimate import (Estimate, Term, dtype_bytes, gpu_overhead_terms, resolve_compute_dtype,
                                        resolve_step, term, weight_terms)
from qlora_phi3.units import GIB

__all__ = ["MAX_EVAL_BATCH", "eval_estimate", "pick_eval_batch"]

MAX_EVAL_BATCH = 64  # lm-eval's own max_batch_size: bigger batches gain little once the GPU is busy


def _weights(step, merged: bool) -> list[Term]:
    if not merged:  # the model as trained: the estimator's 4-bit base, and the adapter without its training state
        p_lora = sum(a * b for a, b in step.lora_shapes)
        return weight_terms(step) + [term("LoRA weights (fp32)", p_lora * 4, f"{p_lora:,} params x 4 B")]
    per_layer = sum(a * b for a, b in step.shapes.values())
    tied = bool(getattr(step.cfg, "tie_word_embeddings", False))
    params = step.n_layers * per_layer + (1 if tied else 2) * step.vocab * step.h + (2 * step.n_layers + 1) * step.h
    return [term("16-bit merged weights", params * 2, f"{params:,} params x 2 B (every layer, embeddings, norms)")]


def eval_estimate(recipe: Recipe, model_config, device: str, rows: int, seq_len: int, merged: bool = False,
                  generates: bool = True, compute_dtype: str | None = None) -> Estimate:
    """Peak memory of evaluating ``rows`` requests of up to ``seq_len`` tokens at once (see the module doc).
    ``recipe``: the run's (its model and LoRA settings); ``merged``: the merged 16-bit model instead of 4-bit;
    ``generates``: some task generates text (its KV cache counts; loglikelihood tasks keep none)."""
    compute = "float16" if merged else (compute_dtype or resolve_compute_dtype(recipe, device))
    step = resolve_step(recipe, model_config, device, None, True, compute)
    c, n = dtype_bytes(compute), rows * seq_len
    weights = _weights(step, merged)
    residual = n * step.h * c
    layer = n * c * (2 * step.h + 4 * step.i)
    logits = 2 * n * step.vocab * c
    kv_cache = 2 * step.n_layers * n * step.kv_size * c if generates else 0
    mask = rows * seq_len * seq_len
    moments = {"one layer's forward": layer, "logits and log-softmax": logits + residual,
               "KV cache (generation)": kv_cache + layer}
    activation = max(moments.values()) + residual + mask
    terms = weights + [
        term("layer working set (no grad)", layer, f"{rows} rows x {seq_len} tokens x ({2 * c}h + {4 * c}I)"),
        term("logits and log-softmax", logits, f"N x V x {c} B, twice (HFLM: log_softmax of the logits)"),
        term("KV cache (generation tasks)", kv_cache, f"2 x L x N x kv_size x {c} B"),
        term("padding mask", mask, "rows x seq_len^2 x 1 B"),
    ]
    tensor = reserved = total = sum(t.n_bytes for t in weights) + activation
    if step.on_gpu:
        workspaces, allocator, context = gpu_overhead_terms(activation)
        terms += [workspaces, allocator, context]
        tensor += workspaces.n_bytes
        reserved = tensor + allocator.n_bytes
        total = reserved + context.n_bytes
    peak = max(moments, key=moments.get)
    return Estimate(device="cuda" if step.on_gpu else "cpu", terms=terms, tensor_bytes=tensor, reserved_bytes=reserved,
                    total_bytes=total, settings={"rows": rows, "seq_len": seq_len, "merged": merged,
                                                 "compute_dtype": compute, "peak_moment": peak})


def pick_eval_batch(recipe: Recipe, model_config, device: str, seq_len: int, budget_bytes: int,
                    merged: bool = False, generates: bool = True) -> tuple[int, Estimate]:
    """The largest batch (at most :data:`MAX_EVAL_BATCH` rows) whose estimated peak fits ``budget_bytes``, and its
    estimate; refuses when even one row of ``seq_len`` tokens does not fit."""
    best = None
    for rows in range(1, MAX_EVAL_BATCH + 1):
        est = eval_estimate(recipe, model_config, device, rows, seq_len, merged, generates)
        if est.total_bytes > budget_bytes:
            break
        best = (rows, est)
    if best is None:
        one = eval_estimate(recipe, model_config, device, 1, seq_len, merged, generates)
        raise UserError(f"evaluation does not fit {budget_bytes / GIB:.2f} GiB even one request at a time: one row of "
                        f"{seq_len:,} tokens needs {one.total_gib:.2f} GiB by the estimate. Lower --max-length, "
                        + ("drop --merged (the 4-bit model as trained is smaller), " if merged else "")
                        + "or raise --budget.")
    return best
