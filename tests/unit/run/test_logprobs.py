"""The preference methods' answer log-probs (run/logprobs.py, run/methods/pairwise.py) equal TRL's own, which
``train.loss_chunk_tokens=0`` keeps: the same values and the same LoRA gradients, without the full logits."""

import pytest
import torch

from qlora_phi3.run.logprobs import install_label_logprobs

from conftest import tiny_lora_model


def _peft_model():
    return tiny_lora_model()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 600, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100  # the prompt
    labels[1, 30:] = -100  # right padding
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _assert_grads_close(got: dict, want: dict) -> None:
    """Same LoRA gradients up to fp32 rounding, which grows with the gradient's size (sums over ~80 tokens)."""
    assert len(got) == len(want) > 0
    for name, expected in want.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def _scored(model, batch):
    """The fused-head call DPOTrainer and KTOTrainer make, its outputs and the LoRA gradients of its log-probs."""
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    (out.log_probs.sum() + out.loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def test_label_logprobs_equal_trls_fused_head():
    from trl.trainer.utils import add_fused_lm_head

    model, batch = _peft_model(), _batch()
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    theirs, their_grads = _scored(model, batch)  # train.loss_chunk_tokens=0: TRL's own head
    install_label_logprobs(model.get_base_model(), chunk_tokens=7)  # what the trainers install otherwise
    ours, our_grads = _scored(model, batch)

    mask = theirs.label_mask
    assert torch.equal(ours.label_mask, mask) and mask.sum() > 0
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    for field in ("entropy", "mean_logits"):  # logged only
        torch.testing.assert_close(getattr(ours, field)[mask], getattr(theirs, field)[mask], rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.is_top1[mask], theirs.is_top1[mask])
    _assert_grads_close(our_grads, their_grads)


@pytest.mark.slow  # builds a TRL trainer: ~10 s each on 2 cores
@pytest.mark.parametrize("base_name", ["ORPOTrainer", "CPOTrainer"])
def test_pairwise_scores_equal_trls_concatenated_forward(base_name, tmp_path):
    """ORPO's and SimPO's per-answer scores (mean answer-token log-prob) from our label-only forward equal TRL's
    from the full logits, values and LoRA gradients. (The SFT term differs on purpose: ours counts answer tokens.)"""
    import trl.experimental.cpo as cpo
    import trl.experimental.orpo as orpo
    from datasets import Dataset
    from transformers import AutoTokenizer

    from qlora_phi3.model.tiny import TINY_MODEL_DIR
    from qlora_phi3.run.methods.pairwise import pairwise_trainer_class

    base = {"ORPOTrainer": orpo.ORPOTrainer, "CPOTrainer": cpo.CPOTrainer}[base_name]
    config_cls = {"ORPOTrainer": orpo.ORPOConfig, "CPOTrainer": cpo.CPOConfig}[base_name]
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.pad_token = "<unk>"

    g = torch.Generator().manual_seed(2)
    rows = {"prompt_ids": [torch.randint(3, 600, (n,), generator=g).tolist() for n in (9, 14)],
            "chosen_ids": [torch.randint(3, 600, (n,), generator=g).tolist() for n in (11, 6)],
            "rejected_ids": [torch.randint(3, 600, (n,), generator=g).tolist() for n in (5, 13)]}
    simpo = {"loss_type": "simpo", "cpo_alpha": 0.0} if base_name == "CPOTrainer" else {}  # as run/methods/simpo.py
    args = config_cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=None,
                      per_device_train_batch_size=2, remove_unused_columns=False, dataset_num_proc=None, **simpo)
    trainer = pairwise_trainer_class(base)(model=_peft_model(), args=args, train_dataset=Dataset.from_dict(rows),
                                           processing_class=tokenizer, loss_chunk_tokens=7)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model

    def scores(chunk_tokens):
        trainer.loss_chunk_tokens = chunk_tokens
        model.zero_grad()
        chosen, rejected, *_ = trainer.concatenated_forward(model, batch)
        (chosen - rejected).sum().backward()
        return chosen.detach(), rejected.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.requires_grad}

    *theirs, their_grads = scores(0)
    *ours, our_grads = scores(7)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_grads_close(our_grads, their_grads)
