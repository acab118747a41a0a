"""Sequence tiling: the token-wise parts of every Phi-3 decoder layer, ``train.tile_tokens`` tokens at a time.

With gradient checkpointing a layer keeps only its input, and in backward it recomputes its whole
forward: for that moment every intermediate of the layer exists for the whole sequence at once (the
fp32 norm inputs, the fused qkv output, the 2 x 8192-wide gate_up output and its SiLU product, every
LoRA input: ~227 KB per token on Phi-3-mini, 15 GB at 64k tokens). Only attention needs the whole
sequence, and flash-attn / sdpa's kernels are already linear in it. So each decoder layer runs as

    A  per tile:  x -> RMSNorm -> qkv_proj (+LoRA) -> heads -> RoPE              => q, k, v (whole sequence)
       attention over the whole sequence (transformers' own attention function, mask and kwargs)
    B  per tile:  attn, x -> o_proj (+LoRA) + x -> RMSNorm -> gate_up (+LoRA) -> SiLU * up
                  -> down_proj (+LoRA) + residual                                => the layer's output

and each tile of A and B runs under ``torch.utils.checkpoint`` (non-reentrant, nested inside the
layer's own checkpoint). Autograd then keeps only each tile's inputs (views of tensors that exist
anyway); a tile's intermediates exist one tile at a time: in the forward, in the layer's recompute and
in the tile's own recompute in backward. What stays whole-sequence is what attention itself needs
(q, k, v, its output and logsumexp) and the segment outputs. Cost: A and B are computed once more per
step (three forwards instead of two under checkpointing); see bench/results/cpu_long_context.md.

Sequences of at most ``tile_tokens`` tokens, and calls with a KV cache (generation), take
transformers' own forward unchanged. Tiling changes no result: tests/unit/run/test_tiling.py checks that losses
and LoRA gradients equal the untiled ones (4-bit base, sdpa and eager, packed rows).

Why by hand: transformers' ``Phi3DecoderLayer`` runs each sublayer over the whole sequence and has no
tiling option; PEFT and TRL have none either; DeepSpeed's sequence-parallel ``TiledMLP`` tiles the MLP
only (not the norms and attention projections) and brings DeepSpeed with it. The layer body below
mirrors ``Phi3DecoderLayer.forward`` and ``Phi3Attention.forward`` of transformers 5.25 (their source digests
are registered in run/internals.py, so an upstream edit fails a test by name); the
gradient-equality tests compare it with them, so a change upstream fails a test rather than training
a different model.
"""

from __future__ import annotations

from functools import partial

from qlora_phi3.errors import UserError

__all__ = ["MIN_TILE_TOKENS", "disable_tiling", "enable_tiling"]

MIN_TILE_TOKENS = 16  # below this the per-tile overhead (kernel launches, bnb dequantization) dominates

_TILED_CLASSES: dict[type, type] = {}


def _decoder_layers(model):
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    return [m for m in model.modules() if isinstance(m, Phi3DecoderLayer)]


def _tiled_class(cls: type) -> type:
    """A subclass of the model's decoder layer class whose forward is tiled. transformers'
    ``GradientCheckpointingLayer.__init_subclass__`` wraps its forward in the model's checkpoint function,
    exactly as it wraps the original, so offloaded checkpointing keeps working."""
    if cls not in _TILED_CLASSES:
        _TILED_CLASSES[cls] = type(f"Tiled{cls.__name__}", (cls,), {"forward": _tiled_forward, "_qlora_untiled": cls})
    return _TILED_CLASSES[cls]


def enable_tiling(model, tile_tokens: int) -> int:
    """Tile every Phi-3 decoder layer of ``model`` (PEFT-wrapped or not) by ``tile_tokens`` tokens; 0 = off.

    Returns the number of layers tiled. Call after LoRA is attached (the tiles call the LoRA-wrapped
    projections as they are found at run time, so the order does not change the result, only the intent)."""
    if not tile_tokens:
        return 0
    if tile_tokens < MIN_TILE_TOKENS:
        raise UserError(f"train.tile_tokens={tile_tokens}: use 0 (off) or at least {MIN_TILE_TOKENS} tokens.")
    layers = _decoder_layers(model)
    if not layers:
        raise UserError("train.tile_tokens is set but the model has no Phi-3 decoder layers to tile; "
                        "set train.tile_tokens=0.")
    for layer in layers:
        untiled = getattr(type(layer), "_qlora_untiled", type(layer))
        layer.__class__ = _tiled_class(untiled)
        layer._qlora_tile_tokens = int(tile_tokens)
    return len(layers)


def disable_tiling(model) -> None:
    """Back to transformers' own decoder layers."""
    for layer in _decoder_layers(model):
        untiled = getattr(type(layer), "_qlora_untiled", None)
        if untiled is not None:
            layer.__class__ = untiled
            del layer._qlora_tile_tokens


def _tiled_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                   position_embeddings=None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import eager_attention_forward

    tile = self._qlora_tile_tokens
    if hidden_states.shape[1] <= tile or cache is not None or position_embeddings is None:
        return self._qlora_untiled.forward(self, hidden_states, attention_mask=attention_mask,
                                           position_ids=position_ids, cache=cache, use_cache=use_cache,
                                           position_embeddings=position_embeddings, **kwargs)
    attn = self.self_attn
    cos, sin = position_embeddings
    q, k, v = _run_tiles(partial(_attention_inputs, self), tile, (hidden_states, cos, sin))
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    attn_output, _ = interface(attn, q, k, v, attention_mask,
                               dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling,
                               sliding_window=getattr(attn.config, "sliding_window", None),
                               position_ids=position_ids, use_cache=use_cache, **kwargs)
    del q, k, v
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
    (out,) = _run_tiles(partial(_attention_output_and_mlp, self), tile, (attn_output, hidden_states))
    return out


def _attention_inputs(layer, x, cos, sin):
    """Segment A on one tile: RMSNorm, fused qkv projection (with its LoRA), heads, RoPE."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    qkv = attn.qkv_proj(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q_end = attn.config.num_attention_heads * attn.head_dim
    k_end = q_end + attn.num_key_value_heads * attn.head_dim
    q = qkv[..., :q_end].view(shape).transpose(1, 2)
    k = qkv[..., q_end:k_end].view(shape).transpose(1, 2)
    # v is a view of the whole qkv tile: a copy lets that tile be freed before the next one is computed.
    v = qkv[..., k_end:].view(shape).transpose(1, 2).contiguous()
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _attention_output_and_mlp(layer, attn_output, residual):
    """Segment B on one tile: o_proj and the residual, RMSNorm, the MLP (with LoRA) and its residual."""
    x = residual + layer.resid_attn_dropout(layer.self_attn.o_proj(attn_output))
    return x + layer.resid_mlp_dropout(layer.mlp(layer.post_attention_layernorm(x)))


def _run_tiles(fn, tile: int, args: tuple) -> tuple:
    """``fn`` over tiles of ``tile`` tokens (dim 1 of every arg; dim 2 of 4-D outputs, which are per head).

    ``split`` (not slicing) so that backward assembles each input's gradient once, not one full-size
    zero-padded gradient per tile; ``cat`` backward hands each tile a view of the output gradient."""
    import torch
    from torch.utils.checkpoint import checkpoint

    outs = []
    for parts in zip(*(a.split(tile, dim=1) for a in args)):
        if torch.is_grad_enabled():
            out = checkpoint(fn, *parts, use_reentrant=False)
        else:  # eval: no backward, only the transient intermediates shrink
            out = fn(*parts)
        outs.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(pieces, dim=2 if pieces[0].dim() == 4 else 1) for pieces in zip(*outs))
