"""The default run end to end: it learns, writes a complete adapter and run.json, and changes only LoRA."""

import json

import pytest
import torch

from qlora_phi3.model.load import load_model

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process


def test_default_run_learns_and_records(tiny_run):
    recipe, result = tiny_run
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["eval_loss_end"] <= 0.70 * run["eval_loss_start"], (run["eval_loss_start"], run["eval_loss_end"])
    assert run["train_loss_end"] < run["train_loss_start"]
    for key in ("versions", "device", "recipe", "dataset", "seed", "peak_memory", "tokens_per_second"):
        assert run[key] is not None, key
    assert run["versions"]["torch"] and run["versions"]["bitsandbytes"] and run["versions"]["trl"]
    assert run["device"]["kind"] == "cpu"
    assert run["dataset"]["fingerprint"] and run["recipe"]["lora"]["r"] == recipe.lora.r
    assert run["peak_memory"]["peak_reserved_gib"] > 0 and run["tokens_per_second"] > 0
    assert (result.output_dir / "recipe.yaml").is_file()


def test_adapter_dir_is_complete(tiny_run):
    _, result = tiny_run
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "qlora_phi3.json"} <= files
    assert "chat_template.jinja" in files or "chat_template" in (result.adapter_dir / "tokenizer_config.json").read_text()
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)  # safetensors only
    assert not (result.output_dir / ".adapter.partial").exists()


def test_plain_peft_reload_reproduces_logits(tiny_run, tiny_tokenizer):
    from peft import PeftModel

    recipe, result = tiny_run
    trained = result.model.eval()
    dtype = result.run["compute_dtype"]  # bf16 where the CPU has it natively, else fp32
    base = load_model(recipe.model, "cpu", dtype, "sdpa")
    reloaded = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    msgs = [{"role": "user", "content": "What is the capital of Zorvia?"}]
    ids = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # Both under the autocast that training used, so only the adapter files can make them differ.
    with torch.no_grad(), torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
        a = trained(**ids).logits.float()
        b = reloaded(**ids).logits.float()
        with reloaded.disable_adapter():
            c = reloaded(**ids).logits.float()
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    assert (a - c).abs().max() > 0.1  # the adapter really changes the model


def test_only_lora_changes_and_4bit_base_is_bit_identical(tiny_run):
    recipe, result = tiny_run
    trained = result.model
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    fresh = load_model(recipe.model, "cpu", result.run["compute_dtype"], "sdpa").state_dict()
    state = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
             for k, v in trained.state_dict().items() if "lora_" not in k}
    assert set(state) == set(fresh)
    for k, v in fresh.items():
        assert torch.equal(state[k], v), f"base tensor changed: {k}"
    assert any(v.dtype == torch.uint8 for v in fresh.values())  # really 4-bit packed
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert all(p.dtype == torch.float32 for p in lora_b)
    assert any(p.abs().max() > 0 for p in lora_b)  # lora_B starts at zero: training moved it


@pytest.mark.slow
def test_cli_default_run_prints_result(tmp_path, qlora):
    res = qlora("train", f"train.output_dir={tmp_path / 'r'}", "train.max_steps=10", "train.eval_steps=0",
                "train.save_steps=0")
    assert res.returncode == 0, res.stderr[-2000:]
    import re

    assert len(re.findall(r"step\s+0\s+eval loss|eval loss at step 0", res.stdout)) == 1  # step 0's, said once
    assert "adapter:" in res.stdout and f"next: `qlora-phi3 chat {tmp_path / 'r'}`" in res.stdout
    card = (tmp_path / "r" / "README.md").read_text()
    assert "[None]" not in card and "qlora-phi3 merge" in card
    adapter_card = (tmp_path / "r" / "adapter" / "README.md").read_text()
    assert "Model Card for Model ID" not in adapter_card and "qlora-phi3 chat" in adapter_card
