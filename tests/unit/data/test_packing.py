"""Packing: full rows, no sample attending to another (sdpa and eager), same loss as unpacked."""

import random

import pytest
import torch

from qlora_phi3.config import ModelConfig
from qlora_phi3.run.loss import model_loss
from qlora_phi3.model.load import load_model
from qlora_phi3.data.packing import (PackingCollator, block_causal_mask, pack_columns, pack_rows, padded_tokens,
                                     padding_advice, to_model_inputs)


def _samples(n=7, seed=0):
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = rng.randint(5, 30)
        row = [rng.randint(3, 600) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    return ids, labels


def test_pack_rows_fills_rows_and_keeps_every_sample_once():
    rng = random.Random(3)
    lengths = [rng.choice([rng.randint(10, 60), rng.randint(300, 1000)]) for _ in range(200)]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(200))
    used = [sum(lengths[i] for i in row) for row in rows]
    assert max(used) <= 1024
    # No packing needs fewer rows than either bound; best-fit decreasing stays within 10% of them here.
    lower_bound = max(-(-sum(lengths) // 1024), sum(n > 512 for n in lengths))
    assert len(rows) <= 1.1 * lower_bound
    assert sum(used) / (len(rows) * 1024) > 0.9  # real tokens per row slot; unpacked padding wastes far more
    with pytest.raises(ValueError, match="max_seq_len"):
        pack_rows([10, 2000], 1024)


def test_pack_columns_unlabels_each_sample_start():
    ids, labels = _samples()
    cols = pack_columns(ids, labels, 64)
    for row_ids, row_labels, lens in zip(cols["input_ids"], cols["labels"], cols["seq_lens"]):
        assert len(row_ids) == len(row_labels) == sum(lens) <= 64
        starts = [sum(lens[:k]) for k in range(len(lens))]
        assert all(row_labels[s] == -100 for s in starts)
    assert sum(len(r) for r in cols["input_ids"]) == sum(len(x) for x in ids)  # no padding, nothing lost


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return load_model(ModelConfig(), "cpu", "float32", request.param).eval(), request.param


def test_packed_logits_equal_logits_alone(model):
    """Every packed sample's logits equal its logits when run alone (the leak check), per backend."""
    m, attn = model
    ids, labels = _samples()
    cols = pack_columns(ids, labels, 64)
    batch = PackingCollator(pad_token_id=0)([{k: cols[k][r] for k in cols} for r in range(len(cols["input_ids"]))])
    assert batch["input_ids"].shape[0] > 1 and (batch["attention_mask"] == 0).any()  # rows of unequal length
    inputs = to_model_inputs({k: v for k, v in batch.items() if k != "labels"}, attn)
    assert inputs["attention_mask"].dim() == 4
    with torch.no_grad():
        packed = m(**inputs).logits
        for r, lens in enumerate(cols["seq_lens"]):
            start = 0
            for n in lens:
                alone = m(input_ids=batch["input_ids"][r:r + 1, start:start + n]).logits[0]
                torch.testing.assert_close(packed[r, start:start + n], alone, rtol=1e-4, atol=1e-4)
                start += n


def test_packed_loss_equals_unpacked_loss(model):
    m, attn = model
    ids, labels = _samples(seed=5)
    total_nll, total_labelled = 0.0, 0
    with torch.no_grad():
        for x, y in zip(ids, labels):
            out = m(input_ids=torch.tensor([x]), labels=torch.tensor([y]))
            n = sum(1 for t in y[1:] if t != -100)
            total_nll += out.loss.item() * n
            total_labelled += n
        cols = pack_columns(ids, labels, 64)
        batch = PackingCollator(0)([{k: cols[k][r] for k in cols} for r in range(len(cols["input_ids"]))])
        packed = model_loss(m, to_model_inputs(batch, attn), chunk_tokens=16)
    assert packed.item() == pytest.approx(total_nll / total_labelled, rel=1e-4)


def test_block_causal_mask_shapes_and_window():
    seg = torch.tensor([[0, 0, 0, 1, 1]])
    allowed = block_causal_mask(seg, "sdpa")[0, 0]
    assert allowed.dtype == torch.bool
    assert allowed[2].tolist() == [True, True, True, False, False]
    assert allowed[4].tolist() == [False, False, False, True, True]
    windowed = block_causal_mask(seg, "sdpa", sliding_window=2)[0, 0]
    assert windowed[2].tolist() == [False, True, True, False, False]
    additive = block_causal_mask(seg, "eager")[0, 0]
    assert additive.dtype == torch.float32 and additive[4, 4] == 0 and additive[4, 0] < -1e30


def test_flash_attention_gets_position_ids_and_no_mask():
    cols = pack_columns(*_samples(), 64)
    batch = PackingCollator(0)([{k: cols[k][0] for k in cols}])
    inputs = to_model_inputs(batch, "flash_attention_2")
    assert "attention_mask" not in inputs and "segment_ids" not in inputs
    lens = cols["seq_lens"][0]
    assert inputs["position_ids"][0].tolist() == [p for n in lens for p in range(n)]


def test_length_grouped_order_pads_unpacked_micro_batches_far_less():
    """data.packing=false with data.group_by_length: the estimate follows transformers' length-grouped order,
    which on a chat-like mix of short and long conversations leaves a fraction of the random order's padding."""
    rng = random.Random(5)
    lengths = [rng.choice([rng.randint(20, 120), rng.randint(150, 400), rng.randint(900, 1900)]) for _ in range(400)]
    shuffled = padded_tokens(lengths, 2, seed=0)
    grouped = padded_tokens(lengths, 2, seed=0, group=8)
    assert grouped < shuffled / 3
    share, line, _ = padding_advice(lengths, 2, 0, group=8)
    assert share == grouped / (grouped + sum(lengths)) and "grouped by length" in line


def test_unpacked_batches_pass_through():
    ids, labels = _samples(2)
    batch = PackingCollator(0)([{"input_ids": i, "labels": y} for i, y in zip(ids, labels)])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert to_model_inputs(batch, "sdpa") is batch


def _torch_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """flash-attn's flash_attn_func in plain torch: (batch, seq, heads, dim) in and out."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def _torch_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """flash-attn's flash_attn_varlen_func in plain torch: (total tokens, heads, dim), one causal attention
    per segment [cu_seqlens[i], cu_seqlens[i + 1])."""
    out = torch.empty_like(q)
    for s, e in zip(cu_seqlens_q.tolist()[:-1], cu_seqlens_q.tolist()[1:]):
        out[s:e] = _torch_flash(q[None, s:e], k[None, s:e], v[None, s:e], softmax_scale=softmax_scale,
                                causal=causal)[0]
    return out


@pytest.fixture
def flash_model(monkeypatch):
    """The tiny model on transformers' own flash_attention_2 code path, with flash-attn's kernels replaced by the
    plain-torch stand-ins above (flash-attn itself needs CUDA): what is tested is transformers' decision of when
    samples are isolated, and ours of what to pass it."""
    import transformers.modeling_flash_attention_utils as fa

    monkeypatch.setattr(fa, "_lazy_imports", lambda *a, **k: (_torch_flash, _torch_flash_varlen, None, fa._pad_input,
                                                               fa._unpad_input))
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    m = load_model(ModelConfig(), "cpu", "float32", "sdpa").eval()
    m.config._attn_implementation = "flash_attention_2"
    return m


@pytest.mark.parametrize("rows_per_batch", [1, 2])
def test_flash_attention_packing_isolates_samples_for_any_micro_batch(flash_model, rows_per_batch):
    ids, labels = _samples(n=9, seed=4)
    cols = pack_columns(ids, labels, 64)
    feats = [{"input_ids": i, "labels": lab, "seq_lens": s}
             for i, lab, s in zip(cols["input_ids"], cols["labels"], cols["seq_lens"])][:rows_per_batch]
    batch = PackingCollator(0)(feats)
    inputs = to_model_inputs(batch, "flash_attention_2")
    assert inputs["input_ids"].shape[0] == 1 and "attention_mask" not in inputs  # flattened, boundaries explicit
    with torch.no_grad():
        packed = flash_model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0]
        width = batch["input_ids"].shape[1]
        for b, f in enumerate(feats):
            start = b * width
            for n in f["seq_lens"]:
                row = batch["input_ids"][b, start - b * width:start - b * width + n]
                alone = flash_model(input_ids=row[None]).logits[0]
                assert torch.allclose(packed[start:start + n], alone, atol=1e-4), (b, n)
                start += n
    if rows_per_batch > 1:  # what transformers does with B > 1 rows and position ids only: samples leak
        leaky = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids")}
        with torch.no_grad():
            mixed = flash_model(**leaky).logits[1]
        n0 = feats[1]["seq_lens"][0]
        second = batch["input_ids"][1, n0:n0 + feats[1]["seq_lens"][1]]
        with torch.no_grad():
            alone = flash_model(input_ids=second[None]).logits[0]
        assert not torch.allclose(mixed[n0:n0 + len(second)], alone, atol=1e-3)
