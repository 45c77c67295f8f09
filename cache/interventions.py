"""Interventions stored by key, so a link that names only the key opens in a fresh browser.

`remember(intervention)` writes it as JSON under cache_dir()/interventions/<key>.json; `recall(key)`
reads it back.  Plain JSON, checked against its key: nothing read here can run code or smuggle in
another edit (DESIGN.md, "Shareable links").
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cache.store import cache_dir
from core.errors import InterventionError
from core.interventions import Intervention

_KEY = re.compile(r"[0-9a-f]{16}")


def _saved_dir(directory=None) -> Path:
    return Path(directory) if directory is not None else cache_dir() / "interventions"


def remember(intervention: Intervention, directory=None) -> str:
    """Store `intervention` as JSON under its key (cache_dir()/interventions/<key>.json), so a link that
    names only the key (ViewState.intervention) can be opened in a fresh browser.  Returns the key."""
    key = intervention.key()
    if key == "none":
        return key
    folder = _saved_dir(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(intervention.to_json(), separators=(",", ":")))
        tmp.replace(path)
    return key


def recall(key: str, directory=None) -> Intervention | None:
    """The intervention stored under `key` (see `remember`), Intervention() for "none", else None."""
    if key == "none":
        return Intervention()
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        return None
    path = _saved_dir(directory) / f"{key}.json"
    try:
        found = Intervention.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, InterventionError):
        return None
    return found if found.key() == key else None


__all__ = ["remember", "recall"]
