"""The trainer every command steps through (run/methods/sft_trainer.py): the chunked loss runs under the same autocast as
the model's own forward, and real and padded tokens are counted."""

import contextlib

import pytest
import torch

from qlora_phi3.config import load_recipe, recipes_dir
from qlora_phi3.data.encode import encode_records
from qlora_phi3.data.split import load_splits
from qlora_phi3.model.load import load_model, load_tokenizer
from qlora_phi3.model.lora import attach_lora
from qlora_phi3.run.methods.base import MethodData
from qlora_phi3.run.methods.sft import build_trainer
from qlora_phi3.run.methods.sft import training_arguments as _sft_config

from conftest import cpu_dtype

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process


def _trainer(tmp_path, *overrides, dtype="bfloat16"):
    """A trainer on the tiny model. bf16 by default: the autocast path GPUs take, checked on every machine (a step or
    two, even where the CPU emulates bf16); ``dtype=cpu_dtype()`` for tests that train for longer."""
    recipe = load_recipe(recipes_dir() / "tiny_cpu.yaml", ["data.max_samples=24", "train.micro_batch_size=4",
                                                           "train.max_steps=1", "train.eval_steps=0",
                                                           "train.save_steps=0", f"train.output_dir={tmp_path}",
                                                           *overrides])
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe.data, recipe.train.seed)
    train_enc = encode_records(splits.train, tokenizer, recipe.data.max_seq_len)
    eval_enc = encode_records(splits.eval, tokenizer, recipe.data.max_seq_len)
    args = _sft_config(recipe, tmp_path, "cpu", dtype, measuring=False)
    model = attach_lora(load_model(recipe.model, "cpu", dtype, "sdpa"), recipe.lora)
    trainer, _, meter = build_trainer(model, tokenizer, args, MethodData(train_enc, eval_enc, splits.eval, {}), "cpu",
                                      recipe=recipe, measuring=False, cpu_memory="rss", callbacks=[])
    meter.close()
    return trainer


def _lora_dtypes(trainer) -> set:
    """The dtype of every LoRA A matmul's output during one real training step (the Trainer's own loop)."""
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
             for name, m in trainer.model.named_modules() if name.endswith("lora_A.default")]
    trainer.train()
    for h in hooks:
        h.remove()
    return seen


def test_lora_matmuls_run_in_the_compute_dtype_with_the_chunked_loss(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.loss_chunk_tokens > 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)  # fp32 masters
    assert _lora_dtypes(trainer) == {torch.bfloat16}


def test_same_path_with_the_plain_loss(tmp_path):
    assert _lora_dtypes(_trainer(tmp_path, "train.loss_chunk_tokens=0")) == {torch.bfloat16}


def test_real_and_padded_tokens_are_counted(tmp_path):
    trainer = _trainer(tmp_path)
    batches = []
    real_loss = trainer.compute_loss

    def recording(model, inputs, *a, **k):
        if model.training:
            batches.append({k: v.clone() for k, v in inputs.items()})
        return real_loss(model, inputs, *a, **k)

    trainer.compute_loss = recording
    trainer.train()
    assert len(batches) == 1
    assert trainer.tokens_real == int(batches[0]["attention_mask"].sum()) == trainer.state.num_input_tokens_seen
    assert trainer.tokens_total == batches[0]["input_ids"].numel() > trainer.tokens_real  # padded to the longest


def _per_token_eval_loss_by_hand(trainer) -> tuple[float, float]:
    """(mean loss per labelled token over the eval set, the Trainer's own row-weighted average of batch means),
    each eval conversation run alone through the model's own loss."""
    model, sums, counts = trainer.model.eval(), [], []
    rows = trainer.eval_dataset
    dtype = next(p.dtype for n, p in model.named_parameters() if "embed_tokens" in n)  # the compute dtype
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for ids, lab in zip(rows["input_ids"], rows["labels"]):
            n = sum(1 for t in lab[1:] if t != -100)
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab])).loss.float().item()
            sums.append(loss * n)
            counts.append(n)
    b = trainer.args.per_device_eval_batch_size
    batch_means = [sum(sums[i:i + b]) / sum(counts[i:i + b]) for i in range(0, len(sums), b)]
    weights = [len(sums[i:i + b]) for i in range(0, len(sums), b)]
    return sum(sums) / sum(counts), sum(m * w for m, w in zip(batch_means, weights)) / sum(weights)


def test_eval_loss_is_per_assistant_token_and_the_same_with_packing(tmp_path):
    """Eval conversations carry different numbers of answer tokens; the eval loss is the mean over all of them
    (not the Trainer's average of batch means), on both loss paths, and packing the training data changes
    nothing about it. A few real steps first, so that some answers are learned and others not yet. In the dtype
    this CPU trains in: 40 steps of emulated bf16 took 136 s under the AVX2 stand-in
    (the 2-core Xeon with avx512_bf16 held to AVX2 kernels)."""
    common = ("data.max_samples=200", "train.max_steps=40", "train.lr=6e-3")
    packed = _trainer(tmp_path / "packed", "data.packing=true", *common, dtype=cpu_dtype())
    packed.train()
    losses = {("packed", "chunked"): packed.evaluate()["eval_loss"]}
    packed.loss_chunk_tokens = 0
    losses["packed", "SFTTrainer's"] = packed.evaluate()["eval_loss"]
    unpacked = _trainer(tmp_path / "unpacked", "data.packing=false", *common, dtype=cpu_dtype())
    trained = {k: v for k, v in packed.model.state_dict().items() if "lora_" in k}
    assert not unpacked.model.load_state_dict(trained, strict=False).unexpected_keys
    losses["unpacked", "chunked"] = unpacked.evaluate()["eval_loss"]
    per_token, row_weighted = _per_token_eval_loss_by_hand(unpacked)
    gap = abs(per_token - row_weighted)
    assert gap > 0.01 * per_token  # the data tells the two apart
    for key, loss in losses.items():
        assert abs(loss - per_token) < 0.1 * gap, (key, loss, per_token, row_weighted)
