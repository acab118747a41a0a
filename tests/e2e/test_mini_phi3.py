"""Mini Phi-3-mini-4k-instruct and Phi-3-mini-128k-instruct (every published config.json field, tiny sizes with
Phi-3-mini's head dim 96, the real tokenizer): each trains, merges and chats; the 128k one switches to its long
rope factors past 4096 positions, in training too; a packed row longer than 4096 tokens leaks nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_phi3.config import load_recipe
from qlora_phi3.model.tiny import build_model_dir, mini_phi3_config

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process

REPO = Path(__file__).resolve().parents[2]
SIZES = dict(hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2)  # head dim 96, so the 128k config's 48 published factors apply verbatim


@pytest.fixture(scope="module")
def mini_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    return {kind: build_model_dir(root / kind, mini_phi3_config(kind, **SIZES)) for kind in ("4k", "128k")}


def _recipe(model_dir: Path, out: Path, *overrides: str):
    return load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [
        f"model.name_or_path={model_dir}", f"train.output_dir={out}", "train.max_steps=3", "train.eval_steps=3",
        "train.save_steps=3", "train.micro_batch_size=4", "train.logging_steps=1", "data.max_samples=40",
        "data.max_eval_samples=2", "train.sample_prompts=0", *overrides])


@pytest.mark.parametrize("kind", ["4k", "128k"])
def test_train_merge_chat(kind, mini_dirs, tmp_path):
    from qlora_phi3.ship.chat import chat
    from qlora_phi3.ship.merge import merge
    from qlora_phi3.run.train import train

    result = train(_recipe(mini_dirs[kind], tmp_path / "run"))
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["eval_loss_end"] < run["eval_loss_start"]
    merged = merge(str(result.output_dir), str(tmp_path / "merged"), report_samples=2).out_dir
    config = json.loads((merged / "config.json").read_text())
    rope = config["rope_parameters"]
    if kind == "128k":
        assert rope["rope_type"] == "longrope" and len(rope["long_factor"]) == 48 and config["max_position_embeddings"] == 131072
    else:
        assert rope["rope_type"] == "default" and config["max_position_embeddings"] == 4096
    gen = json.loads((merged / "generation_config.json").read_text())
    assert {32007, 32000} <= set(gen["eos_token_id"])
    messages = chat(str(merged), prompt="What is 3 plus 4?", max_new_tokens=3)
    assert [m["role"] for m in messages] == ["user", "assistant"] and isinstance(messages[1]["content"], str)


def _rope_spy(monkeypatch):
    """Record, for every rotary-embedding call, the largest position and the inverse frequencies it used."""
    from transformers.models.phi3 import modeling_phi3

    calls = []
    real = modeling_phi3.Phi3RotaryEmbedding.forward

    def spy(self, x, position_ids):
        out = real(self, x, position_ids)
        calls.append((int(position_ids.max()), self.inv_freq.detach().float().cpu().clone()))
        return out

    monkeypatch.setattr(modeling_phi3.Phi3RotaryEmbedding, "forward", spy)
    return calls


def _inv_freq(config, factors):
    head_dim = config.hidden_size // config.num_attention_heads
    base = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float) * config.rope_parameters["rope_theta"] ** base)


def test_128k_training_past_4096_tokens_uses_the_long_factors(mini_dirs, tmp_path, monkeypatch):
    """data.max_seq_len above 4096 and a conversation that long: its training steps run on long_factor, short
    conversations on short_factor, as Phi-3-mini-128k does."""
    from qlora_phi3.run.train import train

    config = mini_phi3_config("128k", **SIZES)
    long_text = " ".join(["hello"] * 4400)  # "▁hello" is one token: 4400 + the template's
    rows = [{"messages": [{"role": "user", "content": f"{long_text} {k}"}, {"role": "assistant", "content": "Ok."}]}
            for k in range(3)]
    rows += [{"messages": [{"role": "user", "content": f"Hi {k}"}, {"role": "assistant", "content": "Hello."}]}
             for k in range(3)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    calls = _rope_spy(monkeypatch)
    # 2 of 6 held out, 4 steps of 1 = the other 4 once: at least one long and one short in training
    train(_recipe(mini_dirs["128k"], tmp_path / "run", f"data.path={data}", "data.max_seq_len=5120",
                  "data.eval_fraction=0.34", "train.micro_batch_size=1", "train.max_steps=4", "train.eval_steps=4",
                  "train.save_steps=4"))
    long_freq = _inv_freq(config, config.rope_parameters["long_factor"])
    short_freq = _inv_freq(config, config.rope_parameters["short_factor"])
    long_calls = [f for pos, f in calls if pos >= 4096]
    short_calls = [f for pos, f in calls if pos < 4096]
    assert long_calls and short_calls
    assert all(torch.allclose(f, long_freq) for f in long_calls)
    assert all(torch.allclose(f, short_freq) for f in short_calls)
    assert not torch.allclose(long_freq, short_freq)


def test_packed_row_longer_than_4096_leaks_nothing(mini_dirs):
    """A row of 4600 packed tokens (each sample shorter than 4096, positions restarting) on the 128k model:
    every sample's logits equal its logits alone."""
    from transformers import AutoModelForCausalLM

    from qlora_phi3.data.packing import PackingCollator, pack_columns, to_model_inputs

    model = AutoModelForCausalLM.from_pretrained(str(mini_dirs["128k"]), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [2000, 1500, 1100]  # longest first: the order pack_rows puts them in
    ids = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in lengths]
    cols = pack_columns(ids, [list(x) for x in ids], 4600)
    assert len(cols["input_ids"]) == 1 and len(cols["input_ids"][0]) == 4600 > 4096
    batch = PackingCollator(pad_token_id=0)([{k: cols[k][0] for k in ("input_ids", "labels", "seq_lens")}])
    inputs = to_model_inputs(batch, "sdpa", model.config.sliding_window)
    with torch.no_grad():
        packed = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=inputs["position_ids"]).logits[0]
        start = 0
        for sample, n in zip(ids, cols["seq_lens"][0]):
            alone = model(input_ids=torch.tensor([sample])).logits[0]
            got = packed[start:start + n]
            start += n
            assert len(sample) == n
            assert torch.allclose(got, alone, atol=1e-3, rtol=1e-3), (got - alone).abs().max()
