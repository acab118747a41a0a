"""Analytic peak-memory estimate of a QLoRA training step, from the model's ``config.json`` only.

No weights are loaded: ``estimate(recipe, model_config)`` needs the shapes (hidden, layers, heads,
MLP width, vocabulary) and the recipe. Every term below names its formula and where it comes from.
Where a coefficient comes from tracing, the trace is of transformers 5.24's ``Phi3DecoderLayer`` (or its
tiled form, qlora_phi3/run/tiling.py) with PEFT LoRA on bitsandbytes ``Linear4bit``, bf16 weights, on the
code path of ``qlora-phi3 train``: what autograd saves (``saved_tensors_hooks``) and what is alive at the
peak (the live-tensor meter, qlora_phi3/memory/meter.py). That forward runs under autocast, so PEFT runs the
adapters in bf16 (``TRAIN_FORWARD_AUTOCAST``; ``autocast=False`` estimates the fp32-adapter path the long-context
table was measured on).
Checked: ``tests/test_estimate.py`` against measured CPU peaks (within 15% on tiny and mini Phi-3s through
the profiler, eager included; within 10% on every row of bench/results/cpu_long_context.md, real training
steps at Phi-3-mini's widths, 2k-16k tokens, tiling off and on). The GPU-only terms (attention backward
buffers, cuBLAS workspaces, allocator overhead, CUDA context) come from their sources and are not measured
yet (bench/gpu_check.py).

Preference methods (``train.method``) change a few terms, given as data in ``METHOD_TERMS``: rows per sample
(chosen + rejected), a no-grad reference forward, KTO's KL rows.

Notation: N = micro_batch_size x rows per sample x max_seq_len tokens, h = hidden, I = MLP width, L = layers,
V = vocabulary, r = LoRA rank, P_q = parameters of the quantized linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_phi3.config import Recipe
from qlora_phi3.errors import UserError
from qlora_phi3.units import GIB

__all__ = ["Estimate", "METHOD_TERMS", "MethodTerms", "Term", "estimate", "format_breakdown", "lora_shapes", "resolve_attention",
           "config_for_estimate", "KNOWN_SHAPES", "PHI3_MINI_4K_SIZES"]

CUDA_CONTEXT_BYTES = 500 * 1024**2  # CUDA 12 context + cuBLAS/cuDNN handles: 0.3-0.6 GB on recent cards (nvidia-smi)
ALLOCATOR_OVERHEAD = 0.10  # PyTorch caching allocator: reserved exceeds allocated by ~5-15% (block rounding, fragmentation)
# The trainer runs the forward under autocast (run/trainer.py; the chunked loss included), so PEFT runs the adapters
# in bf16 on bf16 inputs. False estimates the older path, where PEFT cast every LoRA input to fp32.
TRAIN_FORWARD_AUTOCAST = True
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 1024**2  # one cuBLAS workspace per handle (forward + backward thread), 32 MiB on Hopper
BNB_BLOCKSIZE = 64  # bitsandbytes 4-bit block size (QLoRA paper, arXiv 2305.14314, section 2)
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes optimizers keep 32-bit state for tensors smaller than this (min_8bit_size)
BNB_8BIT_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer: one fp32 absmax per 256 values per state
# microsoft/Phi-3-mini-{4k,128k}-instruct shapes (their config.json), used when the config is not on this machine.
PHI3_MINI_4K_SIZES = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                          original_max_position_embeddings=4096)
KNOWN_SHAPES = {"microsoft/Phi-3-mini-4k-instruct": PHI3_MINI_4K_SIZES,
                "microsoft/Phi-3-mini-128k-instruct": {**PHI3_MINI_4K_SIZES, "max_position_embeddings": 131072}}


@dataclass(frozen=True)
class MethodTerms:
    """What a training method (``train.method``, qlora_phi3/run/methods/) changes in a step's memory, as data: this
    layer sits below run/ and never imports it.

    rows_per_sample: rows one sample becomes in a forward (dpo, orpo, simpo: a chosen and a rejected row).
    reference_forward: a no-grad forward of the same rows with the adapter off (dpo, kto), unless the reference
        log-probs are precomputed (``train.precompute_ref_log_probs``).
    kl_rows_per_sample: rows of mismatched answers forwarded without gradient, by the policy and the reference (kto).
    The answers' log-probs cost what the SFT loss costs (the "logits and loss" term): qlora_phi3/run/logprobs.py takes
    them as minus the same fused cross-entropy, 256 answer positions at a time (measured: tests/test_estimate_methods.py).
    """
    rows_per_sample: int = 1
    reference_forward: bool = False
    kl_rows_per_sample: int = 0


METHOD_TERMS = {
    "sft": MethodTerms(),
    "dpo": MethodTerms(rows_per_sample=2, reference_forward=True),
    "orpo": MethodTerms(rows_per_sample=2),
    "simpo": MethodTerms(rows_per_sample=2),
    "kto": MethodTerms(reference_forward=True, kl_rows_per_sample=1),
}


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


def _layer_activation_bytes_per_token(cfg, r: int, dropout: float, targets: list[str],
                                      lora_fp32: bool = True) -> tuple[float, str]:
    """Bytes autograd saves per token in one decoder layer run whole (no tiling), traced with
    ``torch.autograd.graph.saved_tensors_hooks`` on a Phi-3-mini-width layer (see the module doc).

    bitsandbytes' ``MatMul4Bit`` keeps no activation (the frozen weight needs no input to backpropagate), and the
    RMSNorm's last multiply by its frozen weight saves only the weight, so the bf16 inputs of the projections
    are not saved; the LoRA inputs are: bf16 under autocast, fp32 copies without it (PEFT casts every LoRA input
    to the adapter's dtype, peft/tuners/lora/bnb.py ``requires_conversion``).
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    shapes = _linear_shapes(cfg)
    q_size, qkv_out = shapes["o_proj"][0], shapes["qkv_proj"][1]
    kv_size = (qkv_out - q_size) // 2
    # Two RMSNorms: fp32 upcast of the input (4h) and 1/rms (4) each. Attention: the fused qkv output (2 x qkv_out,
    # q/k/v are views of it), rotated q and k, the attention output and its fp32 logsumexp (4 per head).
    # MLP: the fused gate_up output (2 x 2I) and silu(gate) (2I).
    base = 2 * (4 * h + 4) + 2 * qkv_out + 2 * (q_size + kv_size) + 2 * q_size + 4 * heads + 2 * 2 * i + 2 * i
    # Each LoRA target: its fp32 input (4 x in) kept by lora_A, or with dropout the fp32 dropout mask and the
    # dropped input (8 x in); and lora_A's fp32 output (4r).
    # Under autocast (lora_fp32=False) the adapter runs in bf16 on the bf16 input: 2 x in (4 x in with dropout) + 2r.
    per_in = _lora_bytes_per_input(dropout, lora_fp32)
    lora = sum(per_in * shapes[t][0] + (4 if lora_fp32 else 2) * r for t in targets if t in shapes)
    return float(base + lora), (f"8h+8 (norms) + 2*{qkv_out} (qkv) + 2*(q+k) + 2q + 4*heads (attention) + 6I (MLP) "
                                f"+ LoRA {per_in}*in + {4 if lora_fp32 else 2}r per target")


def _lora_bytes_per_input(dropout: float, lora_fp32: bool) -> int:
    if lora_fp32:
        return 8 if dropout > 0 else 4
    return 4 if dropout > 0 else 2


def resolve_attention(recipe: Recipe, device: str) -> str:
    """The attention implementation training will use, as ``model.load.pick_attention`` decides it, without
    asking a GPU: 'auto' is flash_attention_2 for a CUDA estimate where flash-attn is installed, else sdpa."""
    import importlib.util

    requested = recipe.model.attn_implementation
    if requested != "auto":
        return requested
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def estimate(recipe: Recipe, model_config, device: str = "cuda", attn_implementation: str | None = None,
             autocast: bool = TRAIN_FORWARD_AUTOCAST) -> Estimate:
    """Peak memory of one training step. ``device``: 'cuda' (adds context and allocator overhead) or 'cpu'.
    ``attn_implementation``: the attention the step runs (default: :func:`resolve_attention`).
    ``autocast``: whether the forward runs under autocast (then PEFT runs the adapters in bf16, not fp32)."""
    cfg = model_config
    h, i, n_layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    r = recipe.lora.r
    method = METHOD_TERMS[getattr(recipe.train, "method", "sft")]
    batch, seq = recipe.train.micro_batch_size * method.rows_per_sample, recipe.data.max_seq_len  # rows per forward
    n_tokens = batch * seq
    on_gpu = device.startswith("cuda")
    attn = attn_implementation or resolve_attention(recipe, device)
    ckpt = bool(recipe.train.gradient_checkpointing)
    offload = recipe.train.gradient_checkpointing == "offload" and on_gpu
    chunk = recipe.train.loss_chunk_tokens
    tile = recipe.train.tile_tokens if 0 < recipe.train.tile_tokens < seq else 0  # a row within one tile runs whole
    shapes = _linear_shapes(cfg)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    q_size, qkv_out = shapes["o_proj"][0], shapes["qkv_proj"][1]
    kv_size = (qkv_out - q_size) // 2
    p_quant = n_layers * sum(a * b for a, b in shapes.values())
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    lora = lora_shapes(recipe, cfg)
    p_lora = sum(a * b for a, b in lora)
    terms: list[Term] = []

    def add(name, n_bytes, formula):
        terms.append(Term(name, float(n_bytes), formula))

    # --- weights: allocated once, before the first step ---
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
    if method.reference_forward and getattr(recipe.model, "adapter", None):
        add("reference adapter (frozen copy)", p_lora * 4, "P_lora x 4 B: TRL's 'ref' copy of the continued adapter "
                                                           "(run/methods/preference.py), no gradient or optimizer state")
    opt_bytes, opt_formula = _optimizer_bytes(recipe.train.optimizer, lora)
    add(f"optimizer states ({recipe.train.optimizer})", opt_bytes, opt_formula)
    dora = _dora_bytes(recipe, cfg, shapes, n_tokens) if recipe.lora.use_dora else None
    if dora:
        add("DoRA magnitude vectors", dora.weights, dora.weights_formula)
    weights = sum(t.n_bytes for t in terms)

    # --- activations alive for the whole step ---
    lora_fp32 = not autocast
    per_layer, layer_formula = _layer_activation_bytes_per_token(cfg, r, recipe.lora.dropout,
                                                                 recipe.lora.target_modules, lora_fp32)
    rope = 2 * 2 * head_dim  # cos and sin (bf16), computed once per forward and shared by all layers
    if ckpt:
        saved = n_tokens * (n_layers * (0 if offload else 2 * h) + rope)
        add("saved activations (checkpointed)", saved,
            "N x (L x 2h [layer inputs, 0 when offloaded to CPU] + 4 x head_dim [rope])")
    else:
        kept = (_tiled_layer_bytes_per_token(cfg) + 2 * h) if tile else per_layer
        saved = n_tokens * (n_layers * kept + rope + 2 * h)
        if dora:
            saved += n_layers * dora.saved
        add("saved activations (no checkpointing)", saved,
            f"N x (L x {kept:,.0f} B [{'tiled: what attention keeps + the tile inputs' if tile else layer_formula}] "
            "+ rope + 2h embedding output)")
    # Quadratic in the row length: what the attention implementation needs besides q, k, v.
    packing = recipe.data.packing and method.rows_per_sample == 1 and not method.reference_forward  # SFT only packs
    quad, quad_saved, quad_formula = _quadratic_attention_bytes(attn, packing, batch, seq, heads, ckpt,
                                                                n_layers, on_gpu)
    if quad or quad_saved:
        add(f"attention masks and scores ({attn})", quad + quad_saved, quad_formula)

    # --- one layer's backward (the layers' part of the peak) ---
    # Traced with the live-tensor meter (qlora_phi3/memory/meter.py) on a Phi-3-mini-width layer, two moments:
    # (a) its recompute reaching gate_up's LoRA: everything saved up to there, gate_up's output, the fp32 LoRA
    #     output and its scaled copy (PEFT computes the adapter in fp32 here), PEFT's fp32 copy of the input, the
    #     residual and normed input that transformers' forward holds, the gradient arriving from above, and one more
    #     fp32 h-wide buffer the trace shows alive (owner not pinned down; counted, not guessed away);
    # (b) backward reaching gate_up: the MLP's own saved tensors (gate_up output, silu, down_proj's LoRA inputs)
    #     are freed; gate_up's output gradient, the residual gradient and the dequantized weight are alive.
    # (a) wins from ~1k tokens on; a tiled layer reaches both inside one tile, and over the whole sequence holds
    # what attention needs, with its own peak in attention's backward (dq, dk, dv).
    widest = max(a * b for a, b in shapes.values())
    dequant = 2 * widest  # MatMul4Bit.backward dequantizes the frozen weight (bf16) to multiply the gradient
    targets = [t for t in recipe.lora.target_modules if t in shapes]
    per_in = _lora_bytes_per_input(recipe.lora.dropout, lora_fp32)
    down_lora = (per_in * i + (4 if lora_fp32 else 2) * r) if "down_proj" in targets else 0
    at_gate_up = per_layer - 6 * i - down_lora  # saved tensors alive when the recompute / backward is at gate_up
    lora_out = 2 * (4 if lora_fp32 else 2) * 2 * i if "gate_up_proj" in targets else 0
    held = (4 * h if lora_fp32 else 0) + 2 * 2 * h + 4 * h  # (a): PEFT's fp32 input copy, residual + normed input,
    # and the unpinned buffer
    in_recompute = at_gate_up + 2 * 2 * i + lora_out + held + 2 * h
    in_backward = at_gate_up + 2 * 2 * i + 2 * h
    moment_formula = (f"max({in_recompute:,.0f} B [(a) saved up to gate_up + 4I output + {lora_out:,} fp32 LoRA "
                      f"output and scaled copy + 14h held], {in_backward:,.0f} B + dequantized weight [(b)])")
    # A tile of segment B (o_proj + MLP) has saved only its own part: o_proj's LoRA input, the second norm and
    # gate_up's LoRA input; the attention's tensors are whole-sequence (below) and the layer output grad too.
    seg_b = (4 * h + 4) + sum(per_in * shapes[t][0] + (4 if lora_fp32 else 2) * r
                              for t in ("o_proj", "gate_up_proj") if t in targets)
    tile_recompute = seg_b + 2 * 2 * i + lora_out + held
    tile_backward = seg_b + 2 * 2 * i
    layer_input_back = 2 * h if offload else 0  # an offloaded layer input comes back for its own recompute
    if tile:
        whole = _tiled_layer_bytes_per_token(cfg)
        attn_grads = 2 * q_size + 2 * h + 2 * (q_size + 2 * kv_size)  # attention output, residual; dq, dk, dv
        rows = batch * tile
        # the layer output's gradient, and the gradients of the tiles already done (split's backward gathers them)
        in_tile = (2 * h + 2 * q_size + 2 * h) * n_tokens + max(rows * tile_recompute, rows * tile_backward + dequant)
        # sdpa: transformers returns its output transposed and made contiguous, so the gradient reaches sdpa's
        # backward as a transposed view that it copies (2q); flash-attn takes (batch, seq, heads, dim) as it comes.
        attn_grads += 2 * q_size if attn == "sdpa" else 0
        in_attention = attn_grads * n_tokens
        layer_ws = n_tokens * (whole + layer_input_back)
        add("one layer's recompute working set", layer_ws,
            f"tiled: N x {whole:,.0f} B [what attention keeps: q, k, v 2(q+2k), its output and the contiguous copy "
            f"o_proj reads 4q, logsumexp 4*heads]{' + N x 2h [offloaded input back]' if offload else ''}")
        grad_ws = max(in_tile, in_attention)
        grad_formula = (f"max(N x (2h + 2q + 2h) [layer output grad; grads of the tiles' inputs, gathered] + tile "
                        f"{tile} x micro-batch x max({tile_recompute:,} B "
                        f"[(a) for o_proj + MLP only], {tile_backward:,} B + dequantized weight [(b)]), "
                        f"N x {attn_grads:,} B [attention backward: grads of its output and the residual, dq, dk, dv"
                        f"{', the output grad made contiguous (sdpa)' if attn == 'sdpa' else ''}])")
    else:
        layer_ws = n_tokens * (at_gate_up + layer_input_back) if ckpt else 0.0
        if dora and ckpt:
            layer_ws += dora.saved
        if ckpt:
            add("one layer's recompute working set", layer_ws,
                f"N x {at_gate_up:,.0f} B [{layer_formula}, less the MLP's own 6I and down_proj's LoRA inputs]")
        grad_ws = max(n_tokens * (in_recompute - at_gate_up), n_tokens * (in_backward - at_gate_up) + dequant)
        grad_formula = f"N x {moment_formula} less the recompute working set"
    add("backward transients", grad_ws, grad_formula)
    if dora:
        add("DoRA activations", dora.saved * (1 if ckpt else n_layers) + dora.transient, dora.formula)
        grad_ws += dora.transient
    if on_gpu and attn in ("flash_attention_2", "sdpa"):
        attn_bwd = n_tokens * (4 * q_size + 4 * heads)
        add("attention backward buffers (GPU)", attn_bwd,
            "N x (4 x heads x head_dim [fp32 dq accumulator] + 4 x heads [softmax_d]): flash-attn 2's backward "
            "(flash_api.cpp mha_bwd), the same for sdpa's flash / efficient kernels")
        grad_ws = max(grad_ws, attn_bwd + (in_attention if tile else n_tokens * (2 * q_size + 2 * (q_size + 2 * kv_size))))

    # --- logits and loss (the first thing backward runs), with the final norm's saved tensors ---
    final_norm = n_tokens * (4 * h + 4)
    add("final norm (saved)", final_norm, "N x (4h fp32 input + 4 B 1/rms): model.norm runs outside checkpointing; "
                                          "freed when backward reaches it, right after the loss")
    if chunk:
        rows = min(n_tokens, chunk)
        logits = rows * vocab * 12 + n_tokens * 2 * h * 2
        logits_formula = (f"min(N, {chunk}) x V x 12 B (one chunk's fp32 log-softmax, its grad and the logits' fp32 "
                          "grad, recomputed in backward: qlora_phi3/run/loss.py) + N x 2 x 2h (final hidden states "
                          "and the labelled rows gathered from them; their gradient)")
    else:
        # train.loss_chunk_tokens=0 hands the loss to SFTTrainer, whose fused LM head also computes the entropy
        # and top-1 metrics from the full fp32 logits: about 30 bytes per (token, vocabulary entry) at the peak,
        # measured through the training path (tests/test_estimate.py), not the 12 of a bare cross-entropy.
        logits = n_tokens * vocab * 30
        logits_formula = ("N x V x 30 B (SFTTrainer's fused LM head: fp32 logits, log-softmax and the entropy metric, "
                          "with their gradients; measured on the training path)")
    add("logits and loss", logits, logits_formula)
    # A no-grad forward (the reference with the adapter off; KTO's mismatched KL rows through policy and reference)
    # saves nothing: its peak is one layer's forward working set, residual and normed input 4h, the MLP's gate_up
    # output 4I, silu and the product 4I, beside what the policy's forward saved.
    nograd_rows = (batch if method.reference_forward and not getattr(recipe.train, "precompute_ref_log_probs", False)
                   else 0) + recipe.train.micro_batch_size * method.kl_rows_per_sample
    nograd = nograd_rows * seq * (4 * h + 8 * i) + min(nograd_rows * seq, chunk or nograd_rows * seq) * vocab * 8
    if nograd_rows:
        add("no-grad forward (reference / KL rows)", nograd,
            f"{nograd_rows} rows x max_seq_len x (4h + 8I) [one layer's forward working set] + a chunk's fp32 logits "
            "and probabilities (V x 8 B per position); before backward, beside the saved activations")

    # The peak is in backward: what lives through the step (weights, saved activations, the persistent masks) plus
    # the larger of the loss's moment (first in backward) and one layer's recompute with its backward.
    activations = saved + quad + max(logits + final_norm, layer_ws + grad_ws + quad_saved, nograd + final_norm)
    tensor_bytes = weights + activations
    settings = {"method": getattr(recipe.train, "method", "sft"), "rows_per_forward": batch,
                "max_seq_len": seq, "micro_batch_size": recipe.train.micro_batch_size, "gradient_checkpointing": recipe.train.gradient_checkpointing,
                "lora_r": r, "optimizer": recipe.train.optimizer, "loss_chunk_tokens": chunk,
                "tile_tokens": recipe.train.tile_tokens, "attn_implementation": attn, "packing": packing}
    est = Estimate(device="cuda" if on_gpu else "cpu", terms=terms, settings=settings)
    if on_gpu:
        add("cuBLAS workspaces (GPU)", CUBLAS_WORKSPACE_BYTES,
            "2 x 32 MiB: one workspace per cuBLAS handle (forward thread and autograd's backward thread), taken "
            "from the caching allocator (torch CublasHandlePool.cpp; 32 MiB on Hopper, ~8 MiB before)")
        tensor_bytes += CUBLAS_WORKSPACE_BYTES
        overhead = ALLOCATOR_OVERHEAD * activations
        add("allocator overhead (GPU)", overhead, f"{ALLOCATOR_OVERHEAD:.0%} of the activation memory (allocated and "
            "freed every step: block rounding and fragmentation); weights are allocated once and do not fragment")
        add("CUDA context (GPU)", CUDA_CONTEXT_BYTES, "~0.5 GB per process: CUDA runtime and kernels; "
            "not in max_memory_reserved")
        est.tensor_bytes = tensor_bytes
        est.reserved_bytes = tensor_bytes + overhead
        est.total_bytes = est.reserved_bytes + CUDA_CONTEXT_BYTES
    else:
        est.tensor_bytes = est.reserved_bytes = est.total_bytes = tensor_bytes
    return est


@dataclass
class _Dora:
    weights: float  # magnitude vectors with their gradients and optimizer states
    weights_formula: str
    saved: float  # one layer's tensors saved for the magnitude's gradient, over the micro-batch
    transient: float  # the widest target's weight-norm computation
    formula: str


def _dora_bytes(recipe: Recipe, cfg, shapes: dict[str, tuple[int, int]], n_tokens: int) -> _Dora:
    """What DoRA (``lora.use_dora``) adds, from PEFT's ``DoraLinearLayer`` (peft/tuners/lora/dora.py):

    * a trainable magnitude per output feature of each adapted layer (fp32, with its gradient and optimizer states);
    * autograd saves the layer's base output and LoRA output (compute dtype) to give the magnitude its gradient
      (``(m / ||W + sBA|| - 1) * base + m / ||W + sBA|| * lora * s``), in every layer without checkpointing, in the
      recomputed one with it;
    * each forward rebuilds the full weight to take its row norms: an fp32 identity of in x in (``get_lora_weight``),
      B A as an out x in matrix, the dequantized base and the scaled sum (out x in, compute dtype each).
    """
    L = cfg.num_hidden_layers
    targets = [t for t in recipe.lora.target_modules if t in shapes]
    outs = [shapes[t][1] for t in targets]
    opt, _ = _optimizer_bytes(recipe.train.optimizer, [(1, o) for o in outs])
    weights = L * (8 * sum(outs) + opt)
    saved = n_tokens * 2 * 2 * sum(outs)
    transient = max(max(4 * i * i + 2 * i * recipe.lora.r + 2 * o * i, 4 * 2 * o * i) for i, o in
                    (shapes[t] for t in targets))
    return _Dora(weights, f"L x sum(out) = {L * sum(outs):,} fp32 magnitudes x (4 B weight + 4 B grad) + optimizer "
                          "states (PEFT DoraLinearLayer.weight)",
                 saved, transient,
                 "N x sum(out) x 2 x 2 B [base and LoRA outputs saved for the magnitude's gradient; per layer without "
                 "checkpointing] + max over targets of (4 in^2 [fp32 identity] + 2 out x in, 4 x 2 out x in) "
                 "[the weight-norm computation, PEFT dora.py]")


def _tiled_layer_bytes_per_token(cfg) -> float:
    """What a tiled layer keeps for the whole sequence (traced like the untiled one, qlora_phi3/run/tiling.py):
    rotated q and k and a contiguous v (2 x (q + 2k)), the attention output and the contiguous copy o_proj reads
    (2 x 2q), the fp32 logsumexp (4 per head). The tiles' own inputs are views of these and of the layer input."""
    shapes = _linear_shapes(cfg)
    q_size, qkv_out = shapes["o_proj"][0], shapes["qkv_proj"][1]
    kv_size = (qkv_out - q_size) // 2
    return float(2 * (q_size + 2 * kv_size) + 4 * q_size + 4 * cfg.num_attention_heads)


def _quadratic_attention_bytes(attn: str, packing: bool, batch: int, seq: int, heads: int, ckpt: bool, n_layers: int,
                               on_gpu: bool) -> tuple[float, float, str]:
    """(bytes alive through the step, bytes alive during one layer's backward, formula) of what grows with the
    square of the row length: masks and, on eager, the attention probabilities.

    sdpa with packing: our block-diagonal mask is B x L^2 bool (data/packing.py), passed to every layer; sdpa
    turns a bool mask into a compute-dtype copy (2 B per entry, torch's ``convert_boolean_attn_mask``) that the
    attention saves for backward, in every layer without checkpointing or in the recomputed one with it.
    eager: transformers' causal mask (B x L^2 x 2 B, or our packed fp32 mask: 4 B) and per layer the softmax
    probabilities (heads x L^2 x 2 B) saved for backward, plus the fp32 softmax transient (4 B per entry).
    flash_attention_2: nothing (varlen from position ids, no mask)."""
    sq = batch * seq * seq
    if attn == "sdpa" and packing:
        if ckpt:
            return sq, 2 * sq, ("B x L^2 x (1 [bool mask, through the step] + 2 [its compute-dtype copy, saved by the "
                                "attention of the layer being recomputed])")
        return sq * (1 + 2 * n_layers), 0.0, "B x L^2 x (1 [bool mask] + L x 2 [its compute-dtype copy, every layer])"
    if attn == "eager":
        mask = 4 if packing else 2
        probs = heads * sq * 2
        if ckpt:
            return sq * mask, probs + heads * sq * 4, (
                f"B x L^2 x {mask} [mask] + heads x B x L^2 x (2 [softmax output saved by the recomputed layer] "
                "+ 4 [fp32 softmax transient])")
        return sq * mask + n_layers * probs, heads * sq * 4, (
            f"B x L^2 x {mask} [mask] + L x heads x B x L^2 x 2 [softmax outputs of every layer] + heads x B x L^2 "
            "x 4 [fp32 softmax transient]")
    return 0.0, 0.0, ""


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
