"""Analytic peak-memory estimate of a QLoRA training step, from the model's ``config.json`` only.

No weights are loaded: ``estimate(recipe, model_config)`` needs the shapes (hidden, layers, heads,
MLP width, vocabulary) and the recipe. Every term below names its formula and where it comes from.
Where a coefficient comes from tracing, the trace is of transformers 5.24's ``Phi3DecoderLayer`` (or its
tiled form, qlora_phi3/run/tiling.py) with PEFT LoRA on bitsandbytes ``Linear4bit``, bf16 weights, on the
code path of ``qlora-phi3 train``: what autograd saves (``saved_tensors_hooks``) and what is alive at the
peak (the live-tensor meter, qlora_phi3/memory/meter.py). That forward runs under autocast, so PEFT runs the
adapters in bf16 (``TRAIN_FORWARD_AUTOCAST``; ``autocast=False`` estimates the fp32-adapter path the long-context
table was measured on). Values in the compute dtype count 2 B in bf16 or fp16 and 4 B in fp32, what training picks
on a CPU without native bf16 (``resolve_compute_dtype``); the traced coefficients hold there too (measured through
the profiler in fp32: within 0.7%, tests/unit/memory/test_estimate.py).
Checked: ``tests/unit/memory/test_estimate.py`` against measured CPU peaks (within 15% on tiny and mini Phi-3s through
the profiler, eager included; within 10% on every row of bench/results/cpu_long_context.md, real training
steps at Phi-3-mini's widths, 2k-16k tokens, tiling off and on). The GPU-only terms (attention backward
buffers, cuBLAS workspaces, allocator overhead, CUDA context) come from their sources and are not measured
yet (bench/gpu_check.py).

Preference methods (``train.method``) change a few terms, given as data in the methods table
(:mod:`qlora_phi3.methods`): rows per sample (chosen + rejected), a no-grad reference forward, KTO's KL rows. The
answers' log-probs cost what the SFT loss costs (the "logits and loss" term): qlora_phi3/run/logprobs.py takes them as
minus the same fused cross-entropy, 256 answer positions at a time (measured: tests/unit/memory/test_estimate_methods.py).

``estimate()`` lists the step's phases: the weights, the adapter with its optimizer, then the activations (saved
through the step, attention's masks and scores, one layer's recompute and backward, whole or tiled, the logits and
loss, a no-grad forward), then a GPU's own overheads. Each phase is a small builder that returns its terms, the
lines of the breakdown; an activation phase also says what it adds to the peak, which is in backward: what lives
through the step plus the largest of the moments that transient memory comes and goes in.

Notation: N = micro_batch_size x rows per sample x max_seq_len tokens, h = hidden, I = MLP width, L = layers,
V = vocabulary, r = LoRA rank, P_q = parameters of the quantized linear layers, scored = positions whose next token
is scored (N, or grpo's completions: micro_batch_size x max_completion_len).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from qlora_phi3.config import Recipe
from qlora_phi3.errors import UserError
from qlora_phi3.family import PUBLISHED, published
from qlora_phi3.methods import DEFAULT_METHOD, METHODS, Method
from qlora_phi3.units import GIB

__all__ = ["Estimate", "Step", "Term", "estimate", "estimate_device", "format_breakdown", "lora_shapes",
           "resolve_attention", "rotary_dims", "config_for_estimate", "KNOWN_SHAPES", "dtype_bytes",
           "gpu_overhead_terms", "resolve_step", "term", "weight_terms"]

CUDA_CONTEXT_BYTES = 500 * 1024**2  # CUDA 12 context + cuBLAS/cuDNN handles: 0.3-0.6 GB on recent cards (nvidia-smi)
# TRL's tiled log-prob head (train.loss_chunk_tokens=0 for SFT, DPO, KTO, GRPO): tiles of at most this many
# positions x vocabulary columns (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE, trl.trainer.utils
# _CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16; tests/unit/memory/test_estimate_methods.py reads them from the installed
# TRL). Without Triton (CPUs) it scores every position; with Triton (CUDA) only the labelled ones.
TRL_HEAD_TILE_TOKENS = 4096
TRL_HEAD_TILE_VOCAB = 32768
ALLOCATOR_OVERHEAD = 0.10  # PyTorch caching allocator: reserved exceeds allocated by ~5-15% (block rounding, fragmentation)
# The trainer runs the forward under autocast (run/methods/sft_trainer.py; the chunked loss included), so PEFT runs the adapters
# in bf16 on bf16 inputs. False estimates the older path, where PEFT cast every LoRA input to fp32.
TRAIN_FORWARD_AUTOCAST = True
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 1024**2  # one cuBLAS workspace per handle (forward + backward thread), 32 MiB on Hopper
BNB_BLOCKSIZE = 64  # bitsandbytes 4-bit block size (QLoRA paper, arXiv 2305.14314, section 2)
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes optimizers keep 32-bit state for tensors smaller than this (min_8bit_size)
BNB_8BIT_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer: one fp32 absmax per 256 values per state
# The config.json facts the estimate reads, for every published model (qlora_phi3/family.py), used when the config
# is not on this machine: sizes, grouped-query KV heads, context, tied embeddings, partial rotary.
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "original_max_position_embeddings", "tie_word_embeddings",
               "partial_rotary_factor")
KNOWN_SHAPES = {hub: {k: m.config[k] for k in _SHAPE_KEYS if k in m.config} for hub, m in PUBLISHED.items()}


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


def rotary_dims(cfg) -> int:
    """Dims of each head that rotary embeddings rotate: head_dim x partial_rotary_factor (Phi-4-mini: 96 of 128),
    as transformers' Phi-3 rotary embedding computes it."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim * factor)


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
             autocast: bool = TRAIN_FORWARD_AUTOCAST, compute_dtype: str | None = None) -> Estimate:
    """Peak memory of one training step. ``device``: 'cuda' (adds context and allocator overhead) or 'cpu'.
    ``attn_implementation``: the attention the step runs (default: :func:`resolve_attention`).
    ``autocast``: whether the forward runs under autocast (then PEFT runs the adapters in bf16, not fp32).
    ``compute_dtype``: the dtype the step computes in (default: :func:`resolve_compute_dtype`)."""
    step = resolve_step(recipe, model_config, device, attn_implementation, autocast,
                        compute_dtype or resolve_compute_dtype(recipe, device))
    weights = weight_terms(step) + _adapter_terms(step)  # allocated once, before the first step
    activations = [_saved_activations(step),  # alive for the whole step
                   _attention_scores(step),  # masks and scores, quadratic in the row length
                   _layer_backward(step),  # one layer's recompute and backward, whole or tiled
                   _logits_and_loss(step),  # the first thing backward runs
                   _no_grad_forward(step),  # a preference method's reference forward and KL rows
                   _generation(step)]  # grpo: sampling the completions (KV cache, sampling logits)
    terms = weights + [t for phase in activations for t in phase.terms]
    activation_bytes = _peak_activation_bytes(activations)
    tensor_bytes = reserved_bytes = total_bytes = sum(t.n_bytes for t in weights) + activation_bytes
    if step.on_gpu:
        workspaces, allocator, context = gpu_overhead_terms(activation_bytes)
        terms += [workspaces, allocator, context]
        tensor_bytes += workspaces.n_bytes  # taken from the caching allocator, so in max_memory_allocated
        reserved_bytes = tensor_bytes + allocator.n_bytes
        total_bytes = reserved_bytes + context.n_bytes  # outside the allocator: not in max_memory_reserved
    return Estimate(device="cuda" if step.on_gpu else "cpu", terms=terms, tensor_bytes=tensor_bytes,
                    reserved_bytes=reserved_bytes, total_bytes=total_bytes, settings=_settings(step))


def estimate_device(recipe: Recipe, requested: str | None = None) -> tuple[str, str]:
    """The device an estimate is for, and why: ``requested`` (``--device``) if given, else the recipe's
    ``train.device``; ``auto`` is a GPU (the card the recipe is sized for), without asking this machine, so a
    laptop can plan a GPU run."""
    if requested:
        return requested, f"--device {requested}"
    if recipe.train.device in ("cpu", "cuda"):
        return recipe.train.device, f"the recipe's train.device: {recipe.train.device}"
    return "cuda", "the recipe's train.device is auto: the GPU it is sized for (--device cpu for this CPU)"


def resolve_compute_dtype(recipe: Recipe, device: str) -> str:
    """The compute dtype training will use, as ``model.load.pick_compute_dtype`` decides it, without asking a GPU:
    'auto' is a 16-bit type on a GPU (bf16, or fp16 before Ampere: the same 2 bytes) and on a CPU bf16 where it is
    native, else fp32 (``machine.cpu_bf16``), where every activation is twice the size."""
    requested = recipe.model.compute_dtype
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16"
    from qlora_phi3.machine import cpu_bf16

    return "bfloat16" if cpu_bf16()[0] else "float32"


def dtype_bytes(compute_dtype: str) -> int:
    """Bytes per element of the compute dtype: what activations, logits and 16-bit weights take."""
    return 4 if compute_dtype == "float32" else 2  # bf16 and fp16: 2


@dataclass(frozen=True)
class Step:
    """The facts of one training step that the phases share, resolved once from the recipe, the model's config and
    the device. Short names follow the module doc's notation (N, h, I, L, V)."""
    recipe: Recipe
    cfg: object  # the model's config (config.json, or the published shapes)
    method: Method  # its rows per sample, reference forward and KL rows (qlora_phi3/methods.py)
    rows_per_forward: int  # micro_batch_size x the method's rows per sample
    seq_len: int
    n_tokens: int  # N
    on_gpu: bool
    attn: str  # the attention implementation the step runs
    ckpt: bool
    offload: bool  # checkpointed layer inputs offloaded to CPU (only on a GPU)
    loss_chunk_tokens: int  # 0: the plain loss
    tile_tokens: int  # 0 when the rows run whole: tiling off, or a row within one tile
    packing: bool  # SFT only packs
    lora_fp32: bool  # PEFT runs the adapters in fp32 (no autocast, or fp32 compute)
    compute_dtype: str  # bfloat16, float16 or float32 (a CPU without native bf16)
    shapes: dict[str, tuple[int, int]]  # (in, out) of each linear layer in one decoder layer
    lora_targets: list[str]  # the recipe's LoRA targets (all of them Phi-3 linear layers)
    lora_shapes: list[tuple[int, int]]  # every LoRA matrix over all layers
    h: int
    i: int  # MLP width
    n_layers: int
    vocab: int
    heads: int
    q_size: int  # heads x head_dim
    kv_size: int  # key-value heads x head_dim
    layer_bytes_per_token: float  # what one decoder layer run whole saves, per token
    layer_formula: str
    dora: _Dora | None  # None without lora.use_dora

    @property
    def c(self) -> int:
        """Bytes per value of the compute dtype: activations, the dequantized weight, embeddings and norms."""
        return dtype_bytes(self.compute_dtype)

    @property
    def adapter_dtype_bytes(self) -> int:
        """Bytes per value of what the adapters compute: fp32, or bf16 under autocast."""
        return 4 if self.lora_fp32 else 2

    def lora_saved_bytes_per_token(self, target: str) -> int:
        """What one LoRA target saves per token: its input (:func:`_lora_bytes_per_input`) and lora_A's output."""
        per_in = _lora_bytes_per_input(self.recipe.lora.dropout, self.lora_fp32)
        return per_in * self.shapes[target][0] + self.adapter_dtype_bytes * self.recipe.lora.r

    def scored_in(self, rows: int) -> int:
        """Positions whose next token is scored in ``rows`` rows of max_seq_len, at most: a generating method's
        completions (rows x max_completion_len), else every token (labels bound it; the data decides how much)."""
        tokens = rows * self.seq_len
        if self.method.generates:
            return min(tokens, rows * self.recipe.train.max_completion_len)
        return tokens

    @property
    def scored_tokens(self) -> int:
        """:meth:`scored_in` the training forward's rows."""
        return self.scored_in(self.rows_per_forward)

    def trainer_head(self, rows: int) -> tuple[int, str]:
        """(positions x vocabulary columns) that TRL's trainer projects at once for ``rows`` rows at
        ``train.loss_chunk_tokens=0``, and its formula: one tile of TRL's log-prob head (every position of the rows
        without Triton, a CPU; the scored ones with it), or the full logits (orpo, simpo)."""
        tokens = rows * self.seq_len
        if not self.method.tiled_trl_head:
            return tokens * self.vocab, "N x V"
        positions = min(self.scored_in(rows) if self.on_gpu else tokens, TRL_HEAD_TILE_TOKENS)
        which = "scored positions (Triton)" if self.on_gpu else "all positions (no Triton)"
        return (positions * min(self.vocab, TRL_HEAD_TILE_VOCAB),
                f"min({which}, {TRL_HEAD_TILE_TOKENS}) x min(V, {TRL_HEAD_TILE_VOCAB})")

    @property
    def final_norm_bytes(self) -> int:
        """model.norm's saved tensors, 4h fp32 input + 4 B 1/rms per token: it runs outside checkpointing, so they
        live from the forward's end until backward reaches them, right after the loss."""
        return self.n_tokens * (4 * self.h + 4)


def resolve_step(recipe: Recipe, cfg, device: str, attn_implementation: str | None, autocast: bool,
                 compute_dtype: str) -> Step:
    """The facts of one step of ``recipe`` on the model of config ``cfg`` (:class:`Step`): rows, tokens, layer
    shapes, LoRA shapes, activation bytes per token; what the training estimate's phases and the eval estimate
    (:mod:`qlora_phi3.memory.eval_memory`) share."""
    method = METHODS[getattr(recipe.train, "method", DEFAULT_METHOD)]
    rows = recipe.train.micro_batch_size * method.rows_per_sample  # rows per forward
    seq = recipe.data.max_seq_len
    n_tokens = rows * seq
    on_gpu = device.startswith("cuda")
    attn = attn_implementation or resolve_attention(recipe, device)
    shapes = _linear_shapes(cfg)
    q_size, qkv_out = shapes["o_proj"][0], shapes["qkv_proj"][1]
    lora = lora_shapes(recipe, cfg)  # refuses a target that is not a Phi-3 linear layer
    c = dtype_bytes(compute_dtype)
    lora_fp32 = not autocast or c == 4  # fp32 compute: no autocast, and the adapters are fp32 anyway
    per_layer, layer_formula = _layer_activation_bytes_per_token(cfg, recipe.lora.r, recipe.lora.dropout,
                                                                 recipe.lora.target_modules, lora_fp32, c)
    return Step(
        recipe=recipe, cfg=cfg, method=method, rows_per_forward=rows, seq_len=seq, n_tokens=n_tokens, on_gpu=on_gpu,
        attn=attn, ckpt=bool(recipe.train.gradient_checkpointing),
        offload=recipe.train.gradient_checkpointing == "offload" and on_gpu,
        loss_chunk_tokens=recipe.train.loss_chunk_tokens,
        tile_tokens=recipe.train.tile_tokens if 0 < recipe.train.tile_tokens < seq else 0,
        packing=recipe.data.packing and method.packs,
        lora_fp32=lora_fp32, compute_dtype=compute_dtype, shapes=shapes,
        lora_targets=[t for t in recipe.lora.target_modules if t in shapes],
        lora_shapes=lora, h=cfg.hidden_size, i=cfg.intermediate_size, n_layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size, heads=cfg.num_attention_heads, q_size=q_size, kv_size=(qkv_out - q_size) // 2,
        layer_bytes_per_token=per_layer, layer_formula=layer_formula,
        dora=_dora_bytes(recipe, cfg, shapes, n_tokens, c) if recipe.lora.use_dora else None)


def _settings(step: Step) -> dict:
    train = step.recipe.train
    return {"method": getattr(train, "method", DEFAULT_METHOD), "rows_per_forward": step.rows_per_forward,
            "max_seq_len": step.seq_len, "micro_batch_size": train.micro_batch_size,
            "gradient_checkpointing": train.gradient_checkpointing, "lora_r": step.recipe.lora.r,
            "optimizer": train.optimizer, "loss_chunk_tokens": step.loss_chunk_tokens,
            "tile_tokens": train.tile_tokens, "attn_implementation": step.attn, "packing": step.packing,
            "compute_dtype": step.compute_dtype}


# The moments of the step that transient memory comes and goes in; the peak is at the largest.
_AT_LOSS = "the loss"  # first in backward
_AT_LAYER = "one layer's recompute and backward"
_AT_NO_GRAD = "a no-grad forward"  # before backward
_AT_GENERATE = "generation"  # grpo: before the step's forward


@dataclass(frozen=True)
class _Phase:
    """One phase of the step's activation memory: its lines in the breakdown, and what it adds to the peak. The lines
    do not simply add up: they overlap in time, and some show more than the peak holds of them (DoRA's saved tensors
    are counted again in the saved activations or the recompute working set)."""
    terms: list[Term]
    step_bytes: float = 0.0  # alive through the whole step
    moment_bytes: dict[str, float] = field(default_factory=dict)  # alive at one moment only, by moment


def _peak_activation_bytes(phases: list[_Phase]) -> float:
    """The peak is in backward: what lives through the step (the saved activations, the persistent masks) plus the
    largest moment: the loss's, one layer's recompute with its backward, or a no-grad forward's."""
    moments: dict[str, float] = {}
    for phase in phases:
        for moment, n_bytes in phase.moment_bytes.items():
            moments[moment] = moments.get(moment, 0) + n_bytes
    return sum(phase.step_bytes for phase in phases) + max(moments.values())


def term(name: str, n_bytes: float, formula: str) -> Term:
    """One line of a breakdown: what it is, its bytes, and the formula that gives them (as the table prints it)."""
    return Term(name, float(n_bytes), formula)


def weight_terms(step: Step) -> list[Term]:
    """The frozen model: the quantized linear layers (P_q parameters) with their quantization constants, and the
    embeddings and norms in the compute dtype (16-bit, or fp32 on a CPU without native bf16)."""
    p_quant = step.n_layers * sum(a * b for a, b in step.shapes.values())
    double_quant = step.recipe.model.double_quant
    bits = 0.127 if double_quant else 0.5
    tied = bool(getattr(step.cfg, "tie_word_embeddings", False))
    return [
        term("4-bit base weights", p_quant / 2, f"P_q x 4 bit = {p_quant:,} x 0.5 B (NF4, QLoRA paper)"),
        term("quantization constants", p_quant * (1 / BNB_BLOCKSIZE + 4 / (BNB_BLOCKSIZE * 256)) if double_quant
             else p_quant * 4 / BNB_BLOCKSIZE,
             f"P_q x {bits} bit: fp32 absmax per 64 weights, or with double quant uint8 absmax + fp32 per 256 blocks "
             "(QLoRA paper, section 2)"),
        term(f"{8 * step.c}-bit embeddings and lm_head", (1 if tied else 2) * step.vocab * step.h * step.c,
             f"{'1' if tied else '2'} x V x h x {step.c} B"),
        term("other non-quantized params", (2 * step.n_layers + 1) * step.h * step.c,
             f"(2L + 1) RMSNorm weights x h x {step.c} B"),
    ]


def _adapter_terms(step: Step) -> list[Term]:
    """What training adds to the frozen model: the LoRA matrices (fp32) with their gradients and optimizer states,
    a preference method's frozen copy of a continued adapter, and DoRA's magnitudes."""
    p_lora = sum(a * b for a, b in step.lora_shapes)
    terms = [term("LoRA weights (fp32)", p_lora * 4,
                  f"{p_lora:,} params x 4 B (PEFT autocast_adapter_dtype keeps them fp32)"),
             term("LoRA gradients (fp32)", p_lora * 4, "one fp32 grad per LoRA param")]
    if step.method.reference_forward and getattr(step.recipe.model, "adapter", None):
        terms.append(term("reference adapter (frozen copy)", p_lora * 4,
                          "P_lora x 4 B: TRL's 'ref' copy of the continued adapter (run/methods/preference.py), no "
                          "gradient or optimizer state"))
    optimizer = step.recipe.train.optimizer
    opt_bytes, opt_formula = _optimizer_bytes(optimizer, step.lora_shapes)
    terms.append(term(f"optimizer states ({optimizer})", opt_bytes, opt_formula))
    if step.dora:
        terms.append(term("DoRA magnitude vectors", step.dora.weights, step.dora.weights_formula))
    return terms


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


@dataclass
class _Dora:
    weights: float  # magnitude vectors with their gradients and optimizer states
    weights_formula: str
    saved: float  # one layer's tensors saved for the magnitude's gradient, over the micro-batch
    transient: float  # the widest target's weight-norm computation
    formula: str


def _dora_bytes(recipe: Recipe, cfg, shapes: dict[str, tuple[int, int]], n_tokens: int, c: int) -> _Dora:
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
    saved = n_tokens * 2 * c * sum(outs)
    transient = max(max(4 * i * i + c * i * recipe.lora.r + c * o * i, 4 * c * o * i) for i, o in
                    (shapes[t] for t in targets))
    return _Dora(weights, f"L x sum(out) = {L * sum(outs):,} fp32 magnitudes x (4 B weight + 4 B grad) + optimizer "
                          "states (PEFT DoraLinearLayer.weight)",
                 saved, transient,
                 f"N x sum(out) x 2 x {c} B [base and LoRA outputs saved for the magnitude's gradient; per layer "
                 f"without checkpointing] + max over targets of (4 in^2 [fp32 identity] + {c} out x in, 4 x {c} out x "
                 "in) [the weight-norm computation, PEFT dora.py]")


def _saved_activations(step: Step) -> _Phase:
    """What the forward saves for backward, alive through the whole step: with checkpointing each layer's input,
    without it all that each layer saves (run whole or tiled), DoRA's tensors included."""
    n, h, n_layers, c = step.n_tokens, step.h, step.n_layers, step.c
    rope = 2 * c * rotary_dims(step.cfg)  # cos and sin (compute dtype) over the rotary dims, once per forward, shared
    if step.ckpt:
        saved = n * (n_layers * (0 if step.offload else c * h) + rope)
        return _Phase([term("saved activations (checkpointed)", saved,
                            f"N x (L x {c}h [layer inputs, 0 when offloaded to CPU] + {2 * c} x rotary dims [rope])")],
                      step_bytes=saved)
    kept = (_tiled_layer_bytes_per_token(step.cfg, c) + c * h) if step.tile_tokens else step.layer_bytes_per_token
    saved = n * (n_layers * kept + rope + c * h)
    if step.dora:
        saved += n_layers * step.dora.saved
    kept_formula = "tiled: what attention keeps + the tile inputs" if step.tile_tokens else step.layer_formula
    return _Phase([term("saved activations (no checkpointing)", saved,
                        f"N x (L x {kept:,.0f} B [{kept_formula}] + rope + {c}h embedding output)")], step_bytes=saved)


def _layer_activation_bytes_per_token(cfg, r: int, dropout: float, targets: list[str],
                                      lora_fp32: bool = True, c: int = 2) -> tuple[float, str]:
    """Bytes autograd saves per token in one decoder layer run whole (no tiling), traced with
    ``torch.autograd.graph.saved_tensors_hooks`` on a Phi-3-mini-width layer (see the module doc).

    bitsandbytes' ``MatMul4Bit`` keeps no activation (the frozen weight needs no input to backpropagate), and the
    RMSNorm's last multiply by its frozen weight saves only the weight, so the bf16 inputs of the projections
    are not saved; the LoRA inputs are: bf16 under autocast, fp32 copies without it (PEFT casts every LoRA input
    to the adapter's dtype, peft/tuners/lora/bnb.py ``requires_conversion``). ``c``: bytes per value of the compute
    dtype (2, or 4 for fp32, where the norms' upcast and PEFT's cast are the tensors themselves: the same counts).
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    shapes = _linear_shapes(cfg)
    q_size, qkv_out = shapes["o_proj"][0], shapes["qkv_proj"][1]
    kv_size = (qkv_out - q_size) // 2
    # Two RMSNorms: fp32 upcast of the input (4h) and 1/rms (4) each. Attention: the fused qkv output (2 x qkv_out,
    # q/k/v are views of it), rotated q and k, the attention output and its fp32 logsumexp (4 per head).
    # MLP: the fused gate_up output (2 x 2I) and silu(gate) (2I).
    base = 2 * (4 * h + 4) + c * qkv_out + c * (q_size + kv_size) + c * q_size + 4 * heads + c * 2 * i + c * i
    # Each LoRA target: its fp32 input (4 x in) kept by lora_A, or with dropout the fp32 dropout mask and the
    # dropped input (8 x in); and lora_A's fp32 output (4r).
    # Under autocast (lora_fp32=False) the adapter runs in bf16 on the bf16 input: 2 x in (4 x in with dropout) + 2r.
    per_in = _lora_bytes_per_input(dropout, lora_fp32)
    lora = sum(per_in * shapes[t][0] + (4 if lora_fp32 else 2) * r for t in targets if t in shapes)
    return float(base + lora), (f"8h+8 (norms) + {c}*{qkv_out} (qkv) + {c}*(q+k) + {c}q + 4*heads (attention) + "
                                f"{3 * c}I (MLP) "
                                f"+ LoRA {per_in}*in + {4 if lora_fp32 else 2}r per target")


def _lora_bytes_per_input(dropout: float, lora_fp32: bool) -> int:
    if lora_fp32:
        return 8 if dropout > 0 else 4
    return 4 if dropout > 0 else 2


def _tiled_layer_bytes_per_token(cfg, c: int) -> float:
    """What a tiled layer keeps for the whole sequence (traced like the untiled one, qlora_phi3/run/tiling.py):
    rotated q and k and a contiguous v (2 x (q + 2k)), the attention output and the contiguous copy o_proj reads
    (2 x 2q), the fp32 logsumexp (4 per head); 2 B per value in bf16, ``c`` in general. The tiles' own inputs are
    views of these and of the layer input."""
    shapes = _linear_shapes(cfg)
    q_size, qkv_out = shapes["o_proj"][0], shapes["qkv_proj"][1]
    kv_size = (qkv_out - q_size) // 2
    return float(c * (q_size + 2 * kv_size) + 2 * c * q_size + 4 * cfg.num_attention_heads)


def _attention_scores(step: Step) -> _Phase:
    """What grows with the square of the row length, besides q, k, v: masks and, on eager, the attention
    probabilities; some alive through the step, some only while one layer's backward runs.

    sdpa with packing: our block-diagonal mask is B x L^2 bool (data/packing.py), passed to every layer; sdpa
    turns a bool mask into a compute-dtype copy (2 B per entry, torch's ``convert_boolean_attn_mask``) that the
    attention saves for backward, in every layer without checkpointing or in the recomputed one with it.
    eager: transformers' causal mask (B x L^2 x 2 B, or our packed fp32 mask: 4 B) and per layer the softmax
    probabilities (heads x L^2 x 2 B) saved for backward, plus the fp32 softmax transient (4 B per entry).
    flash_attention_2: nothing (varlen from position ids, no mask)."""
    sq = step.rows_per_forward * step.seq_len * step.seq_len
    heads, n_layers, c = step.heads, step.n_layers, step.c
    if step.attn == "sdpa" and step.packing:
        if step.ckpt:
            in_step, in_layer, formula = sq, c * sq, (
                f"B x L^2 x (1 [bool mask, through the step] + {c} [its compute-dtype copy, saved by the attention of "
                "the layer being recomputed])")
        else:
            in_step, in_layer, formula = (sq * (1 + c * n_layers), 0.0,
                                          f"B x L^2 x (1 [bool mask] + L x {c} [its compute-dtype copy, every layer])")
    elif step.attn == "eager":
        mask = 4 if step.packing else c
        probs = heads * sq * c
        if step.ckpt:
            in_step, in_layer, formula = sq * mask, probs + heads * sq * 4, (
                f"B x L^2 x {mask} [mask] + heads x B x L^2 x ({c} [softmax output saved by the recomputed layer] "
                "+ 4 [fp32 softmax transient])")
        else:
            in_step, in_layer, formula = sq * mask + n_layers * probs, heads * sq * 4, (
                f"B x L^2 x {mask} [mask] + L x heads x B x L^2 x {c} [softmax outputs of every layer] + heads x B x "
                "L^2 x 4 [fp32 softmax transient]")
    else:
        return _Phase([])
    return _Phase([term(f"attention masks and scores ({step.attn})", in_step + in_layer, formula)],
                  step_bytes=in_step, moment_bytes={_AT_LAYER: in_layer})


def _layer_backward(step: Step) -> _Phase:
    """One layer's recompute and backward: the layers' part of the peak.

    Traced with the live-tensor meter (qlora_phi3/memory/meter.py) on a Phi-3-mini-width layer, two moments:
    (a) its recompute reaching gate_up's LoRA: everything saved up to there, gate_up's output, the fp32 LoRA
        output and its scaled copy (PEFT computes the adapter in fp32 here), PEFT's fp32 copy of the input, the
        residual and normed input that transformers' forward holds, the gradient arriving from above, and one more
        fp32 h-wide buffer the trace shows alive (owner not pinned down; counted, not guessed away);
    (b) backward reaching gate_up: the MLP's own saved tensors (gate_up output, silu, down_proj's LoRA inputs)
        are freed; gate_up's output gradient, the residual gradient and the dequantized weight are alive.
    (a) wins from ~1k tokens on; a tiled layer reaches both inside one tile, and over the whole sequence holds
    what attention needs, with its own peak in attention's backward (dq, dk, dv).
    DoRA's weight-norm computation adds to that moment; on a GPU, attention's backward buffers may outgrow it."""
    h, i, c = step.h, step.i, step.c
    # MatMul4Bit.backward dequantizes the widest frozen weight (compute dtype) to multiply the gradient
    dequant_bytes = c * max(a * b for a, b in step.shapes.values())
    # (a): gate_up's LoRA output and its scaled copy (2I wide each), in the adapters' dtype
    lora_out = 2 * step.adapter_dtype_bytes * 2 * i if "gate_up_proj" in step.lora_targets else 0
    # (a): PEFT's fp32 copy of a 16-bit input (none in fp32 compute: the input is fp32), residual + normed input, and
    # the unpinned buffer
    held = (4 * h if step.lora_fp32 and c == 2 else 0) + 2 * c * h + 4 * h
    input_back = c * h if step.offload else 0  # an offloaded layer input comes back for its own recompute
    layer = (_tiled_layer if step.tile_tokens else _whole_layer)(step, dequant_bytes, lora_out, held, input_back)
    terms, transient_bytes = list(layer.terms), layer.transient_bytes
    if step.dora:
        terms.append(term("DoRA activations", step.dora.saved * (1 if step.ckpt else step.n_layers)
                          + step.dora.transient, step.dora.formula))
        transient_bytes += step.dora.transient  # its saved tensors are in the saved activations or the working set
    if step.on_gpu and step.attn in ("flash_attention_2", "sdpa"):
        attn_bwd = step.n_tokens * (4 * step.q_size + 4 * step.heads)
        terms.append(term("attention backward buffers (GPU)", attn_bwd,
                          "N x (4 x heads x head_dim [fp32 dq accumulator] + 4 x heads [softmax_d]): flash-attn 2's "
                          "backward (flash_api.cpp mha_bwd), the same for sdpa's flash / efficient kernels"))
        transient_bytes = max(transient_bytes, attn_bwd + layer.attention_bytes)
    return _Phase(terms, moment_bytes={_AT_LAYER: layer.working_set_bytes + transient_bytes})


class _LayerMoment(NamedTuple):
    terms: list[Term]
    working_set_bytes: float  # what the recomputed layer has saved, over the whole sequence
    transient_bytes: float  # the larger moment beyond the working set, (a) or (b) (or attention's, tiled)
    attention_bytes: float  # what attention's backward holds besides the GPU kernels' own buffers


def _whole_layer(step: Step, dequant_bytes: int, lora_out: int, held: int, input_back: int) -> _LayerMoment:
    """A layer run whole: (a) and (b) over all N tokens. ``lora_out``, ``held``, ``input_back``: per token, from
    :func:`_layer_backward`."""
    h, i, n, q_size, c = step.h, step.i, step.n_tokens, step.q_size, step.c
    down_lora = step.lora_saved_bytes_per_token("down_proj") if "down_proj" in step.lora_targets else 0
    at_gate_up = step.layer_bytes_per_token - 3 * c * i - down_lora  # saved tensors alive when the recompute /
    # backward is at gate_up
    in_recompute = at_gate_up + 2 * c * i + lora_out + held + c * h
    in_backward = at_gate_up + 2 * c * i + c * h
    moment_formula = (f"max({in_recompute:,.0f} B [(a) saved up to gate_up + {2 * c}I output + {lora_out:,} LoRA "
                      f"output and scaled copy + {(held + c * h) // h}h held], {in_backward:,.0f} B + dequantized "
                      "weight [(b)])")
    terms = []
    working_set = 0.0
    if step.ckpt:
        working_set = n * (at_gate_up + input_back)
        if step.dora:
            working_set += step.dora.saved
        terms.append(term("one layer's recompute working set", working_set,
                          f"N x {at_gate_up:,.0f} B [{step.layer_formula}, less the MLP's own {3 * c}I and "
                          "down_proj's LoRA inputs]"))
    transients = max(n * (in_recompute - at_gate_up), n * (in_backward - at_gate_up) + dequant_bytes)
    terms.append(term("backward transients", transients, f"N x {moment_formula} less the recompute working set"))
    # attention's backward: its output's gradient, dq, dk, dv
    return _LayerMoment(terms, working_set, transients, n * (c * q_size + c * (q_size + 2 * step.kv_size)))


def _tiled_layer(step: Step, dequant_bytes: int, lora_out: int, held: int, input_back: int) -> _LayerMoment:
    """A tiled layer (``train.tile_tokens``, qlora_phi3/run/tiling.py): what attention keeps over the whole
    sequence, and (a) or (b) inside one tile of segment B (o_proj + MLP), or attention's own backward."""
    h, i, n, q_size, tile, c = step.h, step.i, step.n_tokens, step.q_size, step.tile_tokens, step.c
    whole = _tiled_layer_bytes_per_token(step.cfg, c)
    # A tile of segment B (o_proj + MLP) has saved only its own part: o_proj's LoRA input, the second norm and
    # gate_up's LoRA input; the attention's tensors are whole-sequence (below) and the layer output grad too.
    seg_b = (4 * h + 4) + sum(step.lora_saved_bytes_per_token(t) for t in ("o_proj", "gate_up_proj")
                              if t in step.lora_targets)
    tile_recompute = seg_b + 2 * c * i + lora_out + held
    tile_backward = seg_b + 2 * c * i
    attn_grads = c * q_size + c * h + c * (q_size + 2 * step.kv_size)  # attention output, residual; dq, dk, dv
    rows = step.rows_per_forward * tile
    # the layer output's gradient, and the gradients of the tiles already done (split's backward gathers them)
    in_tile = c * (2 * h + q_size) * n + max(rows * tile_recompute, rows * tile_backward + dequant_bytes)
    # sdpa: transformers returns its output transposed and made contiguous, so the gradient reaches sdpa's
    # backward as a transposed view that it copies (2q); flash-attn takes (batch, seq, heads, dim) as it comes.
    attn_grads += c * q_size if step.attn == "sdpa" else 0
    in_attention = attn_grads * n
    working_set = n * (whole + input_back)
    transients = max(in_tile, in_attention)
    terms = [
        term("one layer's recompute working set", working_set,
             f"tiled: N x {whole:,.0f} B [what attention keeps: q, k, v {c}(q+2k), its output and the contiguous "
             f"copy o_proj reads {2 * c}q, logsumexp 4*heads]"
             f"{f' + N x {c}h [offloaded input back]' if step.offload else ''}"),
        term("backward transients", transients,
             f"max(N x ({c}h + {c}q + {c}h) [layer output grad; grads of the tiles' inputs, gathered] + tile "
             f"{tile} x micro-batch x max({tile_recompute:,} B "
             f"[(a) for o_proj + MLP only], {tile_backward:,} B + dequantized weight [(b)]), "
             f"N x {attn_grads:,} B [attention backward: grads of its output and the residual, dq, dk, dv"
             f"{', the output grad made contiguous (sdpa)' if step.attn == 'sdpa' else ''}])"),
    ]
    return _LayerMoment(terms, working_set, transients, in_attention)


def _logits_and_loss(step: Step) -> _Phase:
    """The loss, the first thing backward runs, with the final norm's saved tensors."""
    n, chunk = step.n_tokens, step.loss_chunk_tokens
    terms = [term("final norm (saved)", step.final_norm_bytes,
                  "N x (4h fp32 input + 4 B 1/rms): model.norm runs outside checkpointing; freed when backward "
                  "reaches it, right after the loss")]
    if chunk:
        scored = step.scored_tokens
        logits = min(scored, chunk) * step.vocab * 12 + (n + scored) * step.h * step.c
        logits_formula = (f"min(scored, {chunk}) x V x 12 B (one chunk's fp32 log-softmax, its grad and the logits' "
                          f"fp32 grad, recomputed in backward: qlora_phi3/run/loss.py) + (N + scored) x {step.c}h "
                          "(final hidden states and the scored rows gathered from them; their gradient)")
    else:
        # train.loss_chunk_tokens=0 hands the loss to TRL's trainer. SFT, DPO, KTO and GRPO score with TRL's tiled
        # head, which also computes the entropy and top-1 metrics: about 30 bytes per (position, vocabulary column)
        # of a tile at the peak, measured through the training path (tests/unit/memory/test_estimate.py), not the 12
        # of a bare cross-entropy; 33 in fp32 compute (measured the same way on the tiny and mini Phi-3s: SFT 384
        # tokens, DPO 2 x 384, one tile each; on the 2-core Xeon with avx512_bf16, fp32 forced: bytes do not depend
        # on the CPU kind). Past one tile: a mini Phi-4-mini's GRPO step on a CPU (8 x 383 positions, 200,064
        # columns: seven tiles of 3,064 x <= 32,768) measured 3.17 GiB over the loaded model with TRL's head and 0.68
        # with our 0.57 GiB chunk (bench/results/cpu_grpo_compare.md: 2-core AMD EPYC, AVX2 only, so fp32); one tile
        # at 33 B is 3.09 GiB, so 3.09 + 0.11.
        # With Triton the tile is folded in the kernel, so on a GPU this is an upper bound. ORPO and SimPO take the
        # full logits: every position by the whole vocabulary.
        per_entry = 30 if step.c == 2 else 33
        entries, shape = step.trainer_head(step.rows_per_forward)
        what = ("one tile of TRL's log-prob head, with the entropy metric" if step.method.tiled_trl_head else
                "the trainer's full logits: fp32 log-softmax and the metrics, with their gradients")
        logits = entries * per_entry
        logits_formula = f"{shape} x {per_entry} B ({what})"
    terms.append(term("logits and loss", logits, logits_formula))
    return _Phase(terms, moment_bytes={_AT_LOSS: logits + step.final_norm_bytes})


def _no_grad_forward(step: Step) -> _Phase:
    """A no-grad forward (the reference with the adapter off; KTO's mismatched KL rows through policy and reference)
    saves nothing: its peak is one layer's forward working set, residual and normed input 4h, the MLP's gate_up
    output 4I, silu and the product 4I (in bf16; twice that in fp32), beside what the policy's forward saved (the
    final norm's tensors too)."""
    train, seq = step.recipe.train, step.seq_len
    beta = getattr(train, "beta", None)
    beta = step.method.default_beta if beta is None else beta  # beta 0 (grpo's default): no KL term, no reference
    reference_rows = (step.rows_per_forward if step.method.reference_forward and beta != 0
                      and not getattr(train, "precompute_ref_log_probs", False) else 0)
    rows = reference_rows + train.micro_batch_size * step.method.kl_rows_per_sample
    if not rows:
        return _Phase([])
    if step.loss_chunk_tokens:
        head = min(step.scored_in(rows), step.loss_chunk_tokens) * step.vocab
    else:
        head = step.trainer_head(rows)[0]
    nograd = rows * seq * step.c * (2 * step.h + 4 * step.i) + head * 8
    return _Phase([term("no-grad forward (reference / KL rows)", nograd,
                        f"{rows} rows x max_seq_len x ({2 * step.c}h + {4 * step.c}I) [one layer's forward working "
                        "set] + a chunk's (or TRL head tile's) fp32 logits and probabilities (8 B per position "
                        "and vocabulary column); before backward, beside the saved activations")],
                  moment_bytes={_AT_NO_GRAD: nograd + step.final_norm_bytes})


def _generation(step: Step) -> _Phase:
    """GRPO samples one round of completions (micro_batch_size x grad_accum of them, TRL's generation batch on one
    process) with ``generate``, adapter active, before the step's forward: the KV cache of every completion over
    prompt + completion (max_seq_len), one more layer's cache while the cache grows by concatenation, the last
    position's logits (compute dtype) with the fp32 copy and probabilities the sampling (temperature, top-p) makes,
    and one layer's forward working set over the prompts (prefill). Counted as a moment beside what lives through
    the step, though nothing of the step is saved yet when it runs: an upper bound by the saved activations."""
    if not step.method.generates:
        return _Phase([])
    train, seq, c = step.recipe.train, step.seq_len, step.c
    if getattr(train, "samples_with_vllm", False):
        engine = train.vllm_gib * 2**30
        return _Phase([term("vLLM engine (while it samples)", engine, "train.vllm_gib: vLLM's own 4-bit copy of the "
                            "base, CUDA graphs and KV cache, awake only while it samples (the training process holds "
                            "nothing of the step then); asleep during the step, its weights in CPU memory. What it "
                            "keeps on the GPU asleep is not counted (not measured)")],
                      moment_bytes={_AT_GENERATE: engine})
    rows = train.micro_batch_size * train.grad_accum
    prompt = max(seq - getattr(train, "max_completion_len", 0), 1)
    kv = rows * seq * (step.n_layers + 1) * 2 * step.kv_size * c
    sampling = rows * step.vocab * (c + 8)
    prefill = rows * prompt * c * (2 * step.h + 4 * step.i)
    terms = [term("generation KV cache", kv, f"{rows} completions (micro_batch_size x grad_accum) x max_seq_len x "
                  f"(L + 1) layers x 2 (K, V) x {c} x kv_size: the cache of the whole round, and one layer's copy "
                  "as it grows"),
             term("sampling logits", sampling, f"{rows} completions x V x ({c} B logits + 4 B fp32 copy + 4 B "
                  "probabilities) at the last position"),
             term("generation prefill", prefill, f"{rows} rows x prompt tokens (max_seq_len - max_completion_len) x "
                  f"({2 * c}h + {4 * c}I): one layer's forward working set")]
    return _Phase(terms, moment_bytes={_AT_GENERATE: kv + sampling + prefill})


def gpu_overhead_terms(activation_bytes: float) -> list[Term]:
    """What a CUDA process holds besides the step's tensors: the cuBLAS workspaces (from the caching allocator), the
    allocator's overhead on what is allocated and freed every step, and the CUDA context (outside the allocator)."""
    return [
        term("cuBLAS workspaces (GPU)", CUBLAS_WORKSPACE_BYTES,
             "2 x 32 MiB: one workspace per cuBLAS handle (forward thread and autograd's backward thread), taken "
             "from the caching allocator (torch CublasHandlePool.cpp; 32 MiB on Hopper, ~8 MiB before)"),
        term("allocator overhead (GPU)", ALLOCATOR_OVERHEAD * activation_bytes,
             f"{ALLOCATOR_OVERHEAD:.0%} of the activation memory (allocated and freed every step: block rounding and "
             "fragmentation); weights are allocated once and do not fragment"),
        term("CUDA context (GPU)", CUDA_CONTEXT_BYTES, "~0.5 GB per process: CUDA runtime and kernels; "
             "not in max_memory_reserved"),
    ]


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
    model = published(name)
    if model and not Path(resolve_model_path(name)).expanduser().exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model.hub_id, "config.json", revision=model_cfg.revision)
        if not isinstance(cached, str):
            from transformers import Phi3Config

            from qlora_phi3.ui import info

            shape = KNOWN_SHAPES[model.hub_id]
            info(f"{name}: config.json not on this machine; using its published shapes (hidden "
                 f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']}/"
                 f"{shape['num_key_value_heads']} heads, vocabulary {shape['vocab_size']:,}"
                 f"{', tied embeddings' if shape['tie_word_embeddings'] else ''}).")
            return Phi3Config(**shape)
    return read_model_config(model_cfg)
