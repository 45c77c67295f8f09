"""Pattern atlases already in the cache, read without the autoencoder's torch code (probes.pattern_atlas builds them).

The Pattern atlas page opens a linked atlas and lists the trained ones through these two functions, so a
shared link to an atlas paints without importing torch.
"""
from __future__ import annotations

from analytics import patterns as P
from cache.atlas import atlas_records, load_atlas
from capture.api import default_store


def stored_atlas(key: str, store=None) -> P.Atlas | None:
    """The atlas stored under `key`, or None (absent, or a broken record, which is evicted)."""
    return load_atlas(store or default_store(), key, P.atlas_from_store)


def stored_atlases(store=None) -> list[tuple[str, dict]]:
    """(key, metadata) of every atlas in the cache, oldest first."""
    return atlas_records(store or default_store())
