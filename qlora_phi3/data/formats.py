"""The chat formats people have, detected from their fields and converted to OpenAI-style messages.

| format              | fields (others are ignored)                         |
|---------------------|-----------------------------------------------------|
| `messages`          | `messages: [{role, content}, ...]` (OpenAI, TRL, ultrachat_200k) |
| `sharegpt`          | `conversations: [{from, value}, ...]`, from in system/human/gpt |
| `alpaca`            | `instruction`, optional `input`, `output` (optional `system`) |
| `prompt_completion` | `prompt`, `completion` (strings, or lists of messages as in TRL) |

Detection order matters: ultrachat_200k rows carry both ``prompt`` and ``messages``, and the
``messages`` hold the whole conversation, so ``messages`` wins.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FORMATS", "RecordProblem", "detect_format", "describe_formats", "format_columns", "to_messages"]

# format -> the fields that identify it (all must be present), in detection order
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
_OPTIONAL = {"alpaca": ("input", "system")}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class RecordProblem(Exception):
    """Why one record cannot be trained on: a short ``reason`` (counted) and a ``detail`` (shown)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def describe_formats() -> str:
    return "; ".join(f"{name} ({' + '.join(keys)})" for name, keys in FORMATS.items())


def detect_format(keys: Iterable[str]) -> str | None:
    """The first format whose identifying fields are all among ``keys``, or None."""
    keys = set(keys)
    for name, needed in FORMATS.items():
        if keys.issuperset(needed):
            return name
    return None


def format_columns(fmt: str, columns: Iterable[str]) -> list[str]:
    """The columns ``fmt`` reads, so a Hub dataset's extra columns are never decoded."""
    wanted = FORMATS[fmt] + _OPTIONAL.get(fmt, ())
    return [c for c in columns if c in wanted]


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise RecordProblem("missing content", f"field '{key}' is null")
    if not isinstance(value, str):
        raise RecordProblem("non-string content", f"field '{key}' is {type(value).__name__}")
    return value


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list):
        raise RecordProblem("not a list of turns", f"'conversations' is {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordProblem("malformed turn", f"turn {i} is {type(t).__name__}, not an object")
        if "from" not in t:
            raise RecordProblem("missing role", f"turn {i} has no 'from'")
        if "value" not in t:
            raise RecordProblem("missing content", f"turn {i} has no 'value'")
        role = SHAREGPT_ROLES.get(t["from"]) if isinstance(t["from"], str) else None
        if role is None:
            raise RecordProblem("unknown role", f"turn {i} from {t['from']!r} (expected system, human or gpt)")
        out.append({"role": role, "content": t["value"]})
    return out


def _side(value, key: str, role: str) -> list:
    """A prompt or completion: a string becomes one turn; a list is already messages (TRL style)."""
    if isinstance(value, list):
        return value
    return [{"role": role, "content": _text({key: value}, key)}]


def to_messages(row, fmt: str | None) -> list:
    """``row`` as ``[{"role", "content"}, ...]`` (not yet validated), or raise RecordProblem."""
    if not isinstance(row, dict):
        raise RecordProblem("not a JSON object", f"got a JSON {type(row).__name__}")
    if fmt is None:
        raise RecordProblem("unrecognised fields", f"fields {sorted(row)[:8]}; expected one of {describe_formats()}")
    missing = [k for k in FORMATS[fmt] if k not in row]
    if missing:
        raise RecordProblem(f"no '{missing[0]}' field", f"fields {sorted(row)[:8]} (format {fmt})")
    if fmt == "messages":
        return row["messages"]
    if fmt == "sharegpt":
        return _sharegpt(row["conversations"])
    if fmt == "alpaca":
        instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
        system = _text(row, "system", required=False)
        user = "\n\n".join(part for part in (instruction, extra) if part.strip())
        turns = [{"role": "system", "content": system}] if system.strip() else []
        return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    return _side(row["prompt"], "prompt", "user") + _side(row["completion"], "completion", "assistant")
