"""A big patching sweep split by layers, in-process or over Ray actors (issue 24, item 2: "on Ray for big
sweeps").

Every patching kind (text `patching`, `vlm_patching`, `vit_patching`, `dit_patching`) patches one head per
batch row and can be limited to some layers (`layers`; the other layers' cells stay NaN).  A sweep of a
big model is cut into `parts` jobs of consecutive layers (probes.jobs.ProbeJob, each cached as its own
result), run by probes.batch.run_batch (here, or on Ray with `ray=True` / `address=`), and the parts'
maps merged into the result of the whole sweep, stored under the whole sweep's key, so the Attribution
page, the Head atlas and `run_probe` find it as if one process had computed it.  The merged map equals a
single sweep's exactly: each head is patched alone, whatever else runs in its batch (the batched-sweep
tests check that), and the clean and corrupted metrics are each part's own unpatched runs (checked equal).

    split_sweep("patching", "smollm2", {}, parts=4, ray=True, workers=4)
    python -m headscope probe patching --model smollm2 --parts 4 --ray
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from cache.store import Store
from capture import registry
from capture.api import default_store
from core import probe_results as stored
from core.errors import InputError
from core.progress import Progress, no_progress
from probes.batch import run_batch
from probes.jobs import ProbeJob
from probes.patch_runs import patching_summary
from probes.runner import finish_record

SPLITTABLE = ("patching", "vlm_patching", "vit_patching", "dit_patching")
METRIC_TOLERANCE = 1e-4  # the parts' unpatched metrics must agree this closely (the same runs, other batches)


def layer_parts(n_layers: int, parts: int) -> list[tuple[int, ...]]:
    """`n_layers` layers cut into at most `parts` runs of consecutive layers, as even as can be."""
    if parts < 1:
        raise InputError("--parts must be 1 or more.")
    bounds = np.linspace(0, n_layers, min(parts, n_layers) + 1).round().astype(int)
    return [tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def split_jobs(probe: str, model: str, params, parts: int, n_layers: int) -> list[ProbeJob]:
    """One ProbeJob per part: `params` with `layers` set to that part's layers."""
    p = stored.params_of(probe, params)
    return [ProbeJob(probe, model, {**asdict(p), "layers": layers}) for layers in layer_parts(n_layers, parts)]


def merge_patched(maps: list[np.ndarray]) -> np.ndarray:
    """The parts' patched maps  # [layer, head] (NaN outside each part's layers) as one map; a cell
    measured by two parts is an error (the parts must not overlap)."""
    merged = np.full(maps[0].shape, np.nan)  # [layer, head]
    for m in maps:
        cells = np.isfinite(m)
        if (cells & np.isfinite(merged)).any():
            raise ValueError("two parts measured the same head")
        merged[cells] = m[cells]
    return merged


def split_sweep(probe: str, model: str, params=None, parts: int = 2, store: Store | None = None,
                progress: Progress = no_progress, force: bool = False, **batch_options) -> stored.ProbeResult:
    """The whole sweep of `probe` (one of SPLITTABLE) with `params`, computed as `parts` layer ranges by
    run_batch (`batch_options`: ray, address, workers, retries, gpus_per_worker) and stored under the whole
    sweep's key.  Cached like run_probe: a stored whole sweep is returned without running anything."""
    if probe not in SPLITTABLE:
        raise InputError(f"Only the patching sweeps split by layers ({', '.join(SPLITTABLE)}); not {probe!r}.")
    p = stored.params_of(probe, params)
    if p.layers:
        raise InputError("A split sweep covers every layer; leave out --layers (or run that layer range alone).")
    if getattr(p, "sender", None):
        raise InputError("Path patching from one sender does not split by layers; run it without --parts.")
    store = store or default_store()
    revision = registry.revision(model)
    found = None if force else stored.find(store, revision, probe, p)
    if found is not None:
        return found
    t0 = time.perf_counter()
    jobs = split_jobs(probe, model, p, parts, registry.load(model).meta.n_layers)
    progress(0.02, f"{len(jobs)} parts of {probe} on {model}")
    results = run_batch(jobs, store=store, progress=lambda done, total, _r: progress(0.05 + 0.9 * done / total,
                                                                                       f"{done}/{total} parts done"),
                        **batch_options)
    failed = [r for r in results if not r.ok]
    if failed:
        raise InputError(f"{len(failed)} of {len(jobs)} parts failed; the first: {failed[0].error}")
    found_parts = [stored.find(store, revision, probe, dict(job.params)) for job in jobs]
    values = np.array([[r.summary["clean"], r.summary["corrupted"]] for r in found_parts])  # [part, 2]
    if np.ptp(values, 0).max() > METRIC_TOLERANCE:
        raise ValueError(f"the parts' unpatched metrics differ: {values.tolist()}")
    patched = merge_patched([np.asarray(r.array("patched"), dtype=np.float64) for r in found_parts])
    first = found_parts[0]
    clean, corrupted = (float(v) for v in values[0])
    source, dest = (clean, corrupted) if p.direction == "denoise" else (corrupted, clean)
    record = {k: v for k, v in first.record.items()
              if k not in ("kind", "probe", "model", "revision", "params", "arrays", "seconds")}
    record["summary"] = {**first.summary, **patching_summary(patched, source, dest, p)}
    record["parts"] = [r.key for r in found_parts]
    key = stored.probe_key(revision, probe, p)
    with store.lock(key):
        store.evict(key)
        names = []
        for name in first.record["arrays"]:  # the patched map merged; the others (DiT's pictures) are the same in each part
            store.put_array(key, name, np.ascontiguousarray(patched.astype(np.float32) if name == "patched"
                                                            else first.array(name)))
            names.append(name)
        store.put_meta(key, finish_record(record, probe, model, revision, p, names, time.perf_counter() - t0))
    progress(1.0, "done")
    return stored.find(store, revision, probe, p)


__all__ = ["SPLITTABLE", "layer_parts", "merge_patched", "split_jobs", "split_sweep"]
