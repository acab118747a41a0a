"""Offloaded checkpointing: layer inputs go through the host-memory hooks, gradients are unchanged."""

import pytest
import torch

from qlora_phi3.config import LoraSettings, ModelConfig
from qlora_phi3.model.lora import attach_lora
from qlora_phi3.model.load import load_model
from qlora_phi3.run.offload import checkpointing_kwargs, enable_checkpointing


def _lora_grads(mode, monkeypatch=None, packed_shapes=None):
    torch.manual_seed(0)
    model = load_model(ModelConfig(), "cpu", "float32", "sdpa")
    model = attach_lora(model, LoraSettings(dropout=0.0))
    base = model.get_base_model()
    if mode == "offload":
        import transformers.modeling_utils as mu

        # transformers' own offload path, with its save_on_cpu swapped for the recording one below.
        monkeypatch.setattr(mu, "save_on_cpu", _recording(torch.autograd.graph.save_on_cpu, packed_shapes))
        base.activation_checkpointing_enable({"use_reentrant": False}, offload=True)
    elif mode == "checkpoint":
        base.activation_checkpointing_enable({"use_reentrant": False}, offload=False)
    base.enable_input_require_grads()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()
    ids = torch.randint(3, 600, (2, 24), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, base.config


def _recording(real_save_on_cpu, packed_shapes):
    """A save_on_cpu stand-in: the real pack/unpack hooks (pinning off), recording each packed shape."""

    class Recording(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            inner = real_save_on_cpu(pin_memory=False, device_type=device_type)

            def pack(t):
                packed_shapes.append(tuple(t.shape))
                return inner.pack_hook(t)

            super().__init__(pack, inner.unpack_hook)

    return Recording


def test_offloaded_checkpointing_gradients_equal_plain_checkpointing(monkeypatch):
    shapes = []
    offloaded, config = _lora_grads("offload", monkeypatch, shapes)
    checkpointed, _ = _lora_grads("checkpoint")
    for name in checkpointed:
        torch.testing.assert_close(offloaded[name], checkpointed[name], rtol=1e-5, atol=1e-7, msg=name)
    # Each decoder layer's input (batch, seq, hidden) went through the offload hooks.
    layer_inputs = [s for s in shapes if s == (2, 24, config.hidden_size)]
    assert len(layer_inputs) >= config.num_hidden_layers


def test_offload_is_plain_checkpointing_on_cpu_and_offload_on_cuda(capsys):
    assert checkpointing_kwargs("offload", "cuda:0") == {"use_reentrant": False, "offload": True}
    assert checkpointing_kwargs(True, "cuda:0") == {"use_reentrant": False, "offload": False}
    assert checkpointing_kwargs(False, "cuda:0") is None
    assert checkpointing_kwargs("offload", "cpu", announce=True) == {"use_reentrant": False, "offload": False}
    assert "plain checkpointing" in capsys.readouterr().out


def test_offload_on_cpu_checkpoints_every_layer(capsys):
    model = load_model(ModelConfig(), "cpu", "float32", "sdpa")
    enable_checkpointing(model, "offload", "cpu")
    model = attach_lora(model, LoraSettings())
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert "gradient_checkpointing=offload" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_lowers_peak_gpu_memory():
    peaks = {}
    for mode in (True, "offload"):
        torch.cuda.empty_cache()
        model = load_model(ModelConfig(), "cuda:0", "bfloat16", "sdpa")
        enable_checkpointing(model, mode, "cuda:0")
        model = attach_lora(model, LoraSettings()).train()
        ids = torch.randint(3, 600, (4, 4096), device="cuda:0")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del model
    assert peaks["offload"] < peaks[True]
