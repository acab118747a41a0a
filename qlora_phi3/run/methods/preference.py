"""What the preference methods (dpo, orpo, kto, simpo) share: data, TRL config keys, trainer plumbing, metrics.

Each method is TRL's own trainer (DPOTrainer, KTOTrainer, ORPOTrainer, CPOTrainer with ``loss_type="simpo"``),
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
from qlora_phi3.data.preference import encode_pairs, encode_unpaired, load_preference_splits, shuffled_for_kto
from qlora_phi3.errors import UserError
from qlora_phi3.run.methods.base import MethodData
from qlora_phi3.ui import info, plural, warn

__all__ = ["DEFAULT_BETA", "eval_fields", "load_preference_data", "drop_redundant_reference", "reward_metrics"]

DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
# TRL's metric names -> ours in run.json (start / end of training, on the held-out pairs)
_REWARD_KEYS = {"eval_rewards/accuracies": "eval_reward_accuracy", "eval_rewards/margins": "eval_reward_margin"}


def beta(recipe: Recipe) -> float:
    return recipe.train.beta if recipe.train.beta is not None else DEFAULT_BETA[recipe.train.method]


def load_preference_data(recipe: Recipe, tokenizer) -> MethodData:
    d, method = recipe.data, recipe.train.method
    splits = load_preference_splits(d, method, recipe.train.seed)
    report = splits.report
    if report.n_skipped:
        warn(f"skipped {report.n_skipped} of {report.total} records in {report.source}:")
        for line in report.summary_lines():
            info(f"  {line}")
    for note in report.notes + splits.notes:
        info(f"data: {note}")
    encode = encode_pairs if method != "kto" else encode_unpaired
    train = encode(splits.train, tokenizer, d.max_seq_len, d.max_prompt_len)
    held = encode(splits.eval, tokenizer, d.max_seq_len, d.max_prompt_len)
    if method == "kto":  # KTO trains in order (its KL term pairs neighbours): shuffle once, seeded
        train = shuffled_for_kto(train, recipe.train.seed)
    what = "pair" if method != "kto" else "labelled answer"
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
    dataset = {"kind": "pairs" if method != "kto" else "unpaired", "train_samples": train.n_rows,
               "eval_samples": held.n_rows, "train_tokens": train.n_tokens,
               "truncated": train.truncated + held.truncated, "dropped": train.dropped + held.dropped}
    return MethodData(train, held, splits.eval_chats, dataset)


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


def reward_metrics(metrics: dict) -> dict:
    return {ours: metrics[theirs] for theirs, ours in _REWARD_KEYS.items() if theirs in metrics}


def eval_fields(metrics: dict) -> dict:
    """run.json fields from an evaluation: held-out reward accuracy (share of pairs whose chosen answer gets the
    higher implicit reward) and mean margin."""
    return reward_metrics(metrics)


def print_rewards(metrics: dict, when: str) -> None:
    fields = reward_metrics(metrics)
    if fields:
        info(f"held-out reward accuracy {when}: {fields.get('eval_reward_accuracy', float('nan')):.1%}, margin "
             f"{fields.get('eval_reward_margin', float('nan')):+.4f}")
