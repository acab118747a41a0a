"""Packing: several conversations per row of ``data.max_seq_len`` tokens, none attending to another.

A micro-batch padded to its longest sample wastes compute on padding (on a mixed-length chat set,
most of it). Packing fills each row with whole samples (best-fit decreasing), so a step does real
tokens only. The catch is attention: with transformers 5 on the CPU, sdpa and eager attention let a
packed sample attend to the ones before it when only ``position_ids`` restart (tests/unit/data/test_packing.py
shows it), so for them we pass an explicit block-diagonal causal 4-D mask. For
flash_attention_2 we flatten the micro-batch into one row and pass the sample boundaries
(``cu_seq_lens``): flash-attn's varlen kernel then isolates samples without an L x L mask.

Why by hand: TRL's packing (``SFTConfig(packing=True)``) relies on ``position_ids`` alone, which is
exactly the leaking case on sdpa/eager.
"""

from __future__ import annotations

import bisect
import random

from qlora_phi3.phi3 import IGNORE_INDEX

__all__ = ["PADDING_WARN_SHARE", "PackingCollator", "block_causal_mask", "length_group", "pack_columns", "pack_rows",
           "padded_tokens", "padding_advice", "to_model_inputs"]

PADDING_WARN_SHARE = 0.30  # above this share of padded tokens per epoch, packing is worth a warning


def pack_rows(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Sample indices per row, best-fit decreasing: each sample (longest first) goes to the fullest row
    it still fits in. Every length must be at most ``max_seq_len`` (samples are truncated before)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted: bisect finds the tightest fit
    for i in order:
        n = lengths[i]
        if n > max_seq_len:
            raise ValueError(f"sample {i} has {n} tokens > max_seq_len={max_seq_len}; truncate first")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


def padded_tokens(lengths: list[int], micro_batch_size: int, seed: int = 0, group: int | None = None) -> int:
    """Padding tokens in one epoch without packing: micro-batches padded to their longest sample, drawn in random
    order (the Trainer's default sampler; a seeded shuffle stands in for its order) or, with ``group`` (samples per
    optimizer step), in the order of transformers' length-grouped sampler (``data.group_by_length``)."""
    if group:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(lengths, group, generator=torch.Generator().manual_seed(seed))
    else:
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
    total = 0
    for start in range(0, len(order), micro_batch_size):
        batch = [lengths[i] for i in order[start:start + micro_batch_size]]
        total += max(batch) * len(batch) - sum(batch)
    return total


def length_group(recipe) -> int | None:
    """Samples per length group when training draws unpacked micro-batches grouped by length (``data.packing=false``
    with ``data.group_by_length``): an optimizer step's worth, as the Trainer's sampler groups them; else None."""
    if recipe.data.packing or not recipe.data.group_by_length:
        return None
    return recipe.train.micro_batch_size * recipe.train.grad_accum


def padding_advice(lengths: list[int], micro_batch_size: int, seed: int,
                   group: int | None = None) -> tuple[float, str, bool]:
    """(share of padded tokens per epoch without packing, the sentence that says so, whether it deserves a
    warning), for ``train`` and the ``data`` inspector alike; ``group`` as in :func:`padded_tokens`."""
    padded = padded_tokens(lengths, micro_batch_size, seed, group)
    share = padded / (padded + sum(lengths)) if lengths else 0.0
    line = (f"padding: about {share:.0%} of the tokens per epoch are padding (data.packing=false: micro-batches of "
            f"{micro_batch_size}{' grouped by length' if group else ''} padded to their longest sample)")
    if share > PADDING_WARN_SHARE:
        return share, (f"{line}: compute spent on nothing. data.packing=true packs conversations into full rows "
                       "without padding (leak-free) and is usually several times faster."), True
    return share, line, False


def pack_columns(input_ids: list[list[int]], labels: list[list[int]], max_seq_len: int) -> dict[str, list]:
    """Columns of a packed dataset: concatenated ``input_ids`` and ``labels`` per row, and ``seq_lens``.

    The first token of every sample loses its label: unpacked, nothing predicts it; packed, the previous
    sample's last token would otherwise learn to predict it.
    """
    out: dict[str, list] = {"input_ids": [], "labels": [], "seq_lens": []}
    for row in pack_rows([len(x) for x in input_ids], max_seq_len):
        ids, labs, lens = [], [], []
        for i in row:
            ids.extend(input_ids[i])
            labs.extend([IGNORE_INDEX] + list(labels[i][1:]))
            lens.append(len(input_ids[i]))
        out["input_ids"].append(ids)
        out["labels"].append(labs)
        out["seq_lens"].append(lens)
    return out


class PackingCollator:
    """Batches packed rows (with ``seq_lens``) or plain samples, padded to the longest row on the right.

    Packed batches carry ``position_ids`` that restart at every sample and ``segment_ids`` (which sample
    each token belongs to; the padding tail is a segment of its own); :func:`to_model_inputs` turns them
    into what the attention backend needs. ``attention_mask`` stays 2-D (1 = real token) so that the
    Trainer's non-padding token count stays right.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        batch = {k: torch.full((len(features), width), v, dtype=torch.long) for k, v in (
            ("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0))}
        packed = "seq_lens" in features[0]
        if packed:
            batch["position_ids"] = torch.zeros((len(features), width), dtype=torch.long)
            batch["segment_ids"] = torch.zeros((len(features), width), dtype=torch.long)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][b, :n] = torch.as_tensor(f["input_ids"])
            batch["labels"][b, :n] = torch.as_tensor(f["labels"])
            batch["attention_mask"][b, :n] = 1
            if packed:
                lens = list(f["seq_lens"]) + ([width - n] if width > n else [])
                batch["position_ids"][b] = torch.cat([torch.arange(k) for k in lens])
                batch["segment_ids"][b] = torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens))
        return batch


def block_causal_mask(segment_ids, attn_implementation: str, sliding_window: int | None = None,
                      rows_per_chunk: int | None = None):
    """(batch, 1, L, L) mask: token q sees token k iff same segment and k <= q (and within the window).

    sdpa takes it as bool (True = attend); eager adds it to the scores, so there it is 0 / -inf-like fp32.
    The mask itself is L x L per row (1 B per entry for sdpa: 4 GiB at 64k tokens; the estimator counts it);
    it is filled a block of query rows at a time, so no other L x L temporary is ever built (the whole-matrix
    comparisons would take several: ~0.6 GB each at 24k).
    """
    import torch

    batch, length = segment_ids.shape
    device = segment_ids.device
    eager = attn_implementation == "eager"
    out = torch.empty((batch, 1, length, length), dtype=torch.float32 if eager else torch.bool, device=device)
    idx = torch.arange(length, device=device)
    step = rows_per_chunk or max(1, (16 * 1024**2) // max(1, batch * length))  # ~16 MB of temporaries per block
    for start in range(0, length, step):
        q = idx[start:start + step, None]
        allowed = idx[None, :] <= q
        if sliding_window is not None:  # Phi-3-mini-4k has sliding_window=2047; same rule as transformers' mask
            allowed = allowed & (idx[None, :] > q - sliding_window)
        allowed = allowed[None] & (segment_ids[:, start:start + step, None] == segment_ids[:, None, :])
        if eager:
            out[:, 0, start:start + step] = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        else:
            out[:, 0, start:start + step] = allowed
    return out


def to_model_inputs(batch: dict, attn_implementation: str, sliding_window: int | None = None) -> dict:
    """Model keyword arguments for a batch from :class:`PackingCollator` (unpacked batches pass through).

    flash_attention_2: the micro-batch is flattened to one row of B x L tokens with explicit
    ``cu_seq_lens_q/k`` and ``max_length_q/k``. transformers infers sample boundaries from ``position_ids``
    only for a batch of one row (``_is_packed_sequence``); with B > 1 rows and no mask it would run the plain
    causal kernel and let every sample attend to the ones before it in its row. Flattening is exact: the
    first token of every row starts a sample, and its label is already ignored (:func:`pack_columns`).
    """
    if "segment_ids" not in batch:
        return batch
    batch = dict(batch)
    segment_ids = batch.pop("segment_ids")
    if attn_implementation != "flash_attention_2":
        batch["attention_mask"] = block_causal_mask(segment_ids, attn_implementation, sliding_window)
        return batch
    import torch

    batch.pop("attention_mask", None)
    for key in ("input_ids", "labels", "position_ids"):
        batch[key] = batch[key].reshape(1, -1)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, starts.new_tensor([batch["position_ids"].shape[1]])]).to(torch.int32)
    max_length = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())  # one host sync per batch, not per layer
    batch.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max_length,
                 max_length_k=max_length)
    return batch
