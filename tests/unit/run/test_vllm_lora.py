"""train.generator=vllm (run/vllm_lora.py): TRL's GRPOTrainer sampling through a colocated vLLM engine that is fed
the adapter as a LoRA after every step, never a merge into the 4-bit base.

vLLM needs a CUDA GPU, which this machine lacks, so the engine here is a stand-in with vLLM's call shapes
(``LLM(...)``, ``generate(prompts, sampling_params=, use_tqdm=, lora_request=)``, ``sleep``/``wake_up``): it loads
each LoRARequest's folder with PEFT over the 16-bit base and samples with transformers. What this tests is our side:
the engine's options, which adapter it is handed and when, that nothing merges, the sleep levels, and the refusals.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from qlora_phi3.config import load_recipe, recipes_dir
from qlora_phi3.errors import UserError
from qlora_phi3.run import vllm_lora

GRPO = recipes_dir() / "tiny_cpu_grpo.yaml"


def _recipe(*overrides: str):
    return load_recipe(GRPO, ["model.adapter=null", "train.generator=vllm", *overrides])


@pytest.mark.parametrize("override, message", [
    ("lora.use_dora=true", "vLLM loads no DoRA adapter"),
    ("lora.init=olora", "trains against a base it rewrote"),
    ("lora.r=1024", "vLLM's LoRA ranks stop at 512"),
])
def test_an_adapter_vllm_cannot_load_is_refused_before_the_model_loads(override, message, tmp_path):
    from qlora_phi3.run.preflight import preflight

    recipe = _recipe(override, f"train.output_dir={tmp_path / 'run'}")
    with pytest.raises(UserError, match=f"train.generator=vllm with .*{message}.*use train.generator=transformers"):
        preflight(recipe)
    recipe.train.generator = "transformers"
    preflight(recipe)  # the same adapter is fine where transformers samples


def test_vllm_gib_must_be_positive():
    with pytest.raises(UserError, match="'train.vllm_gib' must be positive"):
        _recipe("train.vllm_gib=0")


def test_vllm_needs_a_cuda_device_and_vllm_installed(monkeypatch):
    with pytest.raises(UserError, match="needs a CUDA GPU .* this run's device is cpu; use train.generator="):
        vllm_lora.check_vllm_here("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"vLLM is not installed\. Install .*pip install 'trl\[vllm\]'"):
        vllm_lora.check_vllm_here("cuda")


def test_vllm_takes_its_share_of_the_gpu_and_refuses_the_whole_of_it(monkeypatch):
    monkeypatch.setattr(vllm_lora, "_gpu_total_gib", lambda: 12.0)
    args = vllm_lora.vllm_arguments(_recipe("train.vllm_gib=4.5"))
    assert args["use_vllm"] and args["vllm_mode"] == "colocate" and args["vllm_enable_sleep_mode"]
    assert args["vllm_gpu_memory_utilization"] == pytest.approx(4.5 / 12) and args["vllm_max_model_length"] == 64
    with pytest.raises(UserError, match="train.vllm_gib=12 is the whole GPU"):
        vllm_lora.vllm_arguments(_recipe("train.vllm_gib=12"))


def test_profile_refuses_vllm_generation():
    from qlora_phi3.run import profile as P
    from qlora_phi3.run.methods import grpo

    configs = P.grid_recipes(str(GRPO), ["model.adapter=null"], ["train.generator=transformers,vllm"])
    assert [r.train.generator for _, r in configs] == ["transformers", "vllm"]
    P.check_measurable(configs[:1])
    with pytest.raises(UserError, match="profile does not measure train.generator=vllm"):
        P.check_measurable(configs)
    with pytest.raises(UserError, match="profile and the benchmarks measure generation with transformers"):
        grpo.training_arguments(_recipe(), Path("unused"), "cpu", "float32", measuring=True)


def test_the_estimate_counts_the_engine_instead_of_generate():
    from transformers import Phi3Config

    from qlora_phi3.memory.estimate import KNOWN_SHAPES, estimate

    config = Phi3Config(**KNOWN_SHAPES["microsoft/Phi-4-mini-instruct"])
    recipe = load_recipe(recipes_dir() / "phi4_mini_12gb_grpo.yaml")
    plain = estimate(recipe, config, "cuda")
    recipe.train.generator, recipe.train.vllm_gib = "vllm", 5.0
    with_vllm = estimate(recipe, config, "cuda")
    terms, vllm_terms = ({t.name: t.n_bytes for t in e.terms} for e in (plain, with_vllm))
    assert "generation KV cache" in terms and "generation KV cache" not in vllm_terms
    assert vllm_terms["vLLM engine (while it samples)"] == 5.0 * 2**30
    same = [name for name in terms if name in vllm_terms and not name.startswith("allocator")]
    assert len(same) > 5 and all(terms[name] == vllm_terms[name] for name in same)  # the training step is as it was


class _Out(types.SimpleNamespace):
    pass


class FakeLLM:
    """vLLM's ``LLM`` as TRL and run/vllm_lora.py call it, sampling with transformers from the LoRARequest's folder."""

    made: list[FakeLLM] = []

    def __init__(self, model: str, **options):
        self.base, self.options, self.events = model, options, []
        self.adapters: list[tuple[int, dict]] = []  # (lora_int_id, the adapter's tensors) at each new id
        self.peft, self.loaded_id = None, None
        FakeLLM.made.append(self)

    def sleep(self, level: int):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake", tuple(tags or ())))

    def _load(self, request):
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        folder = Path(request.lora_path)
        self.adapters.append((request.lora_int_id, load_file(folder / "adapter_model.safetensors")))
        base = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
        self.peft, self.loaded_id = PeftModel.from_pretrained(base, str(folder)).eval(), request.lora_int_id

    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None):
        assert lora_request is not None, "generate without the adapter"
        assert self.events and self.events[-1] == ("wake", ("kv_cache",)), "generate while asleep"
        if lora_request.lora_int_id != self.loaded_id:
            self._load(lora_request)
        sp, results = sampling_params, []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad():
                out = self.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         temperature=sp.temperature, top_p=sp.top_p, top_k=0,
                                         max_new_tokens=sp.max_tokens, output_scores=True,
                                         return_dict_in_generate=True)
            new = out.sequences[0, ids.shape[1]:].tolist()
            logprobs = [{tok: _Out(logprob=float(torch.log_softmax(score[0].float(), -1)[tok]), rank=1)}
                        for tok, score in zip(new, out.scores)]
            results.append(_Out(prompt_token_ids=prompt["prompt_token_ids"],
                                outputs=[_Out(token_ids=new, logprobs=logprobs)]))
        return results


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _fake_vllm(monkeypatch) -> None:
    """``vllm`` and ``vllm.lora.request`` as modules, and the SamplingParams TRL imports only when vLLM is installed."""
    from dataclasses import dataclass

    import trl.generation.vllm_generation as trl_vllm

    @dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""

    vllm, lora, request = (types.ModuleType(n) for n in ("vllm", "vllm.lora", "vllm.lora.request"))
    vllm.LLM, vllm.SamplingParams, request.LoRARequest = FakeLLM, FakeSamplingParams, LoRARequest
    for module in (vllm, lora, request):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(trl_vllm, "SamplingParams", FakeSamplingParams, raising=False)
    monkeypatch.setattr(vllm_lora, "check_vllm_here", lambda device: None)  # the CPU stands in for the GPU
    monkeypatch.setattr(vllm_lora, "_gpu_total_gib", lambda: 12.0)


REWARD = """
def even_start(prompts, completions, completion_ids, **columns):
    return [float(ids[0] % 2 == 0) if ids else 0.0 for ids in completion_ids]  # a coin toss on the random base
"""


@pytest.mark.slow
def test_grpo_samples_from_the_adapter_of_every_step_and_never_merges(monkeypatch, tmp_path):
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    from qlora_phi3.run import train as train_module
    from qlora_phi3.ui import quiet_library_noise

    _fake_vllm(monkeypatch)
    FakeLLM.made.clear()
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # vLLM's colocated start writes the launch's ranks into the environment, as TRL's does; in this test process
        # they must not outlive the test, or the next test's Trainer sees a distributed launch and wraps in DDP.
        monkeypatch.setenv(name, "")  # recorded, so that the end of the test removes what the code sets
        monkeypatch.delenv(name)

    def no_merge(*args, **kwargs):
        raise AssertionError("the adapter was merged into the 4-bit base")

    from peft.tuners.lora.bnb import Linear4bit
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_adapter", no_merge)  # what TRL's sync calls
    monkeypatch.setattr(Linear4bit, "merge", no_merge)  # and any merge into a 4-bit layer
    policy: list[dict] = []  # the trained adapter as each step begins and at the end, from the trainer's model

    class Snapshots(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            policy.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})

        on_train_end = on_step_begin  # the held-out sampling at the end samples the trained adapter

    real_setup = train_module.setup

    def setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        run.trainer.add_callback(Snapshots())
        return run

    monkeypatch.setattr(train_module, "setup", setup)
    (tmp_path / "rewards.py").write_text(REWARD)
    quiet_library_noise()
    recipe = _recipe(f"train.output_dir={tmp_path / 'run'}", f"train.rewards=[{tmp_path / 'rewards.py'}:even_start]",
                     "train.reward_weights=null", "train.max_steps=3", "train.micro_batch_size=8",
                     "train.num_generations=4", "train.sample_prompts=0", "train.save_steps=0", "train.beta=0",
                     "data.eval_fraction=0.04", "train.vllm_gib=3")
    result = train_module.train(recipe)
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["eval_reward_end"] is not None

    engine, = FakeLLM.made
    options = engine.options
    assert options["enable_lora"] and options["max_loras"] == 1 and options["max_lora_rank"] == 16  # lora.r 16
    assert options["quantization"] == "bitsandbytes" and options["enable_sleep_mode"]
    assert Path(engine.base).is_dir() and options["revision"] is None  # a local base: no Hub revision to pin
    assert options["gpu_memory_utilization"] == pytest.approx(3 / 12) and options["max_model_len"] == 64
    assert {level for event, level in engine.events if event == "sleep"} == {1}  # level 2 would drop the base
    weights_back = False
    for event, what in engine.events:  # each round wakes the weights (from CPU memory), then the KV cache
        weights_back = event == "wake" and (weights_back or what == ("weights",))
        assert what != ("kv_cache",) or weights_back
    # One adapter per optimizer step (the held-out sampling at the start shares step 0's), each a new id, each the
    # trained adapter as it stood when that step began: what vLLM samples is the policy being trained.
    ids = [i for i, _ in engine.adapters]
    assert ids == sorted(set(ids)) and len(ids) == 4  # steps 0, 1, 2 and the end's held-out sampling
    assert len(policy) == 4
    for (_, loaded), trained in zip(engine.adapters, policy, strict=True):
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k].to(loaded[k].dtype)) for k in loaded)
    first, last = engine.adapters[0][1], engine.adapters[-1][1]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained: the adapter moved
