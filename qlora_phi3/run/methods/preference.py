"""What the preference methods (dpo, orpo, kto, simpo) share: data, TRL config keys, the trainers with a reference.

Each method is TRL's own trainer (DPOTrainer, KTOTrainer, ORPOTrainer, CPOTrainer in its SimPO loss),
subclassed only where TRL cannot do what a small card needs, each time for the reason given at the override:

* the data arrive tokenized by :mod:`qlora_phi3.data.preference` (Phi-3's template, the same answer span as SFT,
  truncation counted and validated before the model loads), so TRL's own tokenization is skipped;
* answer log-probs come from :mod:`qlora_phi3.run.logprobs` (label-only, 256 positions at a time), not from TRL's
  4,096-position tiles (DPO, KTO) or full logits (ORPO, SimPO); ``train.loss_chunk_tokens=0`` gives TRL's own;
* checkpoints are atomic (:mod:`qlora_phi3.run.checkpoints`), LoRA weights stay fp32, tokens are counted.

The reference policy of dpo and kto is the 4-bit base with the adapter switched off (TRL's PEFT path): no second
model. TRL adds a frozen copy of the adapter under the name "ref" whenever the model it gets is already a PEFT
model; that copy is the reference only when the adapter did not start at zero (``model.adapter`` continues a
trained one; OLoRA / LoftQ initialisations). A fresh zero-started adapter has base == start policy, so the copy is
deleted and saves a second set of LoRA weights.
"""

from __future__ import annotations

from qlora_phi3.config import Recipe
from qlora_phi3.data.preference import (encode_pairs, encode_unpaired, eval_chats, load_preference_splits,
                                        shuffled_for_kto)
from qlora_phi3.errors import UserError
from qlora_phi3.methods import METHODS
from qlora_phi3.run.methods.base import MethodData, TokenCounting, build_method_trainer, report_splits
from qlora_phi3.ui import info, plural, warn

__all__ = ["beta", "build_reference_trainer", "drop_redundant_reference", "load_preference_data",
           "preference_arguments", "reference_trainer_class"]


def beta(recipe: Recipe) -> float:
    return recipe.train.beta if recipe.train.beta is not None else METHODS[recipe.train.method].default_beta


def load_preference_data(recipe: Recipe, tokenizer, records=None) -> MethodData:
    d, method = recipe.data, METHODS[recipe.train.method]
    splits = load_preference_splits(d, method.name, recipe.train.seed, records)
    report_splits(splits)
    paired = method.data == "pairs"
    encode = encode_pairs if paired else encode_unpaired
    train = encode(splits.train, tokenizer, d.max_seq_len, d.max_prompt_len)
    held = encode(splits.eval, tokenizer, d.max_seq_len, d.max_prompt_len)
    if method.kl_rows_per_sample:  # KTO trains in order (its KL term pairs neighbours): shuffle once, seeded
        train = shuffled_for_kto(train, recipe.train.seed)
    what = "pair" if paired else "labelled answer"
    for name, enc in (("train", train), ("eval", held)):
        if not enc.n_rows:
            raise UserError(f"no {name} {what} keeps an answer token within data.max_seq_len={d.max_seq_len} "
                            f"(every prompt fills it); raise data.max_seq_len or set data.max_prompt_len.")
        if enc.truncated or enc.dropped or enc.prompt_cut:
            warn(f"{name}: {enc.truncated} {what}s cut to data.max_seq_len={d.max_seq_len} ({enc.answer_tokens_lost:,} "
                 f"answer tokens lost), {enc.prompt_cut} prompts cut to data.max_prompt_len={d.max_prompt_len}, "
                 f"{enc.dropped} dropped (the prompt alone fills data.max_seq_len).")
    info(f"data: {plural(train.n_rows, 'train ' + what)} / {held.n_rows:,} eval ({splits.eval_from}), "
         f"{train.n_tokens:,} train tokens ({train.n_label_tokens:,} answer tokens with loss)")
    dataset = {"kind": method.data, "train_samples": train.n_rows,
               "eval_samples": held.n_rows, "train_tokens": train.n_tokens,
               "truncated": train.truncated + held.truncated, "dropped": train.dropped + held.dropped}
    return MethodData(train, held, eval_chats(splits.eval), dataset)


def preference_arguments(recipe: Recipe) -> dict:
    """TRL config keys the preference trainers share, beyond TrainingArguments'."""
    return dict(
        beta=beta(recipe),
        max_length=None,  # already cut (and counted) in data.preference
        disable_dropout=False,  # lora.dropout is the recipe's choice, as for SFT
        include_num_input_tokens_seen="no",  # counted by methods.base.TokenCounting
    )


def drop_redundant_reference(model, recipe: Recipe) -> str:
    """Delete TRL's "ref" adapter copy when the adapter started at zero (module docstring); say what the reference
    is. Returns the description that run.json records."""
    from qlora_phi3.model.lora import CONVERTED_INITS

    if "ref" not in getattr(model, "peft_config", {}):
        return "base model, adapter disabled"
    if recipe.model.adapter:
        return f"frozen copy of the starting adapter {recipe.model.adapter} (TRL's 'ref' adapter)"
    if recipe.lora.init in CONVERTED_INITS:
        return f"frozen copy of the {recipe.lora.init}-initialised adapter (TRL's 'ref' adapter)"
    model.delete_adapter("ref")
    model.set_adapter("default")
    return "base model, adapter disabled"


def reference_trainer_class(base):
    """``base`` (DPOTrainer or KTOTrainer: the methods with a reference policy, scored through TRL's fused head) with
    label-only log-probs, atomic checkpoints, our model card and token counts. The method's subclass adds its
    ``_prepare_dataset``."""
    from qlora_phi3.run.card import ModelCardMixin
    from qlora_phi3.run.checkpoints import AtomicCheckpoints
    from qlora_phi3.run.internals import check_trainer_internals
    from qlora_phi3.run.logprobs import install_label_logprobs

    class ReferenceTrainer(TokenCounting, ModelCardMixin, AtomicCheckpoints, base):
        def __init__(self, *args, loss_chunk_tokens: int = 256, **kwargs):
            check_trainer_internals(base)
            super().__init__(*args, **kwargs)
            if loss_chunk_tokens:  # 0 = TRL's fused head (4,096-position tiles), for comparison
                install_label_logprobs(self.model.get_base_model(), loss_chunk_tokens)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._count_tokens(model, inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return ReferenceTrainer


def build_reference_trainer(trainer_cls, model, tokenizer, args, data: MethodData, device: str, **kwargs):
    """A DPO or KTO trainer, with ``trainer.reference`` saying what its reference policy is."""
    return build_method_trainer(trainer_cls, model, tokenizer, args, data, device, **kwargs,
                                reference=lambda m: drop_redundant_reference(m, kwargs["recipe"]))
