"""The Hugging Face Hub, offline first.

A Hub id (``microsoft/Phi-3-mini-4k-instruct``) given on a machine that cannot reach the Hub used to print
22 lines of retries and take up to a minute before one clear error (huggingface_hub retries each request
five times with backoff). Before the first Hub request of a process we ask, once and within seconds, whether
the Hub answers at all; if it does not, this process goes offline (the cache is used, nothing is retried),
and a model or data set that is not cached is one error with the command that downloads it.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from qlora_phi3.errors import UserError

__all__ = ["download_command", "ensure_hub_access", "go_offline", "hub_offline", "hub_reachable", "is_hub_id"]

PROBE_TIMEOUT_SECONDS = 3.0
_reachable: bool | None = None  # asked once per process


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path (the caller checks the embedded model's name before)."""
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def hub_offline() -> bool:
    """Offline by the user's own setting (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or by :func:`go_offline`."""
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                       "TRANSFORMERS_OFFLINE"))


def go_offline() -> None:
    """Offline for the rest of this process: the environment for libraries imported later, and the already
    imported ones' own switches (they read the environment once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True


def hub_reachable(timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Whether a TCP connection to the Hub's endpoint (HF_ENDPOINT, else huggingface.co) opens within
    ``timeout`` seconds; asked once per process."""
    global _reachable
    if _reachable is None:
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                _reachable = True
        except OSError:
            _reachable = False
    return _reachable


def download_command(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str:
    return (f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
            + (f" --revision {revision}" if revision else ""))


def _cached(repo_id: str, revision: str | None, repo_type: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def ensure_hub_access(repo_id: str, revision: str | None, setting: str, repo_type: str = "model") -> None:
    """Before ``repo_id`` is loaded from the Hub: when the Hub does not answer, go offline, and refuse at once
    (naming ``setting`` and the download command) if the repo is not in the local cache."""
    if not is_hub_id(repo_id):
        return
    if not hub_offline():
        if hub_reachable():
            return
        go_offline()
    if repo_type == "dataset":
        return  # datasets keeps its own cache of prepared data too: it says offline whether it has the data
    if not _cached(repo_id, revision, repo_type):
        where = "the Hugging Face Hub is unreachable" if _reachable is False else "offline (HF_HUB_OFFLINE)"
        raise UserError(f"{setting}={repo_id!r}: {where} and it is not in the local cache. Download it once on a "
                        f"connected machine with `{download_command(repo_id, revision, repo_type)}`, or point "
                        f"{setting} at a local directory. To try without a GPU or network: `qlora-phi3 train` (the "
                        "embedded tiny model).")
