"""Merging: the merged model loads with plain transformers and equals base + adapter via plain PEFT; bad
inputs are refused before any weight is loaded; an interrupted merge never leaves a complete-looking model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_phi3.cli import main
from qlora_phi3.errors import UserError
from qlora_phi3.out.merge import MergeResult, merge
from qlora_phi3.model.tiny import TINY_MODEL_DIR

REPORT_SAMPLES = 4  # enough answer tokens to compare; keeps the three CPU evaluations short


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    """The tiny run merged once, into a non-empty --out with --force and beside a stale temp dir left by a
    'killed' merge; small shards so that sharded loading is exercised. Returns (result, printed text)."""
    _, run = tiny_run
    out = tmp_path_factory.mktemp("merge") / "merged"
    out.mkdir()
    (out / "merge_report.json").write_text("{}")  # an earlier merge, which --force may replace
    (out / "old.txt").write_text("from an earlier merge")
    stale = out.parent / ".merged.partial"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the command, as users run it: it prints the report
        assert main(["merge", str(run.output_dir), "--out", str(out), "--force", "--max-shard-size", "400KB",
                     "--report-samples", str(REPORT_SAMPLES)]) == 0
    return MergeResult(out, json.loads((out / "merge_report.json").read_text())), printed.getvalue()


@pytest.mark.slow  # reuses the session's trained run
def test_merged_dir_is_complete_and_sharded(merged):
    result, _ = merged
    out = result.out_dir
    files = {p.name for p in out.iterdir()}
    assert "old.txt" not in files  # --force replaced the earlier merge
    shards = sorted(f for f in files if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "merge_report.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert not any(p.name.startswith(".merged.") for p in out.parent.iterdir())  # temp dirs gone, stale one too
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "float16" and "quantization_config" not in config


PLAIN_CHECK = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

merged_dir, base_dir, adapter_dir = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(merged_dir)
msgs = [{"role": "system", "content": "You are a quiz bot."}, {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "3 plus 4 is 7."}, {"role": "user", "content": "What color is a lime?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
peft = PeftModel.from_pretrained(base, adapter_dir).eval()
with torch.no_grad():
    a = merged(ids).logits.float()
    b = peft(ids).logits.float()
    with peft.disable_adapter():
        plain = peft(ids).logits.float()
gen = GenerationConfig.from_pretrained(merged_dir)
eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
print(json.dumps({
    "qlora_phi3_imported": any(m.split(".")[0] == "qlora_phi3" for m in sys.modules),
    "merged_dtype": str(merged.dtype), "use_cache": merged.config.use_cache,
    "max_abs_diff": (a - b).abs().max().item(), "mean_abs_diff": (a - b).abs().mean().item(),
    "logit_scale": b.abs().max().item(), "same_argmax": bool((a.argmax(-1) == b.argmax(-1)).all()),
    "adapter_effect": (b - plain).abs().max().item(),
    "stop_ids_in_eos": [tok.convert_tokens_to_ids(t) in eos for t in ("<|end|>", "<|endoftext|>")], "eos": eos,
    "template_ok": "<|assistant|>" in tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
    "padding_side": tok.padding_side, "tokenizer_pad_id": tok.pad_token_id,
    "config_pad_id": merged.config.pad_token_id, "generation_pad_id": gen.pad_token_id,
    "tokenizer_config_keys": sorted(json.load(open(merged_dir + "/tokenizer_config.json"))),
}))
"""


@pytest.mark.slow  # reuses the session's trained run
def test_plain_transformers_loads_merged_and_matches_peft(merged, tiny_run):
    """In a fresh interpreter that never imports qlora_phi3: merged == 16-bit base + adapter via plain PEFT."""
    result, _ = merged
    _, run = tiny_run
    proc = subprocess.run([sys.executable, "-c", PLAIN_CHECK, str(result.out_dir), str(TINY_MODEL_DIR),
                           str(run.adapter_dir)], capture_output=True, text=True, timeout=180,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["qlora_phi3_imported"] is False
    assert r["merged_dtype"] == "torch.float16" and r["use_cache"] is True
    # fp16 tolerance: one fp16 ulp at |logit| ~ 8-16 is 2**-7..2**-6; rounding of the merged weights adds a
    # few ulps through 4 layers. The adapter itself moves logits by far more, so this cannot pass by accident.
    assert r["max_abs_diff"] < 0.1 and r["mean_abs_diff"] < 0.01, r
    assert r["same_argmax"], r
    assert r["adapter_effect"] > 1.0, r
    assert r["stop_ids_in_eos"] == [True, True] and r["template_ok"]
    assert {32007, 32000} <= set(r["eos"])  # Phi-3's real ids: <|end|>, <|endoftext|>
    # What a user of the merged model needs, nothing of this machine: batched generation pads on the left, with
    # the tokenizer's pad (<unk>, never eos) in config and generation config alike.
    assert r["padding_side"] == "left"
    assert r["config_pad_id"] == r["generation_pad_id"] == r["tokenizer_pad_id"] == 0
    assert not {"is_local", "local_files_only", "cache_dir", "token"} & set(r["tokenizer_config_keys"])


@pytest.mark.slow  # reuses the session's trained run
def test_merge_report_compares_the_three_models(merged):
    result, printed = merged
    report = json.loads((result.out_dir / "merge_report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    models = report["models"]
    assert set(models) == {"a", "b", "c"}
    assert report["eval_samples"]["n_samples"] == REPORT_SAMPLES and "eval split" in report["eval_samples"]["source"]
    assert models["a"]["max_abs_logit_diff"] == 0.0  # (a) is the reference
    assert models["c"]["mean_abs_logit_diff"] > 0.0  # the 16-bit base is not the 4-bit one the adapter saw
    rounding = report["merge_rounding_b_vs_c"]
    assert rounding["max_abs_logit_diff"] < 0.1 <= models["b"]["max_abs_logit_diff"]
    worse = models["b"]["eval_loss"] - models["a"]["eval_loss"] > max(0.02 * models["a"]["eval_loss"], 0.01)
    assert report["merged_worse_than_trained"] is worse
    assert models["b"]["eval_loss"] < 0.5  # the trained tiny model is near-perfect on its own task
    assert report["peak_rss_gib"] > 0
    for text in ("merge report", "(a) 4-bit base + adapter", "(b) merged float16", "(c) 16-bit base + adapter",
                 "peak RAM"):
        assert text in printed, text


def test_flag_when_merged_is_worse_than_trained(capsys):
    from qlora_phi3.out.artifacts import Source
    from qlora_phi3.config import ModelConfig
    from qlora_phi3.cli.out import print_merge_report
    from qlora_phi3.out.merge import _report

    targets = torch.tensor([0, 1, 2])
    good = torch.eye(3) * 10
    a = [(good, targets)]
    b = [(good * 0.1, targets)]  # flat logits: much higher loss
    src = Source("run", Path("run"), Path("run/adapter"), ModelConfig())
    report = _report(src, "float16", "test", [None], a, b, b)
    assert report["merged_worse_than_trained"] and not report["merge_rounding_hurt"]
    assert "quantization" in report["explanation"] and "the gap is the base" in report["explanation"]
    print_merge_report(report)
    assert "WARNING" in capsys.readouterr().out
    ok = _report(src, "float16", "test", [None], a, a, a)
    assert not ok["merged_worse_than_trained"] and ok["explanation"].startswith("OK")


@pytest.mark.slow  # reuses the session's trained run
def test_chat_on_merged_dir(merged, capsys):
    from qlora_phi3.data.synthetic import answer_for

    q = "What color is a cherry?"
    assert main(["chat", str(merged[0].out_dir), "--prompt", q]) == 0
    assert capsys.readouterr().out.strip() == answer_for(q)


# --- refusals: each must be one clear error, raised before any weight is loaded -------------------------------

def _copy_adapter(run, tmp_path: Path, **meta_changes) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(run.adapter_dir, dst)
    meta = json.loads((dst / "qlora_phi3.json").read_text())
    for key, value in meta_changes.items():
        if key in meta["base_config"]:
            meta["base_config"][key] = value
        else:
            meta[key] = value
    (dst / "qlora_phi3.json").write_text(json.dumps(meta))
    return dst


def _fake_base(tmp_path: Path, name: str = "other-base", **config_changes) -> Path:
    """A model directory with only a config.json: enough for the pre-load checks, which read no weights."""
    d = tmp_path / name
    d.mkdir(parents=True)
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    config.update(config_changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_non_empty_out_without_force(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(tiny_run[1].output_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and "Traceback" not in err
    assert main(["merge", str(tiny_run[1].output_dir), "--out", str(out), "--force"]) == 2
    assert "not a model" in capsys.readouterr().err  # --force never deletes a folder of the user's files
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_to_overwrite_its_own_adapter(tiny_run):
    _, run = tiny_run
    with pytest.raises(UserError, match="would overwrite the adapter"):
        merge(str(run.adapter_dir), str(run.output_dir), force=True)


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_bad_flags_before_loading(tiny_run, tmp_path):
    with pytest.raises(UserError, match="not a memory size"):
        merge(str(tiny_run[1].output_dir), str(tmp_path / "out"), max_shard_size="lots")
    with pytest.raises(UserError, match="already a full model"):
        merge(str(TINY_MODEL_DIR), str(tmp_path / "out"))


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_shape_mismatch_recorded_in_adapter(tiny_run, tmp_path):
    adapter = _copy_adapter(tiny_run[1], tmp_path, hidden_size=3072, num_hidden_layers=32)
    with pytest.raises(UserError, match=r"different base.*hidden_size: adapter 3072, base 64"):
        merge(str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_base_override_with_other_shapes(tiny_run, tmp_path):
    base = _fake_base(tmp_path, hidden_size=256, max_position_embeddings=131072)
    with pytest.raises(UserError, match=r"max_position_embeddings: adapter 4096, base 131072"):
        merge(str(tiny_run[1].output_dir), str(tmp_path / "out"), base=str(base))


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_revision_mismatch(tiny_run, tmp_path):
    trained, other = "a" * 40, "b" * 40
    adapter = _copy_adapter(tiny_run[1], tmp_path, revision=trained)
    with pytest.raises(UserError, match=f"--revision {other} does not match.*{trained}"):
        merge(str(adapter), str(tmp_path / "out"), revision=other)
    snapshot = _fake_base(tmp_path, name=f"models--x--y/snapshots/{other}")
    with pytest.raises(UserError, match=f"snapshot of commit {other}.*revision {trained}"):
        merge(str(adapter), str(tmp_path / "out"), base=str(snapshot))


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "neither a run directory"),
    (lambda d: (d.mkdir(), (d / "run.json").write_text('{"status": "running"}')), "no finished adapter"),
    (lambda d: None, "no such file or directory"),
])
def test_refuses_what_is_not_an_adapter(tmp_path, make, message):
    src = tmp_path / "src"
    make(src)
    with pytest.raises(UserError, match=message):
        merge(str(src), str(tmp_path / "out"))


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_adapter_with_missing_lora_weights(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _copy_adapter(tiny_run[1], tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    kept = {k: v for k, v in weights.items() if "layers.3.mlp.down_proj" not in k}
    assert len(kept) < len(weights)
    save_file(kept, adapter / "adapter_model.safetensors")
    with pytest.raises(UserError, match="LoRA weights are missing"):
        merge(str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.slow  # reuses the session's trained run
def test_interrupted_merge_leaves_old_out_intact_and_no_partial_model(merged, tiny_run, tmp_path, monkeypatch):
    """Ctrl-C after the shards are written, before the rename: --out keeps the previous complete model."""
    import qlora_phi3.out.merge as m

    out = tmp_path / "merged"
    shutil.copytree(merged[0].out_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = m._save

    def save_then_interrupt(model, tokenizer, tmp, max_shard_size):
        real_save(model, tokenizer, tmp, max_shard_size)
        assert any(tmp.glob("*.safetensors"))  # the new model really was half way to --out
        raise KeyboardInterrupt

    monkeypatch.setattr(m, "_save", save_then_interrupt)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            merge(str(tiny_run[1].output_dir), str(target), force=True, report_samples=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp dirs left behind
