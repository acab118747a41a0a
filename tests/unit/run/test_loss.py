"""Chunked cross-entropy: same loss and same LoRA gradients as the model's plain loss, without full logits."""

import pytest
import torch

from qlora_phi3.run.loss import chunked_causal_lm_loss, model_loss

from conftest import tiny_lora_model


@pytest.fixture(scope="module")
def peft_model():
    return tiny_lora_model(checkpointing=True)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 600, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt without loss
    labels[1, 30:] = -100  # right padding
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_tokens", [7, 256])
def test_loss_and_lora_grads_equal_plain_loss(peft_model, chunk_tokens):
    batch = _batch()
    peft_model.zero_grad()
    plain = peft_model(**batch).loss
    plain.backward()
    expected = _grads(peft_model)
    peft_model.zero_grad()
    chunked = model_loss(peft_model, batch, chunk_tokens)
    chunked.backward()
    got = _grads(peft_model)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert len(got) == len(expected) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_num_items_in_batch_divides_the_sum(peft_model):
    batch = _batch()
    with torch.no_grad():
        mean = model_loss(peft_model, batch, 16)
        n_labelled = int((batch["labels"][:, 1:] != -100).sum())
        summed = model_loss(peft_model, batch, 16, num_items_in_batch=1)
    assert summed.item() == pytest.approx(mean.item() * n_labelled, rel=1e-5)


def test_never_builds_full_logits():
    """The largest float tensor alive in forward and backward is one chunk of logits, not seq x vocab."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, hidden, seq, chunk = 5000, 32, 300, 50
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(1, seq, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq))
    largest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == vocab:
                    largest.append(t.shape[0])
            return out

    with Watch():
        loss = chunked_causal_lm_loss(h, head, labels, chunk)
        loss.backward()
    assert largest and max(largest) <= chunk < seq
    expected = torch.nn.functional.cross_entropy(head(h)[0, :-1], labels[0, 1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_batch_without_labels_gives_zero_that_backpropagates(peft_model):
    batch = _batch()
    batch["labels"][:] = -100
    loss = model_loss(peft_model, batch, 16)
    loss.backward()
    assert loss.item() == 0.0
