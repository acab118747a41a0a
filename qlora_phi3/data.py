"""Reading chat data: local JSONL or a Hugging Face dataset, validated record by record.

Each record becomes a list of ``{"role", "content"}`` messages plus where it came from
(``file:line`` or ``dataset[split]#index``), so every problem can be reported precisely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import EMBEDDED_DATA, DataConfig
from .errors import UserError

__all__ = ["ChatRecord", "LoadReport", "load_records", "resolve_data_path", "validate_messages"]

EMBEDDED_DATA_FILE = Path(__file__).parent / "assets" / "tiny_chat.jsonl"
ROLES = ("system", "user", "assistant")


@dataclass
class ChatRecord:
    messages: list[dict]
    origin: str  # "file.jsonl:12" or "org/name[train]#12"


@dataclass
class LoadReport:
    source: str
    total: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> origins

    def skip(self, reason: str, origin: str) -> None:
        self.skipped.setdefault(reason, []).append(origin)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary_lines(self, examples: int = 3) -> list[str]:
        return [f"{len(origins)} x {reason} (e.g. {', '.join(origins[:examples])})"
                for reason, origins in sorted(self.skipped.items(), key=lambda kv: -len(kv[1]))]


def resolve_data_path(path: str) -> str:
    return str(EMBEDDED_DATA_FILE) if path == EMBEDDED_DATA else path


def validate_messages(messages) -> str | None:
    """Why ``messages`` cannot be trained on, or None if it can."""
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} lacks 'role' or 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has unknown role {m['role']!r} (expected system, user or assistant)"
        if not isinstance(m["content"], str):
            return f"message {i} content is not a string"
        if not m["content"].strip():
            return f"message {i} ({m['role']}) has empty content"
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "no assistant turn"
    if "system" in roles[1:]:
        return "system turn not first"
    body = roles[1:] if roles[0] == "system" else roles
    if body[0] != "user":
        return "first turn after the system prompt is not a user turn"
    for a, b in zip(body, body[1:]):
        if a == b:
            return f"two {a} turns in a row"
    return None


def _read_jsonl(path: Path, report: LoadReport) -> list[tuple[object, str]]:
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{path}: the data file is empty; it should hold one JSON conversation per line.")
    rows = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        origin = f"{path}:{lineno}"
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 BOM from Windows editors
        line = line.strip()  # also drops the \r of CRLF line ends
        if not line:
            continue
        report.total += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            report.skip(f"not UTF-8 (byte {e.start})", origin)
            continue
        try:
            rows.append((json.loads(text), origin))
        except json.JSONDecodeError as e:
            report.skip(f"malformed JSON ({e.msg})", origin)
    return rows


def _read_hub(cfg: DataConfig, split: str, report: LoadReport) -> list[tuple[object, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, split=split, revision=cfg.revision)
    except FileNotFoundError as e:
        raise UserError(f"data.path={cfg.path!r}: no such local file, and no such dataset on the Hub "
                        f"({str(e).splitlines()[0]}).") from None
    except (ConnectionError, OSError) as e:
        raise UserError(f"data.path={cfg.path!r}: the Hugging Face Hub is unreachable and the dataset is not "
                        f"cached ({str(e).splitlines()[0]}). Download it once on a connected machine or use a "
                        "local JSONL file.") from None
    except ValueError as e:  # unknown split
        raise UserError(f"data.path={cfg.path!r}: {str(e).splitlines()[0]}") from None
    report.total += len(ds)
    return [(row, f"{cfg.path}[{split}]#{i}") for i, row in enumerate(ds)]


def load_records(cfg: DataConfig, split: str | None = None) -> tuple[list[ChatRecord], LoadReport]:
    """Valid records of ``split`` (default ``cfg.split``); invalid ones are skipped and counted."""
    path = resolve_data_path(cfg.path)
    split = split or cfg.split
    report = LoadReport(source=path)
    local = Path(path).expanduser()
    if local.is_dir():
        raise UserError(f"data.path={cfg.path!r} is a directory; point it at a .jsonl file.")
    if local.is_file():
        rows = _read_jsonl(local, report)
    elif local.suffix in (".jsonl", ".json", ".gz", ".parquet") or path.startswith((".", "/", "~")):
        raise UserError(f"data.path={cfg.path!r}: file not found (working directory {Path.cwd()}).")
    else:
        rows = _read_hub(cfg, split, report)
    records = []
    for row, origin in rows:
        if not isinstance(row, dict) or "messages" not in row:
            report.skip("no 'messages' field", origin)
            continue
        problem = validate_messages(row["messages"])
        if problem:
            report.skip(problem, origin)
            continue
        records.append(ChatRecord([{"role": m["role"], "content": m["content"]} for m in row["messages"]], origin))
    if not records:
        detail = "; ".join(report.summary_lines()) or "no records"
        raise UserError(f"{path}: no usable conversations ({detail}). Each line must be "
                        '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}.')
    return records, report
