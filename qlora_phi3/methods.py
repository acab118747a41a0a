"""The training methods as data: one entry per value of ``train.method``.

Everything outside a method's own module that depends on the method asks this table: the recipe schema (the
allowed values and the micro-batch floor), the memory estimator (rows and forwards per sample), ``qlora-phi3
data`` and the eval split (which kind of data it reads), ``profile`` (which data to generate) and run.json (which
evaluation metrics it records). The method's trainer lives in ``module`` (under :mod:`qlora_phi3.run.methods`),
named here as a string and imported only when a run needs it: this table sits in the core layer, below data,
memory and run, and must stay import-free.

Adding a method is one entry here and one module that conforms to
:class:`qlora_phi3.run.methods.MethodModule` (docs/layout.md walks through it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATA_KINDS", "DEFAULT_METHOD", "METHODS", "Method", "method_names", "methods_reading"]

# What a method trains on (docs/preference.md has the record formats):
# chat: conversations; pairs: a prompt with a chosen and a rejected answer; unpaired: a prompt with one answer
# labelled desirable or not; prompts: prompts alone, answered by the policy during training.
DATA_KINDS = ("chat", "pairs", "unpaired", "prompts")

# TRL's evaluation metric names -> ours in run.json (start and end of training, on the held-out records)
_REWARD_METRICS = (("eval_rewards/accuracies", "eval_reward_accuracy"), ("eval_rewards/margins", "eval_reward_margin"))


@dataclass(frozen=True)
class Method:
    """One training method, as the layers below its trainer need to know it.

    rows_per_sample: rows one sample becomes in a forward (a pair: a chosen and a rejected row).
    reference_forward: a no-grad forward of the same rows with the adapter off, unless the reference log-probs are
        precomputed (``train.precompute_ref_log_probs``).
    kl_rows_per_sample: rows of mismatched answers forwarded without gradient, by the policy and the reference.
    default_beta: ``train.beta`` when the recipe leaves it null (None: the method has no beta).
    min_micro_batch: the smallest ``train.micro_batch_size`` the method can train with, and why (``min_reason``).
    metrics: (the trainer's evaluation metric, our run.json field) pairs recorded at the start and end of training.
    generates: samples its own completions before each step (the estimator adds generation's KV cache and
        sampling logits); its reference forward runs only when ``train.beta`` > 0; only completion positions are
        scored.
    tiled_trl_head: at ``train.loss_chunk_tokens=0`` TRL's trainer scores with its tiled log-prob head
        (``add_fused_lm_head``: tiles of at most 4,096 positions x 32,768 vocabulary columns) rather than the full
        logits (ORPO's and SimPO's CPOTrainer take ``.logits``).
    module: the dotted name of the method's module (:class:`qlora_phi3.run.methods.MethodModule`).
    """
    name: str
    data: str  # one of DATA_KINDS
    module: str
    rows_per_sample: int = 1
    reference_forward: bool = False
    kl_rows_per_sample: int = 0
    default_beta: float | None = None
    min_micro_batch: int = 1
    min_reason: str = ""
    metrics: tuple[tuple[str, str], ...] = ()
    generates: bool = False
    tiled_trl_head: bool = True

    @property
    def preference(self) -> bool:
        """Trained on preference records (pairs or labelled answers), not on chats."""
        return self.data in ("pairs", "unpaired")

    @property
    def packs(self) -> bool:
        """Whether ``data.packing`` applies: chats pack; a preference row is scored on its own, never packed."""
        return self.data == "chat"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "chat", "qlora_phi3.run.methods.sft"),
    Method("dpo", "pairs", "qlora_phi3.run.methods.dpo", rows_per_sample=2, reference_forward=True,
           default_beta=0.1, metrics=_REWARD_METRICS),
    Method("orpo", "pairs", "qlora_phi3.run.methods.orpo", rows_per_sample=2, default_beta=0.1,
           metrics=_REWARD_METRICS, tiled_trl_head=False),
    Method("kto", "unpaired", "qlora_phi3.run.methods.kto", reference_forward=True, kl_rows_per_sample=1,
           default_beta=0.1, min_micro_batch=2, metrics=_REWARD_METRICS,
           min_reason="KTO estimates its KL term from the other answers of the same micro-batch (with 1 it would "
                      "equal the reward itself)"),
    Method("simpo", "pairs", "qlora_phi3.run.methods.simpo", rows_per_sample=2, default_beta=2.0,
           metrics=_REWARD_METRICS, tiled_trl_head=False),
    # rows_per_sample counts completions: a prompt's group is train.num_generations rows (the batch sizes count
    # completions, as in TRL); the reference forward runs only when train.beta > 0 (default 0: no KL term).
    Method("grpo", "prompts", "qlora_phi3.run.methods.grpo", reference_forward=True, default_beta=0.0, generates=True,
           metrics=(("eval_reward", "eval_reward"), ("eval_reward_std", "eval_reward_std"),
                    ("eval_completions/mean_length", "eval_completion_length"))),
)}

DEFAULT_METHOD = "sft"


def method_names() -> tuple[str, ...]:
    """The allowed values of ``train.method``, in the table's order."""
    return tuple(METHODS)


def methods_reading(kind: str) -> list[str]:
    """The methods that train on data of ``kind`` (one of DATA_KINDS), in the table's order."""
    return [m.name for m in METHODS.values() if m.data == kind]
