"""GRPO's reward functions, named in the recipe (``train.rewards``), loaded and tried before the model loads.

A reward is a plain Python function in TRL's signature, so a TRL user's reward file works unchanged::

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

``completions`` holds one entry per sampled completion (text, or ``[{"role": "assistant", "content": ...}]`` when
the prompts are chats); every data column besides ``prompt`` arrives as a keyword argument with one value per
completion (e.g. ``answer``); TRL also passes ``trainer_state``, ``log_extra`` and ``log_metric``. ``None`` means
"does not apply to this completion". A recipe names a reward three ways:

* a built-in by name: ``think_format``, ``exact_answer``, ``numeric_answer`` (below; the last two compare with the
  data column ``train.answer_column``, ``answer`` by default);
* ``package.module:function`` (importable from the working directory or the environment);
* ``path/to/file.py:function`` (relative to the working directory).

:func:`load_rewards` imports each one and calls it once on a sample record: a missing module or function, a
signature TRL cannot call, a result of the wrong length or type, or NaN is one :class:`UserError` naming the function.
Loading a file writes no ``__pycache__`` and leaves no module behind when it fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.errors import UserError

__all__ = ["BUILTIN_REWARDS", "Reward", "final_answer", "load_rewards", "try_rewards"]

# What TRL passes to every reward function besides the data columns (GRPOTrainer._calculate_rewards).
TRL_EXTRA_KWARGS = ("trainer_state", "log_extra", "log_metric")
_THINK = re.compile(r"^\s*<think>(.+?)</think>\s*(\S.*)$", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")  # one level of braces inside: \boxed{\frac{1}{3}}
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def _text(completion) -> str:
    """A completion's text: TRL hands chats as a list of messages, plain prompts as a string."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def final_answer(text: str) -> str:
    """The answer part of a completion: what follows ``</think>`` when there is a reasoning block, else all of it."""
    return text.rsplit("</think>", 1)[-1].strip()


def think_format(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 for a ``<think>...</think>`` block followed by an answer (as Phi-4-mini-reasoning writes), else 0.0."""
    return [1.0 if _THINK.match(_text(c)) else 0.0 for c in completions]


def _normalized(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".")


def _unboxed(text: str) -> str:
    """The content of the last ``\\boxed{}`` (how math answers are marked), or the text when it has none."""
    boxed = _BOXED.findall(text)
    return boxed[-1] if boxed else text


def exact_answer(prompts, completions, answer, completion_ids=None, **kwargs) -> list[float]:
    """1.0 when the final answer equals the ``answer`` column (case, spacing, a final period and a ``\\boxed{}``
    around either ignored), else 0.0."""
    return [float(_normalized(_unboxed(final_answer(_text(c)))) == _normalized(_unboxed(str(a))))
            for c, a in zip(completions, answer)]


# A value: a fraction (\frac{a}{b}, \dfrac, a/b) or a number. Fractions first, so "1/3" is 1/3, not 3.
_VALUE = re.compile(r"(-)?\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*(\d+)\s*\}|([-+]?\d+)\s*/\s*(\d+)(?!\.?\d)|"
                    + _NUMBER.pattern)


def _value(match: re.Match) -> float | None:
    minus, num, den, a, b = match.groups()
    try:
        if num is not None or a is not None:
            value = int(num if num is not None else a) / int(den if den is not None else b)
            return -value if minus else value
        return float(match.group(0).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _last_value(text: str) -> float | None:
    """The last number or fraction of a completion's answer (the content of its last \\boxed{} when it has one)."""
    found = list(_VALUE.finditer(_unboxed(text)))
    return _value(found[-1]) if found else None


def _target_value(text: str) -> float | None:
    """The number an answer column holds: all of it (or of its \\boxed{}, or what follows GSM8K's '####') when that
    is one number or fraction; the last number of plain prose; None for any other expression (\\sqrt{2}, \\pi, an
    interval or a tuple), whose value a number match would misread (as its last digit)."""
    unboxed = _unboxed(text)
    core = (unboxed if unboxed != text else text.rsplit("####", 1)[-1]).strip().strip("$").strip().rstrip(".")
    whole = _VALUE.fullmatch(core)
    if whole:
        return _value(whole)
    if any(ch in core for ch in "\\^{}_()[]π√∞"):  # an expression, an interval or a tuple: not one number
        return None
    found = list(_NUMBER.finditer(core))
    return _value(found[-1]) if found else None


def numeric_answer(prompts, completions, answer, completion_ids=None, tolerance: float = 1e-6, **kwargs):
    """1.0 when the last number or fraction of the final answer (in its last ``\\boxed{}`` if it has one) is within
    ``tolerance`` (relative, and absolute near 0) of the ``answer`` column's value, else 0.0; None for a record whose
    ``answer`` holds no number, or an expression other than a number or a fraction (see :func:`_target_value`)."""
    out = []
    for c, a in zip(completions, answer):
        want = _target_value(str(a))
        got = _last_value(final_answer(_text(c)))
        if want is None:
            out.append(None)
        else:
            out.append(float(got is not None and math.isclose(got, want, rel_tol=tolerance, abs_tol=tolerance)))
    return out


BUILTIN_REWARDS = {"think_format": think_format, "exact_answer": exact_answer, "numeric_answer": numeric_answer}


@dataclass
class Reward:
    spec: str  # as the recipe wrote it
    func: object  # the callable handed to TRL
    weight: float


def _import_file(path_text: str, spec: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"train.rewards: {spec!r}: no file {path} (relative to the working directory {Path.cwd()}).")
    name = f"qlora_phi3_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
    writes = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ beside the user's file
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserError(f"train.rewards: {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.dont_write_bytecode = writes
    return module


def _import_module(target: str, spec: str):
    before = set(sys.modules)
    try:
        return importlib.import_module(target)
    except ImportError as e:
        for name in set(sys.modules) - before:  # nothing half-imported stays behind
            del sys.modules[name]
        raise UserError(f"train.rewards: {spec!r}: cannot import module {target!r} ({e}). Give a built-in "
                        f"({', '.join(BUILTIN_REWARDS)}), package.module:function or path/to/file.py:function.") \
            from None


def _reading(func, column: str, **options):
    """A built-in that compares with the data column ``column`` (``train.answer_column``), under its own name (TRL
    logs a reward by its function's name)."""
    def reward(prompts, completions, completion_ids=None, **kwargs):
        if column not in kwargs:
            data = sorted(k for k in kwargs if k not in TRL_EXTRA_KWARGS)
            raise ValueError(f"it compares with the data column {column!r} (train.answer_column), which the data does "
                             f"not have (its columns: {data or 'none besides prompt'})")
        return func(prompts, completions, kwargs.pop(column), completion_ids, **options, **kwargs)
    reward.__name__ = reward.__qualname__ = func.__name__
    return reward


def resolve_reward(spec: str, tolerance: float = 1e-6, column: str = "answer"):
    """The function that ``spec`` names (see the module docstring)."""
    if spec == "think_format":
        return think_format
    if spec == "exact_answer":
        return _reading(exact_answer, column)
    if spec == "numeric_answer":
        return _reading(numeric_answer, column, tolerance=tolerance)
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UserError(f"train.rewards: {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor "
                        "module:function or path/to/file.py:function.")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _import_file(target, spec) if is_file else _import_module(target, spec)
    func = getattr(module, name, None)
    if func is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(f"train.rewards: {spec!r}: {target} has no function {name!r} (it has: "
                        f"{', '.join(public[:8]) or 'none'}).")
    if not callable(func):
        raise UserError(f"train.rewards: {spec!r}: {name} is a {type(func).__name__}, not a function.")
    return func


def load_rewards(specs: list[str], weights: list[float] | None, tolerance: float = 1e-6,
                 column: str = "answer") -> list[Reward]:
    weights = weights or [1.0] * len(specs)
    return [Reward(spec, resolve_reward(spec, tolerance, column), float(w)) for spec, w in zip(specs, weights)]


def _check_signature(reward: Reward, columns: dict) -> None:
    kwargs = dict(prompts=[], completions=[], completion_ids=[], **columns, **dict.fromkeys(TRL_EXTRA_KWARGS))
    try:
        inspect.signature(reward.func).bind(**kwargs)
    except TypeError as e:
        raise UserError(
            f"train.rewards: {reward.spec!r}: TRL cannot call it with this data ({e}). A reward takes (prompts, "
            f"completions, completion_ids, **columns) with the data's columns {sorted(columns) or '(none)'} as keyword "
            f"arguments, plus {', '.join(TRL_EXTRA_KWARGS)}: end its parameters with **kwargs.") from None
    except ValueError:  # a builtin or C function without a signature: the sample call below decides
        pass


def try_rewards(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
                columns: dict, origin: str) -> None:
    """Call each reward once as TRL will (``columns``: one list per data column, one value per completion) and
    refuse one that raises, returns the wrong length or type, or NaN, saying which and on what (``origin``)."""
    n = len(completions)
    for reward in rewards:
        _check_signature(reward, columns)
        try:
            result = reward.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns,
                                 trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"train.rewards: {reward.spec!r} raised {type(e).__name__}: {e} (tried on {n} sample "
                            f"completions of {origin}, before loading the model).") from None
        if not isinstance(result, (list, tuple)):
            raise UserError(f"train.rewards: {reward.spec!r} returned {type(result).__name__}; it must return a list "
                            f"with one float (or None) per completion.")
        if len(result) != n:
            raise UserError(f"train.rewards: {reward.spec!r} returned {len(result)} rewards for {n} completions "
                            f"({origin}); it must return one per completion.")
        for i, value in enumerate(result):
            if value is None:
                continue
            if not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
                raise UserError(f"train.rewards: {reward.spec!r} returned {value!r} ({type(value).__name__}) for "
                                f"completion {i}; each reward must be a float or None.")
            if not math.isfinite(float(value)):
                raise UserError(f"train.rewards: {reward.spec!r} returned {float(value)} for completion {i} of "
                                f"{origin}; return None for 'does not apply', never NaN or infinity.")
