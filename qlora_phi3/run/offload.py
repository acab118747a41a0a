"""Activation checkpointing, optionally with the saved layer inputs offloaded to pinned CPU memory.

With full checkpointing each decoder layer keeps only its input for the recompute:
2 bytes x seq x hidden x layers, i.e. 2 x 2048 x 3072 x 32 = 0.40 GB at 2k tokens on Phi-3-mini and
6.4 GB at 32k. ``train.gradient_checkpointing: offload`` moves those inputs to pinned host memory
in the forward and brings each back for its layer's recompute in backward (a device-to-host and a
host-to-device copy per layer, so the step is somewhat slower).

transformers 5 implements this (``activation_checkpointing_enable(offload=True)`` wraps every
layer's ``checkpoint`` in ``torch.autograd.graph.save_on_cpu(pin_memory=True)``); we only decide when
to ask for it. On a CPU there is nothing to offload to (and pinned memory needs an accelerator), so
``offload`` there is plain checkpointing, said once.
"""

from __future__ import annotations

from qlora_phi3.ui import info

__all__ = ["checkpointing_kwargs", "enable_checkpointing"]


def checkpointing_kwargs(mode: bool | str, device: str, announce: bool = False) -> dict | None:
    """``activation_checkpointing_kwargs`` for transformers (``offload`` included), or None when off."""
    if not mode:
        return None
    offload = mode == "offload"
    if offload and not device.startswith("cuda"):
        if announce:
            info("train.gradient_checkpointing=offload: on the CPU the layer inputs already live in host memory; "
                 "using plain checkpointing.")
        offload = False
    # Non-reentrant: reentrant checkpointing fails on a frozen base ("does not require grad").
    return {"use_reentrant": False, "offload": offload}


def enable_checkpointing(model, mode: bool | str, device: str) -> None:
    """Turn on (offloaded) activation checkpointing on a transformers model, before PEFT wraps it."""
    kwargs = checkpointing_kwargs(mode, device, announce=True)
    if kwargs is None:
        return
    kwargs = dict(kwargs)
    offload = kwargs.pop("offload")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    model.enable_input_require_grads()
