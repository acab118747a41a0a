"""Reading chat data (JSONL, JSON arrays, Parquet, gzip, Hugging Face datasets), validated record by record.

Each record becomes a list of ``{"role", "content"}`` messages plus where it came from
(``file:line``, ``file.parquet#row`` or ``dataset[split]#index``), so every problem is reported
precisely. The policy lives here so training and ``qlora-phi3 data`` agree: bad records are skipped
and counted; the load fails if more than ``data.max_bad_fraction`` are bad or nothing usable is left;
``data.strict`` fails on the first bad record. Exact duplicates are reported (with the line of the
first copy) and dropped unless ``data.drop_duplicates`` is false; they are not "bad".
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qlora_phi3.config import EMBEDDED_DATA, DataConfig
from qlora_phi3.errors import UserError
from qlora_phi3.data.formats import FORMATS, RecordProblem, describe_formats, detect_format, format_columns, to_messages

__all__ = ["PHI3_TOKEN_TEXTS", "ChatRecord", "LoadReport", "check_data_file", "digest", "has_named_splits",
           "load_records", "read_rows", "resolve_data_path", "turn_problem"]

EMBEDDED_DATA_FILE = Path(__file__).resolve().parent.parent / "assets" / "tiny_chat.jsonl"
# The bundled preference sets (python -m qlora_phi3.data.synthetic): pairs for dpo/orpo/simpo, labelled answers for kto.
EMBEDDED_PREFERENCE_FILES = {
    "embedded:tiny-prefs": EMBEDDED_DATA_FILE.with_name("tiny_prefs.jsonl"),
    "embedded:tiny-kto": EMBEDDED_DATA_FILE.with_name("tiny_kto.jsonl"),
    "embedded:tiny-sums": EMBEDDED_DATA_FILE.with_name("tiny_sums.jsonl"),  # grpo's prompts, with an answer column
}
ROLES = ("system", "user", "assistant")
# Phi-3's added tokens in id order (0, 1, 2, 32000..32010). The tokenizer matches them anywhere in a string, so
# a reply holding the text "<|end|>" would become the end-of-turn token and end the loss span early; the model
# would learn to stop mid-answer. Such records are rejected (there is no way to escape the text).
PHI3_TOKEN_TEXTS = (
    "<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
    "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>",
    "<|user|>",
)
_EXAMPLE = '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'


@dataclass
class ChatRecord:
    messages: list[dict]
    origin: str  # "file.jsonl:12" or "org/name[train]#12"


@dataclass
class LoadReport:
    source: str
    total: int = 0  # records read (blank lines not counted)
    format: str = ""  # the format the records were read as
    format_origin: str = ""  # "data.format" or "detected from file:line"
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> [(origin, detail)]
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (origin, origin of the first copy)
    duplicates_dropped: bool = True
    notes: list[str] = field(default_factory=list)  # harmless things fixed on the way (BOM, CRLF, ...)
    trailing_user: list[str] = field(default_factory=list)  # origins of conversations whose last (user) turn was cut

    def skip(self, reason: str, origin: str, detail: str = "") -> None:
        self.skipped.setdefault(reason, []).append((origin, detail))

    @property
    def n_bad(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def n_skipped(self) -> int:
        return self.n_bad + (len(self.duplicates) if self.duplicates_dropped else 0)

    def summary_lines(self, examples: int = 3) -> list[str]:
        """One line per reason, most frequent first, with the first examples' file:line."""
        lines = []
        for reason, hits in sorted(self.skipped.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(f"{o} ({d})" if d else o for o, d in hits[:examples])
            lines.append(f"{len(hits)} x {reason}: {shown}{', ...' if len(hits) > examples else ''}")
        if self.duplicates:
            verb = "skipped" if self.duplicates_dropped else "kept (data.drop_duplicates=false)"
            shown = ", ".join(f"{o} (same as {first})" for o, first in self.duplicates[:examples])
            lines.append(f"{len(self.duplicates)} x exact duplicate, {verb}: {shown}"
                         f"{', ...' if len(self.duplicates) > examples else ''}")
        return lines


def resolve_data_path(path: str) -> str:
    if path in EMBEDDED_PREFERENCE_FILES:
        return str(EMBEDDED_PREFERENCE_FILES[path])
    return str(EMBEDDED_DATA_FILE) if path == EMBEDDED_DATA else path


TOOL_ROLES = ("tool", "function", "ipython")  # tool results in OpenAI / older OpenAI / Llama 3 exports


def _joined_text_parts(parts: list, i: int, role: str) -> str:
    """OpenAI-style content parts (``[{"type": "text", "text": ...}, ...]``) as one string: the text parts
    concatenated, as chat templates that accept parts render them. Other parts (images, audio) cannot be
    trained on by a text model: they are a RecordProblem naming the part."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RecordProblem("non-text content part", f"message {i} ({role}) has a {kind!r} part; Phi-3-mini "
                                "reads text only: drop the part or the conversation")
    return "".join(texts)


def _normalized_turns(messages) -> list:
    """``messages`` with text-part lists joined into strings; tool calls and tool results are a RecordProblem
    that names them (Phi-3-mini's chat template has no tool role, so there is no right way to train on them)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            role = m.get("role")
            if role in TOOL_ROLES:
                raise RecordProblem("tool turn", f"message {i} has role {role!r} (a tool result); Phi-3-mini's "
                                    "chat template has no tool role: drop tool conversations or flatten them to text")
            calls = [k for k in ("tool_calls", "function_call") if m.get(k)]
            if calls:
                raise RecordProblem("tool call", f"message {i} ({role}) has {calls[0]!r}; Phi-3-mini's chat template "
                                    "has no tool calls: drop tool conversations or flatten them to text")
            if isinstance(m.get("content"), list):
                m = {**m, "content": _joined_text_parts(m["content"], i, role)}
        out.append(m)
    return out


def _turn_problem(messages) -> RecordProblem | None:
    """Why OpenAI-style ``messages`` cannot be trained on, or None if they can."""
    if not isinstance(messages, list):
        return RecordProblem("not a list of turns", f"got {type(messages).__name__}")
    if not messages:
        return RecordProblem("empty conversation", "no turns")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return RecordProblem("malformed turn", f"message {i} is {type(m).__name__}, not an object")
        if "role" not in m:
            return RecordProblem("missing role", f"message {i} has no 'role'")
        if m["role"] not in ROLES:
            return RecordProblem("unknown role", f"message {i} role {m['role']!r} (expected system, user, assistant)")
        if "content" not in m or m["content"] is None:
            return RecordProblem("missing content", f"message {i} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            return RecordProblem("non-string content", f"message {i} ({m['role']}) content is "
                                                       f"{type(m['content']).__name__}")
        if not m["content"].strip():
            return RecordProblem("empty content", f"message {i} ({m['role']})")
        token = next((t for t in PHI3_TOKEN_TEXTS if t in m["content"]), None)
        if token:
            return RecordProblem("special token in text", f"message {i} ({m['role']}) contains {token!r}, which "
                                 "Phi-3's tokenizer reads as a control token, not as text; remove it")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return RecordProblem("no assistant turn", f"roles {roles}")
    if "system" in roles[1:]:
        return RecordProblem("system turn not first", f"message {roles.index('system', 1)}")
    body = roles[1:] if roles[0] == "system" else roles
    if body[0] == "assistant":
        return RecordProblem("assistant turn first", "the first non-system turn must be a user turn")
    for i, (a, b) in enumerate(zip(body, body[1:]), start=len(roles) - len(body) + 1):
        if a == b:
            return RecordProblem("repeated role", f"messages {i - 1} and {i} are both {a}")
    return None


def turn_problem(messages) -> RecordProblem | None:
    """Why ``messages`` cannot be trained on (text-part lists joined first), as a RecordProblem, or None."""
    try:
        return _turn_problem(_normalized_turns(messages))
    except RecordProblem as p:
        return p


# ---- reading: every reader yields (row, origin, problem) with problem set for unreadable rows ----

def _decode_text(raw: bytes, path: Path, report: LoadReport) -> bytes:
    """``raw`` with a UTF-8 BOM removed; UTF-16 files (Windows 'Unicode') are refused with a fix."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: the file is UTF-16 encoded (Windows 'Unicode'); save it as UTF-8.")
    if raw.startswith(b"\xef\xbb\xbf"):
        report.notes.append("UTF-8 byte-order mark (BOM) at the start of the file ignored")
        raw = raw[3:]
    if b"\r\n" in raw:
        report.notes.append("Windows (CRLF) line ends read as plain line ends")
    return raw


def _jsonl_rows(raw: bytes, path: Path, report: LoadReport) -> Iterator[tuple[object, str, RecordProblem | None]]:
    blank = 0
    for lineno, line in enumerate(raw.splitlines(), start=1):
        origin = f"{path}:{lineno}"
        line = line.strip()  # also drops a stray \r
        if not line:
            blank += 1
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield None, origin, RecordProblem("not UTF-8", f"byte 0x{line[e.start]:02x} at column {e.start + 1}; "
                                                             "re-save the file as UTF-8")
            continue
        try:
            yield json.loads(text), origin, None
        except json.JSONDecodeError as e:
            # json's messages may end in "at" ("Unterminated string starting at"): no "at at column".
            yield None, origin, RecordProblem("malformed JSON", f"{e.msg.removesuffix(' at')} at column {e.colno}")
    if blank:
        report.notes.append(f"{blank} blank line{'s' if blank > 1 else ''} ignored")


def _json_array_rows(raw: bytes, path: Path) -> Iterator[tuple[object, str, RecordProblem | None]]:
    """A file holding one JSON array of records; each record's origin is the line it starts on."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8.") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def fail(msg: str, at: int):
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        raise UserError(f"{path}:{line}: malformed JSON array ({msg} at column {col}); a broken array cannot be "
                        "read past the error, so fix it (or write one JSON object per line, JSONL).")

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.msg, e.pos)
        yield obj, f"{path}:{text.count(chr(10), 0, pos) + 1}", None
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                fail("extra data after the array", skip_ws(pos + 1))
            return
        fail("expected ',' or ']'", pos)


def _parquet_rows(path: Path) -> Iterator[tuple[object, str, RecordProblem | None]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield row, f"{path}#{index}", None
                index += 1
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}).") from None


def _dataset_rows(ds, name: str, fmt: str | None, report: LoadReport, columns=None):
    """Rows of a ``datasets.Dataset``, reading only the columns its format needs (``columns``: a function of the
    column names that picks them instead, for record kinds other than chats, such as preference pairs)."""
    if columns is not None:
        return ((row, f"{name}#{i}", None) for i, row in enumerate(ds.select_columns(columns(ds.column_names))))
    detected = detect_format(ds.column_names)
    fmt = fmt or detected
    if fmt is None or not set(ds.column_names).issuperset(FORMATS[fmt]):
        raise UserError(f"{name}: columns {ds.column_names} do not match "
                        f"{'data.format=' + fmt if fmt else 'any known format'}; expected {describe_formats()}.")
    if not report.format:
        report.format, report.format_origin = fmt, f"detected from the columns of {name}"
    ds = ds.select_columns(format_columns(fmt, ds.column_names))
    return ((row, f"{name}#{i}", None) for i, row in enumerate(ds))


def _read_hub(cfg: DataConfig, split: str):
    from qlora_phi3.hub import download_command, ensure_hub_access

    ensure_hub_access(cfg.path, cfg.revision, "data.path", repo_type="dataset")
    import datasets

    try:
        return datasets.load_dataset(cfg.path, split=split, revision=cfg.revision)
    except FileNotFoundError as e:
        raise UserError(f"data.path={cfg.path!r}: no such local file, and no such dataset on the Hub "
                        f"({str(e).splitlines()[0]}).") from None
    except (ConnectionError, OSError):
        raise UserError(f"data.path={cfg.path!r}: the Hugging Face Hub is unreachable and the dataset is not "
                        f"cached. Download it once on a connected machine (`{download_command(cfg.path, cfg.revision, 'dataset')}`"
                        ") or use a local file (JSONL, JSON, Parquet, .jsonl.gz).") from None
    except ValueError as e:  # unknown split
        raise UserError(f"data.path={cfg.path!r}: {str(e).splitlines()[0]}") from None


def _read_saved(directory: Path, split: str):
    """A directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    import datasets

    ds = datasets.load_from_disk(str(directory))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{directory}: no split {split!r}; it has {', '.join(ds)}. Set data.split.")
        return ds[split]
    return ds


def has_named_splits(cfg: DataConfig) -> bool:
    """Whether ``cfg.path`` has named splits: a Hub dataset or a ``DatasetDict.save_to_disk`` directory do; a
    single file (JSONL, JSON, Parquet, gzip) or a saved ``Dataset`` does not."""
    local = Path(resolve_data_path(cfg.path)).expanduser()
    if local.is_dir():
        return (local / "dataset_dict.json").is_file()
    return not local.is_file() and not _looks_local(cfg.path)


def _looks_local(path: str) -> bool:
    return Path(path).suffix in (".jsonl", ".json", ".gz", ".parquet") or path.startswith((".", "/", "~"))


def read_rows(cfg: DataConfig, split: str, report: LoadReport, columns):
    """Every row of ``cfg.path`` (any source this module reads) as ``(row, origin, problem)``, for readers of record
    kinds other than chats: ``columns`` picks a dataset's columns from their names. The same file checks (UTF-8,
    BOM, CRLF, gzip, a broken JSON array, an empty file) and ``file:line`` origins as for chats."""
    return _rows(cfg, resolve_data_path(cfg.path), split, report, columns)


def _rows(cfg: DataConfig, path: str, split: str, report: LoadReport, columns=None):
    local = Path(path).expanduser()
    fmt = None if cfg.format == "auto" else cfg.format
    if local.is_dir():
        if not _is_saved_dataset(local):
            raise UserError(f"data.path={cfg.path!r} is a directory; point it at a data file (.jsonl, .json, "
                            ".parquet, .jsonl.gz) or a directory written by Dataset.save_to_disk.")
        return _dataset_rows(_read_saved(local, split), f"{local}[{split}]", fmt, report, columns)
    if not local.is_file():
        if _looks_local(path):
            raise UserError(f"data.path={cfg.path!r}: file not found (working directory {Path.cwd()}).")
        return _dataset_rows(_read_hub(cfg, split), f"{cfg.path}[{split}]", fmt, report, columns)
    try:
        with local.open("rb") as f:
            magic = f.read(4)
        if magic == b"PAR1" or local.suffix == ".parquet":
            return _parquet_rows(local)
        raw = local.read_bytes()
    except OSError as e:
        raise UserError(f"data.path={cfg.path!r}: cannot read the file ({e.strerror}).") from None
    if magic[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{local}: a damaged gzip file ({e}); re-compress it or give the plain .jsonl.") from None
    if not raw.strip():
        raise UserError(f"{local}: the data file is empty; it should hold one JSON conversation per line, e.g. "
                        f"{_EXAMPLE}")
    kind = _NOT_JSON.get(local.suffix.lower())
    if kind and not raw.removeprefix(b"\xef\xbb\xbf").lstrip().startswith((b"{", b"[")):
        raise UserError(f"{local}: {kind} is not a supported data format; convert it to JSONL, one JSON conversation "
                        f"per line, e.g. {_EXAMPLE} (or to Parquet with the same columns).")
    raw = _decode_text(raw, local, report)
    if raw.lstrip().startswith(b"["):
        return _json_array_rows(raw, local)
    if raw.lstrip().startswith(b"{") and b"\n" in raw.strip() and _is_one_object(raw):
        raise UserError(f"{local}: holds one JSON object spread over several lines; write one record per line "
                        "(JSONL) or a JSON array of records.")
    return _jsonl_rows(raw, local, report)


def _is_saved_dataset(directory: Path) -> bool:
    return any((directory / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def check_data_file(cfg: DataConfig) -> None:
    """The whole-file checks of a local ``data.path`` (found, a file, readable, not empty, a supported format, UTF-8
    or not), without reading a record and without the heavy libraries: ``train`` runs them before torch loads.
    A Hub dataset or a saved dataset directory is checked where it is read (that needs the datasets library)."""
    path = resolve_data_path(cfg.path)
    local = Path(path).expanduser()
    if local.is_dir() and _is_saved_dataset(local) or not local.exists() and not _looks_local(path):
        return
    _rows(cfg, path, cfg.split, LoadReport(source=path))  # its checks run at the call; the rows are not read


# Files people have that are not JSON: refused as a whole, not reported as one malformed-JSON record per line.
_NOT_JSON = {".csv": "CSV", ".tsv": "TSV", ".txt": "plain text", ".xlsx": "an Excel workbook", ".xls": "an Excel workbook",
             ".md": "Markdown", ".yaml": "YAML", ".yml": "YAML"}


def _is_one_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)  # real JSONL stops at line 2 with "Extra data"
    except (ValueError, UnicodeDecodeError):
        return False


def _apply_policy(cfg: DataConfig, report: LoadReport, records: list[ChatRecord]) -> None:
    apply_bad_record_policy(cfg, report, records, "conversations", f"Expected one of {describe_formats()}, e.g. "
                                                                   f"{_EXAMPLE}")


def apply_bad_record_policy(cfg: DataConfig, report: LoadReport, records: list, kind: str, expected: str) -> None:
    """Refuse data with no usable ``kind`` of record (saying what was ``expected``), or with more bad records than
    ``data.max_bad_fraction``, each with the report's summary of what was wrong and where."""
    summary = "; ".join(report.summary_lines())
    if not records:
        raise UserError(f"{report.source}: no usable {kind} ({summary or 'no records'}). {expected}")
    if report.total and report.n_bad / report.total > cfg.max_bad_fraction:
        raise UserError(f"{report.source}: {report.n_bad} of {report.total} records are bad "
                        f"({report.n_bad / report.total:.0%}, more than data.max_bad_fraction="
                        f"{cfg.max_bad_fraction}): {summary}. Fix them, or raise data.max_bad_fraction to train "
                        "on the rest.")


def digest(value, extra: str = "") -> bytes:
    """A short digest of a JSON-able value (a conversation's messages, a prompt): what duplicate and overlap checks
    compare."""
    return hashlib.blake2b((json.dumps(value, ensure_ascii=False) + extra).encode(), digest_size=16).digest()


def seen_before(report: LoadReport, first_seen: dict, key: bytes, origin: str) -> bool:
    """Whether a record with ``key`` came before (then counted in ``report.duplicates`` with where it first was)."""
    if key in first_seen:
        report.duplicates.append((origin, first_seen[key]))
        return True
    first_seen[key] = origin
    return False


def load_records(cfg: DataConfig, split: str | None = None) -> tuple[list[ChatRecord], LoadReport]:
    """Valid records of ``split`` (default ``cfg.split``), and a report of what was skipped and why."""
    path = resolve_data_path(cfg.path)
    split = split or cfg.split
    report = LoadReport(source=path, duplicates_dropped=cfg.drop_duplicates)
    fmt = None if cfg.format == "auto" else cfg.format
    if fmt:
        report.format, report.format_origin = fmt, "data.format"
    records: list[ChatRecord] = []
    first_seen: dict[bytes, str] = {}  # digest of the messages -> origin of the first copy
    rows = _rows(cfg, path, split, report)
    fmt = fmt or report.format or None  # a dataset's columns may have settled it
    for row, origin, problem in rows:
        report.total += 1
        messages = None
        if problem is None:
            if fmt is None and isinstance(row, dict) and detect_format(row):
                fmt = detect_format(row)
                report.format, report.format_origin = fmt, f"detected from {origin}"
            try:
                messages = _normalized_turns(to_messages(row, fmt))
            except RecordProblem as p:
                problem = p
        problem = problem or _turn_problem(messages)
        if problem:
            if cfg.strict:
                raise UserError(f"{origin}: {problem}. data.strict is true, so the first bad record stops the "
                                "load; fix the record, or set data.strict=false to skip bad records.")
            report.skip(problem.reason, origin, problem.detail)
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[-1]["role"] == "user":  # nothing follows it, so it carries no loss: only compute
            messages = messages[:-1]
            report.trailing_user.append(origin)
        if seen_before(report, first_seen, digest(messages), origin) and cfg.drop_duplicates:
            continue
        records.append(ChatRecord(messages, origin))
    if report.trailing_user:
        n = len(report.trailing_user)
        report.notes.append(f"{n} conversation{'s end' if n > 1 else ' ends'} with a user turn (e.g. "
                            f"{', '.join(report.trailing_user[:3])}): nothing answers it, so it would carry no loss; "
                            "dropped from training, the rest of each conversation kept")
    _apply_policy(cfg, report, records)
    return records, report
