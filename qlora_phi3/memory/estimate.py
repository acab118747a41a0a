"""Analytic peak-memory estimate of a QLoRA training step, from the model's ``config.json`` only.

No weights are loaded: ``estimate(recipe, model_config)`` needs the shapes (hidden, layers, heads,
MLP width, vocabulary) and the recipe. Every term below names its formula and where it comes from.
Where a coefficient comes from tracing what autograd saves, the trace is of transformers 5's
``Phi3DecoderLayer`` with PEFT LoRA on bitsandbytes ``Linear4bit`` under bf16 autocast (the code
path of ``qlora-phi3 train``); ``tests/test_estimate.py`` checks the total against the profiler's
measured CPU peak (within 15%) on tiny and mini Phi-3 models, and ``bench/gpu_profile.sh``
compares it with ``max_memory_reserved`` on a GPU.

Notation: N = micro_batch_size x max_seq_len tokens, h = hidden, I = MLP width, L = layers,
V = vocabulary, r = LoRA rank, P_q = parameters of the quantized linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_phi3.config import Recipe
from qlora_phi3.errors import UserError
from qlora_phi3.units import GIB

__all__ = ["Estimate", "Term", "estimate", "format_breakdown", "lora_shapes",
           "config_for_estimate", "KNOWN_SHAPES", "PHI3_MINI_4K_SIZES"]

CUDA_CONTEXT_BYTES = 500 * 1024**2  # CUDA 12 context + cuBLAS/cuDNN handles: 0.3-0.6 GB on recent cards (nvidia-smi)
ALLOCATOR_OVERHEAD = 0.10  # PyTorch caching allocator: reserved exceeds allocated by ~5-15% (block rounding, fragmentation)
BNB_BLOCKSIZE = 64  # bitsandbytes 4-bit block size (QLoRA paper, arXiv 2305.14314, section 2)
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes optimizers keep 32-bit state for tensors smaller than this (min_8bit_size)
BNB_8BIT_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer: one fp32 absmax per 256 values per state
# microsoft/Phi-3-mini-{4k,128k}-instruct shapes (their config.json), used when the config is not on this machine.
PHI3_MINI_4K_SIZES = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                          original_max_position_embeddings=4096)
KNOWN_SHAPES = {"microsoft/Phi-3-mini-4k-instruct": PHI3_MINI_4K_SIZES,
                "microsoft/Phi-3-mini-128k-instruct": {**PHI3_MINI_4K_SIZES, "max_position_embeddings": 131072}}


@dataclass
class Term:
    name: str
    n_bytes: float
    formula: str

    @property
    def gib(self) -> float:
        return self.n_bytes / GIB


@dataclass
class Estimate:
    """Peak estimate; ``tensor_bytes`` compares with CPU live tensors / CUDA ``max_memory_allocated``,
    ``reserved_bytes`` with ``max_memory_reserved``, ``total_bytes`` with what nvidia-smi shows."""
    device: str
    terms: list[Term] = field(default_factory=list)
    tensor_bytes: float = 0.0
    reserved_bytes: float = 0.0
    total_bytes: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def reserved_gib(self) -> float:
        return self.reserved_bytes / GIB

    @property
    def tensor_gib(self) -> float:
        return self.tensor_bytes / GIB

    def fits(self, budget_gib: float) -> bool:
        return self.total_gib <= budget_gib


def _linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer in one Phi-3 decoder layer (fused qkv and gate_up)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return {"qkv_proj": (h, cfg.num_attention_heads * head_dim + 2 * kv * head_dim),
            "o_proj": (cfg.num_attention_heads * head_dim, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}


def lora_shapes(recipe: Recipe, cfg) -> list[tuple[int, int]]:
    """Shapes of every LoRA matrix (A: r x in, B: out x r) over all layers."""
    shapes = _linear_shapes(cfg)
    out = []
    for target in recipe.lora.target_modules:
        if target not in shapes:
            raise UserError(f"lora.target_modules: '{target}' is not a Phi-3 linear layer; "
                            f"Phi-3 has {', '.join(shapes)}.")
        d_in, d_out = shapes[target]
        out += [(recipe.lora.r, d_in), (d_out, recipe.lora.r)] * cfg.num_hidden_layers
    return out


def _optimizer_bytes(optimizer: str, shapes: list[tuple[int, int]]) -> tuple[float, str]:
    if optimizer in ("adamw_torch", "paged_adamw_32bit"):
        n = sum(a * b for a, b in shapes)
        return 8.0 * n, "2 fp32 Adam moments = 8 B/param (torch.optim.AdamW; paged: same size, pageable)"
    total = 0.0
    for a, b in shapes:
        n = a * b
        if n < BNB_8BIT_MIN_SIZE:
            total += 8.0 * n
        else:
            total += 2.0 * n + 2 * 4 * -(-n // BNB_8BIT_BLOCK)
    return total, ("2 uint8 moments = 2 B/param + 2 fp32 absmax per 256 values (bitsandbytes blockwise 8-bit "
                   f"Adam; tensors under {BNB_8BIT_MIN_SIZE} values keep 8 B/param)")


def _layer_activation_bytes_per_token(cfg, r: int, dropout: float, targets: list[str]) -> tuple[float, str]:
    """Bytes autograd saves per token in one decoder layer without checkpointing (traced, see module doc)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    shapes = _linear_shapes(cfg)
    qkv_out = shapes["qkv_proj"][1]
    # Two RMSNorms (fp32 upcast of the input and 1/rms: 12h + 8 between them); attention: the fused qkv output
    # (2 x qkv_out, q/k/v are views of it), rotated q and k (4h), the output (2h) and its logsumexp (4 per head);
    # MLP: the fused gate_up output (2 x 2I), silu(gate) (2I).
    base = 12 * h + 8 + 2 * qkv_out + 4 * h + 2 * h + 4 * heads + 4 * i + 2 * i
    # Each LoRA target saves its bf16 input (2 x in) and lora_A's output (2r); with dropout > 0 PEFT's fp32 cast of
    # the input is kept too (4 x in).
    lora = sum((2 + (4 if dropout > 0 else 0)) * shapes[t][0] + 2 * r for t in targets if t in shapes)
    return float(base + lora), (f"12h+8 (norms) + 2*{qkv_out} (qkv) + 6h + 4*heads (attention) + 6I (MLP) + LoRA inputs "
                                f"{'6' if dropout > 0 else '2'}*in + 2r per target")


def estimate(recipe: Recipe, model_config, device: str = "cuda") -> Estimate:
    """Peak memory of one training step. ``device``: 'cuda' (adds context and allocator overhead) or 'cpu'."""
    cfg = model_config
    h, i, n_layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    r = recipe.lora.r
    n_tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    ckpt = bool(recipe.train.gradient_checkpointing)
    offload = recipe.train.gradient_checkpointing == "offload" and device.startswith("cuda")
    chunk = recipe.train.loss_chunk_tokens
    shapes = _linear_shapes(cfg)
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    p_quant = n_layers * sum(a * b for a, b in shapes.values())
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    lora = lora_shapes(recipe, cfg)
    p_lora = sum(a * b for a, b in lora)
    terms: list[Term] = []

    def add(name, n_bytes, formula):
        terms.append(Term(name, float(n_bytes), formula))

    # --- weights ---
    add("4-bit base weights", p_quant / 2, f"P_q x 4 bit = {p_quant:,} x 0.5 B (NF4, QLoRA paper)")
    bits = 0.127 if recipe.model.double_quant else 0.5
    add("quantization constants", p_quant * (1 / BNB_BLOCKSIZE + 4 / (BNB_BLOCKSIZE * 256)) if recipe.model.double_quant
        else p_quant * 4 / BNB_BLOCKSIZE,
        f"P_q x {bits} bit: fp32 absmax per 64 weights, or with double quant uint8 absmax + fp32 per 256 blocks "
        "(QLoRA paper, section 2)")
    add("16-bit embeddings and lm_head", (1 if tied else 2) * vocab * h * 2, f"{'1' if tied else '2'} x V x h x 2 B")
    add("other non-quantized params", (2 * n_layers + 1) * h * 2, "(2L + 1) RMSNorm weights x h x 2 B")
    add("LoRA weights (fp32)", p_lora * 4, f"{p_lora:,} params x 4 B (PEFT autocast_adapter_dtype keeps them fp32)")
    add("LoRA gradients (fp32)", p_lora * 4, "one fp32 grad per LoRA param")
    opt_bytes, opt_formula = _optimizer_bytes(recipe.train.optimizer, lora)
    add(f"optimizer states ({recipe.train.optimizer})", opt_bytes, opt_formula)

    # --- activations ---
    per_layer, layer_formula = _layer_activation_bytes_per_token(cfg, r, recipe.lora.dropout,
                                                                 recipe.lora.target_modules)
    rope = 2 * 2 * head_dim  # cos and sin (bf16), computed once per forward and shared by all layers
    if ckpt:
        saved_each = 0 if offload else 2 * h  # non-reentrant checkpoint keeps each layer's bf16 input
        saved = n_tokens * (n_layers * saved_each + rope)
        add("saved activations (checkpointed)", saved,
            "N x (L x 2h [layer inputs, 0 when offloaded to CPU] + 4 x head_dim [rope])")
        layer_ws = n_tokens * per_layer
        add("one layer's recompute working set", layer_ws, f"N x ({layer_formula}) = N x {per_layer:,.0f} B")
    else:
        saved = n_tokens * (n_layers * per_layer + rope + 2 * h)
        add("saved activations (no checkpointing)", saved,
            f"N x (L x {per_layer:,.0f} B [{layer_formula}] + rope + 2h embedding output)")
        layer_ws = 0.0
    # Backward transients of the widest layer: the gradient of the gate_up output (2 x 2I, bf16), of silu and of the
    # gate (2 x 2I), and bitsandbytes' dequantized weight (MatMul4Bit.backward dequantizes the widest layer).
    widest = max(a * b for a, b in shapes.values())
    grad_ws = n_tokens * (8 * i + 4 * h) + 2 * widest
    add("backward transients", grad_ws, "N x (8I + 4h) [bf16 grads of the MLP's widest outputs] "
                                        "+ 2 B x widest 4-bit weight dequantized by MatMul4Bit.backward")

    # --- logits and loss ---
    if chunk:
        rows = min(n_tokens, chunk)
        logits = rows * vocab * 12 + n_tokens * 2 * h
        logits_formula = (f"min(N, {chunk}) x V x 12 B (one chunk's fp32 log-softmax, its grad and the logits' fp32 "
                          "grad, recomputed in backward: qlora_phi3/loss.py) + N x 2h (labelled hidden states)")
    else:
        # train.loss_chunk_tokens=0 hands the loss to SFTTrainer, whose fused LM head also computes the entropy
        # and top-1 metrics from the full fp32 logits: about 30 bytes per (token, vocabulary entry) at the peak,
        # measured through the training path (tests/test_estimate.py), not the 12 of a bare cross-entropy.
        logits = n_tokens * vocab * 30
        logits_formula = ("N x V x 30 B (SFTTrainer's fused LM head: fp32 logits, log-softmax and the entropy metric, "
                          "with their gradients; measured on the training path)")
    add("logits and loss", logits, logits_formula)

    weights = sum(t.n_bytes for t in terms[:7])
    # The peak is in backward: saved activations, plus the larger of the loss's working set (first in backward)
    # and one layer's recompute with its gradient transients.
    tensor_bytes = weights + saved + max(logits, layer_ws + grad_ws)
    est = Estimate(device="cuda" if device.startswith("cuda") else "cpu", terms=terms, tensor_bytes=tensor_bytes,
                   settings={"max_seq_len": recipe.data.max_seq_len, "micro_batch_size": recipe.train.micro_batch_size,
                             "gradient_checkpointing": recipe.train.gradient_checkpointing, "lora_r": r,
                             "optimizer": recipe.train.optimizer, "loss_chunk_tokens": chunk})
    if est.device == "cuda":
        overhead = ALLOCATOR_OVERHEAD * tensor_bytes
        add("allocator overhead (GPU)", overhead, f"{ALLOCATOR_OVERHEAD:.0%} of tensor memory: caching-allocator "
            "rounding and fragmentation (reserved - allocated)")
        add("CUDA context (GPU)", CUDA_CONTEXT_BYTES, "~0.5 GB per process: CUDA runtime, cuBLAS workspaces; "
            "not in max_memory_reserved")
        est.reserved_bytes = tensor_bytes + overhead
        est.total_bytes = est.reserved_bytes + CUDA_CONTEXT_BYTES
    else:
        est.reserved_bytes = est.total_bytes = tensor_bytes
    return est


def format_breakdown(est: Estimate) -> str:
    """Plain-text breakdown (for error messages); the CLI prints a rich table instead."""
    width = max(len(t.name) for t in est.terms)
    lines = [f"  {t.name:<{width}}  {t.gib:8.3f} GiB" for t in est.terms]
    lines.append(f"  {'peak (terms overlap: see estimate.py)':<{width}}  {est.total_gib:8.3f} GiB")
    return "\n".join(lines)


def config_for_estimate(model_cfg):
    """The model's config (local directory or Hub cache), or, for the Phi-3-mini Hub ids when neither has it,
    their published shapes; never a download (an estimate must work before anything is fetched)."""
    from pathlib import Path

    from qlora_phi3.model.load import read_model_config, resolve_model_path

    name = model_cfg.name_or_path
    if name in KNOWN_SHAPES and not Path(resolve_model_path(name)).expanduser().exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=model_cfg.revision)
        if not isinstance(cached, str):
            from transformers import Phi3Config

            from qlora_phi3.ui import info

            info(f"{name}: config.json not on this machine; using its published shapes (hidden 3072, 32 layers).")
            return Phi3Config(**KNOWN_SHAPES[name], tie_word_embeddings=False)
    return read_model_config(model_cfg)
