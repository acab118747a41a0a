"""The training methods plug in one way: an entry in the methods table (qlora_phi3/methods.py) and a module that
conforms to run/methods' MethodModule. These checks keep the table, the schema and the modules in step."""

import importlib
import inspect
import typing

import pytest

from qlora_phi3.config import TrainConfig, load_recipe, recipes_dir
from qlora_phi3.errors import UserError
from qlora_phi3.methods import DATA_KINDS, DEFAULT_METHOD, METHODS
from qlora_phi3.run.methods import MethodModule, get_method

# The protocol's functions with the arguments run/train.py passes them (keywords where it passes keywords).
_CALLS = {
    "load_data": (("recipe", "tokenizer"), ("records",)),
    "training_arguments": (("recipe", "output_dir", "device", "compute_dtype"), ("measuring",)),
    "build_trainer": (("model", "tokenizer", "args", "data", "device"),
                      ("recipe", "measuring", "cpu_memory", "callbacks")),
    "eval_fields": (("metrics",), ()),
}


def test_the_calls_cover_the_protocol():
    members = {name for name, _ in inspect.getmembers(MethodModule, inspect.isfunction) if not name.startswith("_")}
    assert members == set(_CALLS)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_module_conforms(name):
    module = get_method(name)
    assert module.__name__ == METHODS[name].module
    for function, (positional, keywords) in _CALLS.items():
        fn = getattr(module, function, None)
        assert callable(fn), f"{module.__name__} has no {function}()"
        # raises TypeError when the module's function cannot take what run/train.py passes
        inspect.signature(fn).bind(*positional, **{k: k for k in keywords})
    assert not hasattr(module, "NAME"), "a method's name is its table key, not a module constant"


def test_the_schema_allows_exactly_the_table_keys():
    hint = typing.get_type_hints(TrainConfig)["method"]
    assert typing.get_origin(hint) is typing.Literal
    assert typing.get_args(hint) == tuple(METHODS)
    assert TrainConfig().method == DEFAULT_METHOD


def test_a_method_outside_the_table_is_refused_with_the_choices():
    with pytest.raises(UserError, match="train.method.*'sft', 'dpo'"):
        load_recipe(recipes_dir() / "tiny_cpu.yaml", ["train.method=ppo"])


def test_table_entries_are_consistent():
    for name, method in METHODS.items():
        assert method.name == name
        assert method.data in DATA_KINDS
        assert method.rows_per_sample >= 1 and method.min_micro_batch >= 1
        assert (method.min_micro_batch > 1) == bool(method.min_reason), f"{name}: say why the micro-batch floor"
        assert (method.default_beta is None) == (method.data == "chat"), f"{name}: every method but SFT has a beta"
        assert importlib.util.find_spec(method.module) is not None


def test_the_micro_batch_floor_comes_from_the_table():
    floored = [m for m in METHODS.values() if m.min_micro_batch > 1]
    assert floored, "no method in the table has a micro-batch floor: this test checks nothing"
    for method in floored:
        with pytest.raises(UserError, match=f"train.method={method.name} needs train.micro_batch_size of at least "
                                            f"{method.min_micro_batch}"):
            load_recipe(recipes_dir() / "tiny_cpu.yaml",
                        [f"train.method={method.name}", f"train.micro_batch_size={method.min_micro_batch - 1}"])


def test_eval_fields_record_the_table_metrics():
    metrics = {"eval_loss": 1.0, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.5, "eval_reward": 0.5,
               "eval_reward_std": 0.25, "eval_completions/mean_length": 12.0}
    for name, method in METHODS.items():
        fields = get_method(name).eval_fields(metrics)
        assert fields == {ours: metrics[theirs] for theirs, ours in method.metrics}
