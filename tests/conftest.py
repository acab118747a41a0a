"""Shared fixtures: one tiny training run per test session, reused by every test that needs an adapter."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest runs two workers (pyproject addopts: -n 2) on a 2-core machine: one thread each, for the worker and
    # every process its tests start. Two threads per worker make each wait on the other core's work (measured on
    # a busy 2-core box: training steps 10-20x slower).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
# llama.cpp for the export tests: llama-cpp-python (the [gguf] extra) and its sdist (llama.cpp's converters and Phi-3
# vocabulary). The sdist is found without being named: QLORA_PHI3_SDIST if set, else the cache .ci/run fills, else pip
# downloads it there once (76 MB). What cannot be had skips with the reason, and fails instead when
# QLORA_PHI3_REQUIRE_LLAMA_CPP=1, which CI sets.
SDIST_ENV = "QLORA_PHI3_SDIST"
REQUIRE_ENV = "QLORA_PHI3_REQUIRE_LLAMA_CPP"


def unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_ENV}=1 (CI installs it)")
    pytest.skip(reason)


def sdist_cache() -> Path:
    """Where .ci/run and the tests keep the llama-cpp-python sdist: ${XDG_CACHE_HOME:-~/.cache}/qlora-phi3/sdist."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-phi3" / "sdist"


@pytest.fixture(scope="session")
def llama_cpp_sdist(tmp_path_factory) -> Path:
    """The llama-cpp-python sdist the project pins (qlora_phi3.model.tokenizer.SDIST_REQUIREMENT): QLORA_PHI3_SDIST
    if set, else the cache (:func:`sdist_cache`), else downloaded there by pip once."""
    from qlora_phi3.errors import UserError
    from qlora_phi3.model.tokenizer import SDIST_REQUIREMENT, _download_sdist

    if os.environ.get(SDIST_ENV):
        named = Path(os.environ[SDIST_ENV])
        if not named.is_file():
            pytest.fail(f"{SDIST_ENV}={named}: no such file; unset it to let the tests download the sdist")
        return named
    version = SDIST_REQUIREMENT.split("==")[1]
    cached = sdist_cache() / f"llama_cpp_python-{version}.tar.gz"
    if not cached.is_file():
        try:  # into a folder of this session first: a second xdist worker never sees half a file
            fetched = _download_sdist(tmp_path_factory.mktemp("sdist"))
        except UserError as e:
            unavailable(f"the {SDIST_REQUIREMENT} sdist is not in {cached.parent} and pip could not fetch it ({e}); "
                        f"set {SDIST_ENV} to a copy")
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")  # whole or not at all, as .ci/run reads it
        shutil.copyfile(fetched, partial)
        os.replace(partial, cached)
    return cached


@pytest.fixture(scope="session")
def llama_cpp_src(tmp_path_factory, llama_cpp_sdist) -> Path:
    """llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) with the conversion/ and gguf-py/ they
    import, extracted once from the llama-cpp-python sdist (:func:`llama_cpp_sdist`)."""
    import tarfile

    sdist = llama_cpp_sdist
    out = tmp_path_factory.mktemp("llama_cpp_src")
    wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        prefix = f"{root}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        tar.extractall(out, members=members, filter="data")
    return out / root / "vendor" / "llama.cpp"


def read_gguf(path: Path) -> tuple:
    """gguf's reader of the GGUF at ``path`` and its keys' values ({key: contents}). The file is read into memory
    first: the reader slices its buffer once per value and string (~4 million times on Phi-4-mini's 200,064 tokens
    and 446,000 merges), and each slice of numpy's memmap costs ~3x one of a plain array (2-core EPYC: 19 s against
    7 s for the tiny Phi-4-mini's f16 file, 1.9 s against 0.6 s for the tiny Phi-3's)."""
    from unittest import mock

    import gguf.gguf_reader
    import numpy as np

    with mock.patch.object(gguf.gguf_reader.np, "memmap", lambda p, mode="r", **kw: np.fromfile(p, dtype=np.uint8)):
        reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


@pytest.fixture(scope="module")
def llama_cpp():
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        unavailable("llama-cpp-python is not installed (pip install 'qlora-phi3[gguf]')")
    import llama_cpp

    return llama_cpp


@pytest.fixture
def qlora(capsys, monkeypatch):
    """``qlora-phi3 ARGS`` run in this process, returned as a subprocess would return it (exit code, stdout, stderr).
    A subprocess costs ~8 s of interpreter, torch and transformers start per call on a 2-core Xeon with avx512_bf16; tests that need a real
    process (a kill, a signal, a fresh interpreter's imports) start one themselves."""
    import subprocess

    from qlora_phi3.cli import main

    def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        capsys.readouterr()  # only this command's output
        with monkeypatch.context() as m:
            if cwd is not None:
                m.chdir(cwd)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own errors exit
                code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["qlora-phi3", *argv], code, out, err)

    return run


@pytest.fixture
def no_onednn_cap(monkeypatch):
    """No oneDNN ISA cap in the environment (machine.cpu_bf16 reads it): the suite may itself run under one, as on
    the AVX2 stand-in of docs/measured.md."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)


def cpu_dtype() -> str:
    """The compute dtype training picks on this CPU (bf16 where native, else fp32): tests that load the model
    themselves use it, so a CPU without native bf16 does not run them 10x slower in emulation."""
    from qlora_phi3.model.load import pick_compute_dtype

    return pick_compute_dtype("auto", "cpu").value


def tiny_lora_model(checkpointing: bool = False):
    """The tiny Phi-3 in fp32 with a LoRA adapter whose B is non-zero (so every LoRA weight gets a gradient), in
    train mode: what the loss and log-prob tests compare paths on."""
    import torch

    from qlora_phi3.config import LoraSettings, ModelConfig
    from qlora_phi3.model.load import load_model
    from qlora_phi3.model.lora import attach_lora
    from qlora_phi3.run.offload import enable_checkpointing

    torch.manual_seed(0)
    model = load_model(ModelConfig(), "cpu", "float32", "sdpa")
    if checkpointing:
        enable_checkpointing(model, True, "cpu")
    model = attach_lora(model, LoraSettings(dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


TINY_RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The default tiny CPU recipe, trained once (this is the README's default run)."""
    from qlora_phi3.ui import quiet_library_noise
    from qlora_phi3.config import load_recipe
    from qlora_phi3.run.train import train

    quiet_library_noise()
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    recipe = load_recipe(TINY_RECIPE, [f"train.output_dir={out}"])
    return recipe, train(recipe)


@pytest.fixture(scope="session")
def dpo_run(tmp_path_factory):
    """The tiny DPO recipe, trained once per session: 80 of its 120 steps (held-out reward accuracy 75%, mean margin
    35, Xeon-BF16). The preference tests and the adapter export's DPO check share it."""
    from qlora_phi3.config import load_recipe
    from qlora_phi3.run.train import train
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    out = tmp_path_factory.mktemp("dpo") / "run"
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu_dpo.yaml", [
        f"train.output_dir={out}", "train.sample_prompts=0", "train.logging_steps=1", "train.save_steps=0",
        "train.eval_steps=0", "train.max_steps=80"])
    return recipe, train(recipe)


@pytest.fixture(scope="session")
def mini_phi3(tmp_path_factory):
    """A mini Phi-3: real vocabulary (32064) and head dim (96), two narrow layers."""
    from qlora_phi3.model.tiny import write_random_phi3

    return write_random_phi3(tmp_path_factory.mktemp("mini") / "mini-phi3", hidden_size=192, intermediate_size=512,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=32064,
                             max_position_embeddings=4096)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from qlora_phi3.config import ModelConfig
    from qlora_phi3.model.load import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_phi4_mini_dir(tmp_path_factory):
    """A tiny Phi-4-mini (grouped KV 6/2, partial rotary 0.75, tied embeddings, the 200,064-row vocabulary and its
    o200k tokenizer), built once per session, seeded (~20 s: most of it deriving the BPE merges)."""
    from qlora_phi3.model.tiny import build_tiny_shape

    return build_tiny_shape("phi4-mini", tmp_path_factory.mktemp("tiny-phi4-mini"))


@pytest.fixture(scope="session")
def phi4_tokenizer(tiny_phi4_mini_dir):
    from qlora_phi3.config import ModelConfig
    from qlora_phi3.model.load import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_phi4_mini_dir)))


@pytest.fixture(scope="session")
def tiny_phi4_dir(tmp_path_factory):
    """A tiny Phi-4 (14B's shape: grouped KV 4/1, full rotary, untied embeddings, the 100,352-row vocabulary and its
    cl100k tokenizer), built once per session, seeded."""
    from qlora_phi3.model.tiny import build_tiny_shape

    return build_tiny_shape("phi4", tmp_path_factory.mktemp("tiny-phi4"))


@pytest.fixture(scope="session")
def phi4_14b_tokenizer(tiny_phi4_dir):
    from qlora_phi3.config import ModelConfig
    from qlora_phi3.model.load import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_phi4_dir)))


# The session's tiny run (300 steps, ~2 minutes of one core) and DPO run are trained once per worker that needs them.
# xdist hands out whole files (pyproject: --dist loadfile); this scheduler hands out every file that uses either run as
# one unit, so each is trained once, not once per worker. (xdist's own --dist loadgroup marks do not work with pytest 9: it renames
# item._nodeid, which pytest 9 no longer reads.)
_SHARED_RUN_FILES = frozenset(p.name for p in Path(__file__).parent.rglob("test_*.py")
                              if any(run in p.read_text() for run in ("tiny_run", "dpo_run")))


# The longest units of work, in CPU seconds summed over their tests (2-core EPYC, AVX2 only, under load, 2026-12-07;
# only their order matters). Handed out longest first, the two workers end together instead of one waiting out
# the other's last long file; units not listed follow in collection order.
_UNIT_COST_S = {"tiny_run": 700, "tests/project/test_gpu_check.py": 220, "tests/e2e/test_phi4_mini_e2e.py": 230,
                "tests/e2e/test_robustness.py": 230, "tests/e2e/test_phi4_e2e.py": 70, "tests/unit/run/test_profile.py": 70,
                "tests/e2e/test_distributed.py": 60, "tests/unit/memory/test_estimate.py": 57,
                "tests/unit/memory/test_estimate_methods.py": 45, "tests/e2e/test_lora_variants.py": 43,
                "tests/e2e/test_mini_phi3.py": 41}


class _LongestFirst(dict):
    """xdist's queue of work units (it pops the oldest with ``popitem(last=False)``), popping the costliest instead."""

    def popitem(self, last: bool = True):
        if last:
            return super().popitem()
        scope = max(self, key=lambda s: _UNIT_COST_S.get(s, 0))  # ties: the first in collection order
        return scope, self.pop(scope)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.workqueue = _LongestFirst()

        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "tiny_run" if Path(file).name in _SHARED_RUN_FILES else file

    return SharedRunScheduling(config, log)
