"""GRPO: group-relative policy optimisation with verifiable rewards (TRL's GRPOTrainer), on the 4-bit base + LoRA.

Each step samples ``train.num_generations`` completions per prompt with transformers' ``generate``, the adapter
active (never merged into the 4-bit base), or with a colocated vLLM engine fed the adapter as a LoRA
(``train.generator=vllm``, :mod:`qlora_phi3.run.vllm_lora`), scores them with the recipe's reward functions
(:mod:`qlora_phi3.run.rewards`, tried on a sample record before the model loads) and pushes the policy towards the
completions that beat their group's mean. ``train.beta`` > 0 adds a KL term to a reference: the 4-bit base with the
adapter off, or a frozen copy of ``model.adapter`` when training continues one (as for DPO,
:mod:`qlora_phi3.run.methods.preference`); beta 0 (the default, as TRL's) has no reference forward at all.

Batch sizes count completions, as in TRL: ``train.micro_batch_size`` completions per forward, and one generation
round covers ``micro_batch_size x grad_accum`` completions, i.e. that many / ``num_generations`` prompts.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.data.prompts import (PromptRecord, answer_chats, drop_long_prompts, eval_from, load_prompt_splits,
                                     prompt_limit)
from qlora_phi3.errors import UserError
from qlora_phi3.run.methods.base import MethodData, build_method_trainer, common_arguments, eval_fields_of, report_splits
from qlora_phi3.run.methods.preference import beta, drop_redundant_reference
from qlora_phi3.run.rewards import load_rewards, try_rewards
from qlora_phi3.ui import info, plural

__all__ = ["GRPOData", "PromptSet", "build_trainer", "check_rewards", "eval_fields", "load_data",
           "training_arguments"]

# The held-out mean reward of sampled completions, its spread and their length (the methods table's metrics).
eval_fields = eval_fields_of(__name__)


@dataclass
class GRPOData(MethodData):
    rewards: list = field(default_factory=list)  # run.rewards.Reward, loaded and tried before the model


class PromptSet:
    """Prompt records as GRPOTrainer reads them (``prompt`` plus the reward columns), with their token counts."""

    def __init__(self, records: list[PromptRecord], lengths: list[int]):
        self.records, self.lengths = records, lengths

    @property
    def n_rows(self) -> int:
        return len(self.records)

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    def fingerprint(self) -> str:
        import hashlib

        text = json.dumps([[r.prompt, r.columns] for r in self.records], ensure_ascii=False, sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_list([{"prompt": r.prompt, **r.columns} for r in self.records])


def _sample_completions(record: PromptRecord, tokenizer, column: str) -> tuple[list, list[list[int]]]:
    """Two completions of the shape TRL hands rewards (messages for chat prompts, text otherwise): an empty one and
    one with a reasoning block and the record's answer column, so a reward sees both a miss and a plausible hit."""
    texts = ["", f"<think>\nLet me work it out.\n</think>\n{record.columns.get(column, 'The answer is 42.')}"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if isinstance(record.prompt, list):
        return [[{"role": "assistant", "content": t}] for t in texts], ids
    return texts, ids


def check_rewards(recipe: Recipe, record: PromptRecord, tokenizer):
    """Import every reward and call it once on ``record`` as TRL will (before the model loads); the loaded ones."""
    t = recipe.train
    rewards = load_rewards(t.rewards, t.reward_weights, t.numeric_tolerance, t.answer_column)
    completions, ids = _sample_completions(record, tokenizer, t.answer_column)
    columns = {k: [v] * len(completions) for k, v in record.columns.items()}
    try_rewards(rewards, [record.prompt] * len(completions), completions, ids, columns, record.origin)
    return rewards


def load_data(recipe: Recipe, tokenizer, records=None) -> MethodData:
    d, t = recipe.data, recipe.train
    splits = load_prompt_splits(d, t.seed, records)
    limit = prompt_limit(d, t.max_completion_len)
    train, train_lengths = drop_long_prompts(d, splits.report, splits.train, tokenizer, limit)
    held, held_lengths = drop_long_prompts(d, splits.report, splits.eval, tokenizer, limit)
    report_splits(splits)
    rewards = check_rewards(recipe, train[0], tokenizer)
    info(f"rewards: {', '.join(f'{r.spec} (x{r.weight:g})' for r in rewards)}; tried on {train[0].origin}")
    info(f"data: {plural(len(train), 'train prompt')} / {len(held):,} eval ({eval_from(splits, held)}); "
         f"{t.num_generations} completions of up to {t.max_completion_len} tokens each; reward columns: "
         f"{', '.join(sorted(train[0].columns)) or '(none)'}")
    train_set, eval_set = PromptSet(train, train_lengths), PromptSet(held, held_lengths)
    # Sample answers (train.sample_prompts) show the answer column as the reference.
    eval_chats = answer_chats(held, t.answer_column)
    dataset = {"kind": "prompts", "train_samples": len(train), "eval_samples": len(held),
               "train_tokens": train_set.n_tokens, "rewards": [r.spec for r in rewards],
               "reward_weights": [r.weight for r in rewards]}
    return GRPOData(train_set, eval_set, eval_chats, dataset, rewards=rewards)


def training_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool):
    from trl import GRPOConfig

    t = recipe.train
    args = common_arguments(recipe, output_dir, device, compute_dtype, measuring)
    del args["dataset_num_proc"]  # GRPOConfig has none: prompts are tokenized as they are sampled
    group = t.num_generations
    args["per_device_eval_batch_size"] = group * -(-t.micro_batch_size // group)  # whole groups per eval batch
    if measuring:  # profile and benchmarks measure the worst case: every completion runs to max_completion_len
        args["generation_kwargs"] = {"min_new_tokens": t.max_completion_len}
    vllm = {}
    if t.samples_with_vllm:
        from qlora_phi3.run.vllm_lora import check_vllm_here, vllm_arguments

        if measuring:
            raise UserError("train.generator=vllm: profile and the benchmarks measure generation with transformers "
                            "in the training process; vLLM's memory is its own (train.vllm_gib). Measure the "
                            "training side with train.generator=transformers.")
        check_vllm_here(device)
        vllm = vllm_arguments(recipe)
    return GRPOConfig(**args, **vllm, beta=beta(recipe), num_generations=group,
                      max_completion_length=t.max_completion_len,
                      temperature=t.temperature, top_p=t.top_p, reward_weights=t.reward_weights,
                      disable_dropout=False,  # lora.dropout is the recipe's choice, as for SFT
                      log_completions=False,  # our samples.jsonl instead of TRL's rich tables and parquet files
                      pad_to_multiple_of=None)


def _trainer_class():
    from trl import GRPOTrainer

    from qlora_phi3.run.card import ModelCardMixin
    from qlora_phi3.run.checkpoints import AtomicCheckpoints
    from qlora_phi3.run.internals import check_trainer_internals
    from qlora_phi3.run.logprobs import install_label_logprobs
    from qlora_phi3.run.vllm_lora import lora_only_sync

    class QLoraGRPOTrainer(ModelCardMixin, AtomicCheckpoints, GRPOTrainer):
        def __init__(self, *args, loss_chunk_tokens: int = 256, **kwargs):
            check_trainer_internals(GRPOTrainer)
            # train.generator=vllm: TRL's engine, fed the adapter as a LoRA instead of merging it (run/vllm_lora.py)
            with lora_only_sync() if kwargs["args"].use_vllm else nullcontext():
                super().__init__(*args, **kwargs)
            if loss_chunk_tokens:  # label-only log-probs of the completions, as for DPO; 0 = TRL's fused head
                install_label_logprobs(self.model.get_base_model(), loss_chunk_tokens, self.args.temperature)

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:  # TRL counts prompt + completion tokens in num_input_tokens_seen
                real = int(out["completion_mask"].sum()) + int(out["prompt_mask"].sum())
                self.tokens_real = getattr(self, "tokens_real", 0) + real
                self.tokens_total = getattr(self, "tokens_total", 0) + out["prompt_ids"].numel() + \
                    out["completion_ids"].numel()
            return out

    return QLoraGRPOTrainer


def _reference(model, recipe: Recipe) -> str:
    if beta(recipe) == 0:  # the table's default (TRL's): no KL term, so no reference forward
        return "none (train.beta=0: no KL term)"
    return drop_redundant_reference(model, recipe)


def build_trainer(model, tokenizer, args, data: MethodData, device: str, **kwargs):
    from qlora_phi3.run.grpo_samples import CompletionSamples

    recipe = kwargs["recipe"]
    trainer, progress, meter = build_method_trainer(
        _trainer_class(), model, tokenizer, args, data, device, **kwargs,
        reference=lambda m: _reference(m, recipe), reward_funcs=[r.func for r in data.rewards])
    if not kwargs["measuring"]:
        trainer.add_callback(CompletionSamples(trainer, Path(args.output_dir)))
    return trainer, progress, meter
