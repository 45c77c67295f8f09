"""`run(spec) -> Capture`, with the cache in front.

A run is served from the cache when a complete capture with the same key exists (the model is not
even loaded).  Otherwise the model is loaded (once per process), the adapter runs and streams each
layer to the cache, and the metadata record is written last.  A per-key lock across processes makes
two processes asking for the same spec compute it once; a corrupt entry is evicted and recomputed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import threading

from cache.store import Store
from capture.registry import load, revision
from core.errors import CacheError, CorruptEntry, InputError, InterventionError
from core.progress import Progress, no_progress
from core.types import Capture, ModelMeta, RunSpec

_default_store: Store | None = None
_default_store_lock = threading.Lock()  # the app's sessions are threads: the first ones ask at once


def default_store() -> Store:
    """The process-wide store at HEADSCOPE_CACHE_DIR (./cache_data by default).

    If that directory cannot be written, a temporary store stands in (`store.temporary` is True and
    `store.problem` says why): captures still work, they just do not outlive the process.
    """
    global _default_store
    with _default_store_lock:
        if _default_store is None:
            try:
                _default_store = Store()
            except CacheError as exc:
                _default_store = Store(tempfile.mkdtemp(prefix="headscope-cache-"))
                _default_store.temporary, _default_store.problem = True, str(exc)
        return _default_store


def _canonical(spec: RunSpec) -> RunSpec:
    """The spec as cached: an image given as a file path (CLI, Python API) is stored and named by its hash."""
    if spec.image is None:
        return spec
    from capture.images import canonical_image

    image = canonical_image(spec.image)
    return spec if image == spec.image else dataclasses.replace(spec, image=image)


def cached(spec: RunSpec, store: Store | None = None) -> Capture | None:
    """The complete cached capture of `spec`, or None; a corrupt one is evicted (and None returned)."""
    store = store or default_store()
    key = _canonical(spec).key(revision(spec.model))
    return _read(store, key)


def load_capture(key: str, store: Store | None = None) -> Capture | None:
    """A cached capture by its key (as shown by `python -m headscope ls`), or None."""
    return _read(store or default_store(), key)


def _read(store: Store, key: str) -> Capture | None:
    try:
        record = store.get_meta(key)
        if record is None:
            return None
        if record.get("kind", "capture") != "capture":  # a probe result (probes.runner): not a capture
            return None
        capture = Capture.from_record(key, record, store)
        for layer in range(capture.meta.n_layers):  # every layer present and sound (CRC checked once per file)
            capture._layer_array(layer)
        return capture
    except (CorruptEntry, KeyError, TypeError, ValueError):
        store.evict(key)
        return None


def adapter_for(meta: ModelMeta):
    """The adapter class of a model's modality room (capture/text, vision, vlm, dit); encoder-decoders
    (ModelMeta.groups) have their own in capture/text."""
    modality = meta.modality
    if meta.groups:
        from capture.text.seq2seq import Seq2SeqAdapter

        return Seq2SeqAdapter
    if modality == "text":
        from capture.text.adapter import TextAdapter

        return TextAdapter
    if modality == "vision":
        from capture.vision.adapter import VisionAdapter

        return VisionAdapter
    if modality == "vlm":
        from capture.vlm.adapter import VlmAdapter

        return VlmAdapter
    if modality == "dit":
        from capture.dit.adapter import DitAdapter

        return DitAdapter
    raise InputError(f"HeadScope cannot capture {modality} models yet.")


def run(spec: RunSpec, store: Store | None = None, progress: Progress = no_progress) -> Capture:
    """Capture `spec`: from the cache if it is there, else by running the model."""
    store = store or default_store()
    if not spec.prompt.strip() and spec.image is None:
        raise InputError("The prompt is empty; type some text (or pick an image) to run.")
    spec = _canonical(spec)
    key = spec.key(revision(spec.model))
    found = _read(store, key)
    if found is not None:
        return found
    with store.lock(key):
        found = _read(store, key)  # another process may have finished it while we waited
        if found is not None:
            return found
        progress(0.0, f"loading {spec.model}")
        handle = load(spec.model)
        spec.intervention.validate(handle.meta.n_layers, handle.meta.n_heads, handle.meta.head_dim)
        adapter = adapter_for(handle.meta)(handle)
        store.evict(key)  # leftovers of an interrupted run
        try:
            with handle.lock:
                capture = adapter.capture(spec, key, store, progress)
            store.put_meta(key, capture.record())
        except OSError as exc:  # disk full, directory gone: nothing half-written may stay behind
            with contextlib.suppress(Exception):
                store.evict(key)
            raise CacheError(f"The capture could not be written to the cache at {store.directory} "
                             f"({exc.strerror or exc}); free some space or set HEADSCOPE_CACHE_DIR.") from exc
        progress(1.0, "done")
        return capture


__all__ = ["run", "cached", "load_capture", "default_store", "CacheError", "InputError", "InterventionError"]
