"""Running the text probes: one entry point, `run_probe`, with the cache in front.

    run_probe("patterns", "smollm2")   repeated random tokens -> prev-token / induction / echo / duplicate
    run_probe("needle", "smollm2")     needle-in-a-haystack sweep -> retrieval + semantic retrieval scores
    run_probe("ablation", "smollm2")   single-head ablation of every head, batched (zero | mean | uniform)
    run_probe("gradient", "smollm2")   Michel et al. |dL/d gate| per head
    run_probe("duo", "smollm2")        mini DuoAttention gate optimisation on synthetic passkeys
    run_probe("patching", "smollm2")   activation patching of every head, clean -> corrupted (or path patching)
    run_probe("dla", "smollm2", {"capture": key})  direct logit attribution of a capture's tokens
    run_probe("vlm_patching", "shapes-vlm")  activation patching of every LM head between two pictures
    run_probe("dit_patching", "shapes-dit")  activation patching of every head between two prompts, on the picture
    run_probe("vit_patching", "google/vit-base-patch16-224")  the same for an image classifier's class logit
    hidden_states(capture)             the residual stream entering every layer of one capture (VAR)

Each kind lives in its own module (probes.patterns, probes.needle, probes.ablation, probes.gradient,
probes.duo, probes.hidden, probes.patching, probes.dla, probes.vlm_patching,
probes.dit_patching, probes.vit_patching) as a function (handle, params, put, progress,
**options) -> record that stores its arrays with `put(name, array)` and returns the JSON record's own
fields.  `run_probe`
validates the parameters, holds the model's lock while the probe runs, and stores the result under
`core.probe_results.probe_key(model revision, probe, params)`: arrays first, then a JSON record with
`"kind": "probe"` (written last, so a crash never leaves a result that looks whole).  A second call
with the same parameters is served from the cache.  Every probe reports progress through a
`(fraction, message)` callback.  Command line: `python -m headscope probe
{patterns,needle,ablation,gradient,duo,hidden,patching,dla,vlm_patching,dit_patching,vit_patching} ...`.

Deviations from the papers' defaults are listed in each probe's docstring (short contexts and small
probes so that a CPU finishes in minutes).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

import numpy as np

from cache.store import Store
from capture import registry
from capture.api import default_store
from core import probe_results as stored
from core.errors import InputError
from core.probe_results import HiddenParams, ProbeResult
from core.progress import Progress, no_progress
from core.types import Capture
from probes.ablation import ABLATION_MODES, ablation_probe
from probes.dit_patching import dit_patching_probe
from probes.dla import dla_probe
from probes.duo import duo_probe
from probes.gradient import gradient_probe
from probes.hidden import hidden_probe
from probes.needle import needle_probe
from probes.patch_runs import DIRECTIONS
from probes.patch_runs import METRICS as PATCHING_METRICS
from probes.patching import patching_probe
from probes.patterns import pattern_probe
from probes.vit_patching import vit_patching_probe
from probes.vlm_patching import vlm_patching_probe

PROBES: dict[str, Callable] = {
    "patterns": pattern_probe,
    "needle": needle_probe,
    "ablation": ablation_probe,
    "gradient": gradient_probe,
    "duo": duo_probe,
    "hidden": hidden_probe,
    "patching": patching_probe,
    "dla": dla_probe,
    "vlm_patching": vlm_patching_probe,
    "dit_patching": dit_patching_probe,
    "vit_patching": vit_patching_probe,
}


def run_probe(probe: str, model: str = "smollm2", params=None, store: Store | None = None,
              progress: Progress = no_progress, force: bool = False, **options) -> ProbeResult:
    """Compute (or fetch from the cache) one probe result.  `options` are execution settings that do
    not change the result (e.g. `batch_size` of the ablation sweep) and are not part of the key."""
    if probe not in PROBES:
        raise InputError(f"Unknown probe {probe!r}; probes are {', '.join(PROBES)}.")
    try:
        p = stored.params_of(probe, params)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    _validate(probe, p)
    store = store or default_store()
    revision = registry.revision(model)
    key = stored.probe_key(revision, probe, p)
    if not force:
        found = stored.find(store, revision, probe, p)
        if found is not None:
            return found
    with store.lock(key):
        if not force:
            found = stored.find(store, revision, probe, p)
            if found is not None:
                return found
        progress(0.0, f"loading {model}")
        handle = registry.load(model)
        store.evict(key)
        names: list[str] = []

        def put(name: str, array: np.ndarray) -> None:
            store.put_array(key, name, np.ascontiguousarray(array))
            names.append(name)

        if probe in stored.CAPTURE_PROBES:
            options["store"] = store
        t0 = time.perf_counter()
        with handle.lock:
            record = PROBES[probe](handle, p, put, progress, **options)
        store.put_meta(key, finish_record(record, probe, model, revision, p, names, time.perf_counter() - t0))
        progress(1.0, "done")
    result = stored.find(store, revision, probe, p)
    assert result is not None
    return result


def finish_record(record: dict, probe: str, model: str, revision: str, p, arrays: list[str], seconds: float) -> dict:
    """A probe's record as stored: what it returned plus what and how it was computed (core.probe_results)."""
    record.update(kind=stored.KIND, probe=probe, model=model, revision=revision, params=asdict(p), arrays=arrays,
                  seconds=round(seconds, 3))
    return record


def _validate(probe: str, p) -> None:
    if probe == "patterns":
        if p.period < 2 or p.repeats < 2 or not 0 <= p.low < p.high:
            raise InputError("The pattern probe needs period >= 2, repeats >= 2 and 0 <= low < high.")
    elif probe == "needle":
        if not p.lengths or not p.depths or min(p.lengths) < 64 or p.max_new_tokens < 1:
            raise InputError("The needle probe needs lengths >= 64 tokens, at least one depth and max_new_tokens >= 1.")
        if any(not 0 <= d <= 100 for d in p.depths):
            raise InputError("Needle depths are percentages in [0, 100].")
    elif probe == "ablation":
        if p.mode not in ABLATION_MODES:
            raise InputError(f"Unknown ablation mode {p.mode!r}; use zero, mean or uniform.")
        if p.n_tokens < 4 or p.score_last < 1:
            raise InputError("The ablation probe needs n_tokens >= 4 and score_last >= 1.")
    elif probe == "gradient":
        if p.n_texts < 1 or p.n_tokens < 4:
            raise InputError("The gradient probe needs n_texts >= 1 and n_tokens >= 4.")
    elif probe == "patching":
        if p.metric not in PATCHING_METRICS or p.direction not in DIRECTIONS or p.receivers not in ("q", "k", "v"):
            raise InputError("Patching takes metric logit_diff or prob, direction denoise or noise, "
                             "receivers q, k or v.")
        if p.sender and len(p.sender) != 2:
            raise InputError("The path-patching sender is two numbers: its layer and its head.")
    elif probe == "vlm_patching":
        if p.metric not in PATCHING_METRICS or p.direction not in DIRECTIONS or \
                p.positions not in ("all", "image", "text"):
            raise InputError("VLM patching takes metric logit_diff or prob, direction denoise or noise, "
                             "positions all, image or text.")
        if not p.question.strip():
            raise InputError("VLM patching needs a question about the two pictures.")
    elif probe == "vit_patching":
        if p.metric not in PATCHING_METRICS or p.direction not in DIRECTIONS:
            raise InputError("ViT patching takes metric logit_diff or prob, direction denoise or noise.")
    elif probe == "dit_patching":
        if p.metric != "mse" or p.direction not in DIRECTIONS:
            raise InputError("DiT patching takes metric mse and direction denoise or noise.")
    elif probe == "dla" and not p.capture:
        raise InputError("The dla probe needs the key of a capture; `python -m headscope ls` lists them.")
    elif probe == "duo":
        if p.steps < 1 or p.context < 64 or p.sink < 1 or p.recent < 1 or p.passkeys < 1 or p.words < 1:
            raise InputError("The duo probe needs steps, sink, recent, passkeys, words >= 1 and context >= 64.")


def hidden_states(capture: Capture, store: Store | None = None, progress: Progress = no_progress,
                  force: bool = False) -> ProbeResult:
    """Store (or fetch) the residual stream of `capture`; analytics.HiddenStates reads it by layer."""
    store = store or capture.store or default_store()
    return run_probe("hidden", capture.spec.model, HiddenParams(capture=capture.key), store, progress, force)
