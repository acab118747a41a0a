"""The lm-eval tasks a command asks for, found and loaded before any model is: the shipped task folder and the
user's ``--include-path`` folders, each task YAML parsed, each task's data at hand.

lm-eval itself skips a task YAML it cannot parse without a word (its index logs it at debug level), and a Hub
data set it cannot reach costs a minute of retries and a traceback. Here each of those is one line that says
which file or task and what to do, before the model loads.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.errors import UserError

__all__ = ["PreparedTasks", "SHIPPED_TASKS_DIR", "TINY_TASK", "check_task_files", "parse_tasks", "prepare_tasks"]

# Package data: found without --include-path, in a checkout and in an installed wheel alike.
SHIPPED_TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "lm_eval_tasks"
TINY_TASK = "tiny_chat_facts"
_HOW_TO_GET = ("fetch its data once on a connected machine (run the same command there: lm-eval downloads into the "
               "Hugging Face cache, ~/.cache/huggingface, which you can copy here), or write a local task YAML "
               "(dataset_path: json, dataset_kwargs.data_files) and pass its folder with --include-path DIR "
               "(docs/evaluate.md)")


def parse_tasks(text: str | list[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; empty names dropped."""
    items = text.split(",") if isinstance(text, str) else (text or [])
    return [t.strip() for t in items if t and t.strip()]


def check_task_files(include_paths: list[Path]) -> None:
    """Every task YAML under the include paths parses (lm-eval would skip a broken one silently, and the task
    would then look unknown)."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    for root in include_paths:
        if not root.is_dir():
            raise UserError(f"--include-path {root}: no such folder; give a folder of lm-eval task YAML files.")
        for path in sorted(root.rglob("*.yaml")):
            try:
                cfg = load_yaml(path, resolve_func=False)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark else str(path)
                raise UserError(f"{where}: invalid task YAML ({getattr(e, 'problem', None) or e}); fix the file "
                                "(lm-eval would skip it, and its task would look unknown).") from None
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read this task YAML ({str(e).splitlines()[0]}).") from None
            if not isinstance(cfg, dict):
                raise UserError(f"{path}: a task YAML is a mapping (task:, dataset_path:, ...), got "
                                f"{type(cfg).__name__}.")


def _lm_eval_tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _builtin_folders() -> dict[str, list[str]]:
    """Each of lm-eval's own task, group and tag names -> the top-level folders of lm_eval/tasks that define it and
    what it includes. lm-eval indexes its ~14,000 task files at every start (34 s on 2 busy cores); this map comes
    from that index, built once per lm-eval version and cached, so a command indexes only the folders it needs."""
    import importlib.metadata
    import json

    from qlora_phi3.files import atomic_write_json

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-phi3"
    path = cache / f"lm_eval_task_folders-{importlib.metadata.version('lm_eval')}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    from qlora_phi3.ui import info

    info(f"indexing lm-eval's task files, once per lm-eval version (cached in {path})...")
    index, root = TaskManager().task_index, _lm_eval_tasks_root()

    def folders(name: str, seen: set) -> set[str]:
        entry = index.get(name)
        if entry is None or name in seen:
            return set()
        seen.add(name)
        found = {entry.yaml_path.relative_to(root).parts[0]} if entry.yaml_path else set()
        listed = (entry.cfg or {}).get("task") if entry.kind.name == "GROUP" else None
        members = list(entry.tags) + [t if isinstance(t, str) else t.get("task") for t in listed or []]
        for member in members:
            if isinstance(member, str):
                found |= folders(member, seen)
        return found

    mapping = {name: sorted(folders(name, set())) for name in index}
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, mapping)
    return mapping


def _task_manager(names: list[str], include_paths: list[Path]):
    """lm-eval's TaskManager over the shipped tasks, the user's folders and only those folders of lm-eval's own
    tasks that ``names`` need; refuses an unknown name."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its info lines would bury our table
    local_paths = [str(SHIPPED_TASKS_DIR), *map(str, include_paths)]
    manager = TaskManager(include_defaults=False, include_path=local_paths)
    known = set(manager.all_tasks)
    wanted = [n for n in names if n not in known]
    if not wanted:
        return manager
    builtin = _builtin_folders()
    _known(wanted, known | set(builtin), include_paths)
    root = _lm_eval_tasks_root()
    folders = sorted({f for n in wanted for f in builtin[n]})
    manager = TaskManager(include_defaults=False, include_path=[*(str(root / f) for f in folders), *local_paths])
    if set(wanted) - set(manager.all_tasks):  # lm-eval changed under its cached map: its own full index
        manager = TaskManager(include_path=local_paths)
    return manager


def _known(names: list[str], everything: set[str], include_paths: list[Path]) -> None:
    for name in names:
        if name in everything:
            continue
        close = difflib.get_close_matches(name, sorted(everything), n=3, cutoff=0.75)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        where = (f"lm-eval's own tasks, {TINY_TASK} and {', '.join(map(str, include_paths))}" if include_paths
                 else f"lm-eval's own tasks and {TINY_TASK}")
        raise UserError(f"--tasks {name}: no such task in {where}.{hint} `lm-eval ls tasks` lists lm-eval's; "
                        "a task of your own needs its YAML's folder given with --include-path DIR.")


def _offline_data_error(e: Exception) -> bool:
    names = {type(c).__name__ for c in (e, e.__cause__, e.__context__) if c is not None}
    text = str(e).lower()
    missing = {"ConnectionError", "DatasetNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"}
    return bool(names & missing) or "offline" in text or "couldn't reach" in text


def _go_offline_if_unreachable() -> bool:
    """Offline at once when the Hub does not answer (qlora_phi3/hub.py), so that a missing data set fails now
    instead of after datasets' retries. Returns whether this process is offline."""
    from qlora_phi3.hub import go_offline, hub_offline, hub_reachable

    if not hub_offline() and not hub_reachable():
        go_offline()
    offline = hub_offline()
    if offline:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
    return offline


def _require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm-evaluation-harness is not installed: pip install -c constraints.txt 'qlora-phi3[eval]' "
                        "(--data answers need no lm-eval).")


@dataclass
class PreparedTasks:
    manager: object  # lm-eval's TaskManager, for simple_evaluate
    generates: bool  # some task generates text (then the KV cache counts in the memory estimate)


def prepare_tasks(names: list[str], include_paths: list[Path]) -> PreparedTasks:
    """Check ``names`` and load each task once (its YAML built, its documents read), so that every problem shows
    before a model loads."""
    if not names:
        raise UserError("--tasks: name at least one lm-eval task (comma-separated), e.g. --tasks tiny_chat_facts.")
    _require_lm_eval()
    include_paths = [Path(p).expanduser() for p in include_paths]
    check_task_files(include_paths)
    manager = _task_manager(names, include_paths)
    offline = _go_offline_if_unreachable()
    generates = False
    for name in names:
        try:
            loaded = manager.load([name])
            generates |= any(t.OUTPUT_TYPE == "generate_until" for t in loaded["tasks"].values())
        except Exception as e:  # noqa: BLE001 - lm-eval raises anything from a task's YAML or data; one line each
            if offline and _offline_data_error(e):
                found = re.search(r"'([\w.-]+/[\w.-]+)'", str(e))
                data = f"its data set {found.group(1)}" if found else "its data set"
                raise UserError(f"--tasks {name}: {data} is on the Hugging Face Hub, which is unreachable (offline), "
                                f"and not in the local cache; {_HOW_TO_GET}.") from None
            entry = manager.task_index.get(name)
            where = f" ({entry.yaml_path})" if getattr(entry, "yaml_path", None) else ""
            raise UserError(f"--tasks {name}{where}: lm-eval cannot build this task ({type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:300]}); fix its YAML.") from None
    return PreparedTasks(manager, generates)
