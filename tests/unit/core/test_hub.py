"""Offline first (hub.py): a Hub id on a machine that cannot reach the Hub is one clear error with the command
that downloads it, not a minute of retries; a cached one is used offline."""

import os
import subprocess
import sys

import pytest

from qlora_phi3 import hub
from qlora_phi3.errors import UserError


@pytest.fixture
def unreachable(monkeypatch):
    monkeypatch.setattr(hub, "_reachable", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_local_paths_are_not_hub_ids(tmp_path):
    assert hub.is_hub_id("microsoft/Phi-3-mini-4k-instruct")
    assert not hub.is_hub_id(str(tmp_path))
    assert not hub.is_hub_id("./models/phi")
    assert not hub.is_hub_id("just-a-name")


def test_uncached_model_is_one_error_with_the_download_command(unreachable, monkeypatch):
    monkeypatch.setattr(hub, "_cached", lambda repo, rev, kind: False)
    with pytest.raises(UserError) as e:
        hub.ensure_hub_access("microsoft/Phi-3-mini-4k-instruct", "abc123", "model.name_or_path")
    msg = str(e.value)
    assert "hf download microsoft/Phi-3-mini-4k-instruct --revision abc123" in msg and "unreachable" in msg
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing later in this process retries the Hub


def test_cached_model_is_used_offline(unreachable, monkeypatch):
    monkeypatch.setattr(hub, "_cached", lambda repo, rev, kind: True)
    hub.ensure_hub_access("microsoft/Phi-3-mini-4k-instruct", None, "model.name_or_path")
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_unreachable_hub_dataset_goes_offline_and_names_the_download(unreachable, tmp_path, monkeypatch):
    from qlora_phi3.config import DataConfig
    from qlora_phi3.data.read import load_records

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"unreachable and the dataset is not cached.*hf download org/chats "
                                        r"--repo-type dataset"):
        load_records(DataConfig(path="org/chats", split="train"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow  # a subprocess or a measured training run: the full tier
def test_cli_offline_prints_one_line_and_no_retries(tmp_path):
    """The real command, with the Hub's endpoint on a closed local port: one error line, no retry noise."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    # Another revision than the recipe's pin: the tokenizer that ships is that revision's (model/load.py).
    proc = subprocess.run([sys.executable, "-m", "qlora_phi3", "data", "phi3_mini_4k_12gb", "model.revision=main",
                           "data.path=tests/data/messages.jsonl"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "hf download microsoft/Phi-3-mini-4k-instruct" in lines[0], proc.stderr
    assert "Retry" not in proc.stdout + proc.stderr
