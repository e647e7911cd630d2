"""Hugging Face Hub ids (``org/name``, ``org/name@revision``) as model and dataset sources.

A name that is neither a preset nor an existing path but has the shape of a Hub id is resolved
with ``huggingface_hub.snapshot_download`` into the standard HF cache, exactly where
transformers and datasets look: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub`` (read when called, so a changed environment counts).  With
``HF_HUB_OFFLINE=1`` only the cache is used; online, a failed download falls back to a cached
snapshot (huggingface_hub's own rule).  An id that is neither cached nor reachable is one line
saying so and how to fetch it, never a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Hub repo ids: "name" alone is not accepted (it would shadow a missing local folder).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``org/name@revision`` that is not an existing path."""
    return bool(_REPO_ID.match(name)) and not Path(name).exists() and ".." not in name


def split_revision(name: str) -> tuple[str, str | None]:
    repo, _, revision = name.partition("@")
    return repo, revision or None


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def snapshot(name: str, *, repo_type: str = "model", error=ValueError) -> Path:
    """The local folder of Hub repo ``name`` (``org/name[@revision]``), downloading it unless
    offline; ``error`` (an exception class) carries the one-line reason it is not available."""
    from huggingface_hub import snapshot_download

    repo, revision = split_revision(name)
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, cache_dir=str(cache),
                                      local_files_only=offline()))
    except Exception as e:  # noqa: BLE001 (huggingface_hub raises many types; all mean "not available")
        kind = "dataset" if repo_type == "dataset" else "model"
        at = f" at revision {revision}" if revision else ""
        if offline():
            why = f"not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1"
        else:
            why = f"not in the Hugging Face cache ({cache}) and not downloadable ({type(e).__name__}: " \
                  f"{str(e).splitlines()[0] if str(e) else 'no detail'})"
        fetch = f"hf download {repo}{' --repo-type dataset' if repo_type == 'dataset' else ''}"
        raise error(f"{name}: no such local folder, and as a Hub {kind} id{at}: {why}; fetch it where the "
                    f"network is reachable (`{fetch}`) or give a local folder") from None
