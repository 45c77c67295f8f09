"""Pattern atlases in the Store, as plain arrays and JSON (analytics.patterns.atlas builds the objects).

An atlas is stored as two records, each written arrays first and metadata last (the metadata is what
makes a record visible, so a half-written one is never read):

- the model record, under the autoencoder's key (captures + encoding + training parameters): the
  sampled maps and their latent codes (MODEL_ARRAYS, with the dtypes they are stored in) and the
  autoencoder's weights as "w000", "w001", ... in the order of the metadata's "weights" names;
- the atlas record, under the atlas key (the model key + embedding and clustering parameters):
  ATLAS_ARRAYS, and the model record's key in its metadata.

Both carry metadata kind "patterns" (capture listings skip them) and part "model" / "atlas".  Arrays
are read back as float32 (floats) or int64 (indices) in a `Record`; the caller's `build` turns records
into its objects, and a record it cannot read (a field missing, an older layout) is evicted like a
damaged file, so it is rebuilt instead of failing on every read.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, TypeVar

import numpy as np

from core.errors import CorruptEntry

KIND = "patterns"  # Store metadata "kind" of atlas records
MODEL_ARRAYS = {"images": np.float16, "source": np.int32, "layer": np.int32, "head": np.int32, "query": np.int32,
                "traits": np.float32, "codes": np.float32}
ATLAS_ARRAYS = {"xy": np.float32, "cluster": np.int32, "prototypes": np.float32, "nearest": np.int32,
                "ctraits": np.float32}
UNREADABLE = (CorruptEntry, KeyError, TypeError, ValueError)

T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One stored record: its key, metadata and arrays (floats as float32, indices as int64)."""

    key: str
    meta: dict
    arrays: dict[str, np.ndarray]
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # the model record's autoencoder weights, by name


def _put(store, key: str, arrays: dict[str, np.ndarray], layout: dict) -> None:
    for name, dtype in layout.items():
        store.put_array(key, name, np.asarray(arrays[name]).astype(dtype))


def _read(store, key: str, part: str, layout: dict) -> Record | None:
    meta = store.get_meta(key)
    if not meta or meta.get("kind") != KIND or meta.get("part") != part:
        return None
    arrays = {}
    for name in layout:
        stored = np.asarray(store.get_array(key, name))
        arrays[name] = stored.astype(np.float32 if stored.dtype.kind == "f" else np.int64)
    return Record(key, meta, arrays)


def save_model(store, key: str, meta: dict, arrays: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> None:
    """Store the maps and codes (MODEL_ARRAYS), the autoencoder's weights and then `meta` under `key`."""
    _put(store, key, arrays, MODEL_ARRAYS)
    for i, w in enumerate(weights.values()):
        store.put_array(key, f"w{i:03d}", np.ascontiguousarray(w, dtype=np.float32))
    store.put_meta(key, {**meta, "kind": KIND, "part": "model", "weights": list(weights)})


def load_model(store, key: str, build: Callable[[Record], T]) -> T | None:
    """build(the model record under `key`), or None when there is none (evicted if unreadable)."""
    try:
        found = _read(store, key, "model", MODEL_ARRAYS)
        if found is None:
            return None
        weights = {name: np.asarray(store.get_array(key, f"w{i:03d}")) for i, name in enumerate(found.meta["weights"])}
        return build(replace(found, weights=weights))
    except UNREADABLE:
        store.evict(key)
        return None


def save_atlas(store, key: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Store the atlas's arrays (ATLAS_ARRAYS) and then `meta` (which names its "model_key") under `key`."""
    _put(store, key, arrays, ATLAS_ARRAYS)
    store.put_meta(key, {**meta, "kind": KIND, "part": "atlas"})


def load_atlas(store, key: str, build: Callable[[Record, Record], T]) -> T | None:
    """build(the atlas record under `key`, its model record), or None when either is absent (an
    unreadable one is evicted).  Reads no model: torch is not needed."""
    try:
        found = _read(store, key, "atlas", ATLAS_ARRAYS)
        if found is None:
            return None
        model = load_model(store, found.meta["model_key"], lambda record: record)
        return None if model is None else build(found, model)
    except UNREADABLE:
        store.evict(key)
        return None


def atlas_records(store) -> list[tuple[str, dict]]:
    """(key, metadata) of every stored atlas, oldest first."""
    out = []
    for key in store.keys():
        try:
            record = store.get_meta(key)
        except Exception:  # noqa: BLE001 - an unreadable record is not an atlas
            continue
        if record and record.get("kind") == KIND and record.get("part") == "atlas":
            out.append((key, record))
    return out


__all__ = ["ATLAS_ARRAYS", "KIND", "MODEL_ARRAYS", "Record", "atlas_records", "load_atlas", "load_model", "save_atlas",
           "save_model"]
