"""Probes: measurements that run a model several times and score what comes out (DESIGN.md, "probes/").

    import probes

    probes.run_probe("ablation", "smollm2")            # single-head ablation of every head, cached
    probes.run_probe("needle", "smollm2")              # retrieval heads on a needle-in-a-haystack sweep
    probes.run_probe("patching", "smollm2")            # activation patching of every head (IOI prompt)
    probes.run_probe("dla", "smollm2", {"capture": capture.key})  # direct logit attribution of a capture
    probes.hidden_states(capture)                      # the residual stream of one capture (VAR sinks)
    probes.run_headhunter("shapes-dit")                # HeadHunter-lite on the diffusion model
    probes.run_batch(jobs, ray=True)                   # many captures / probes, in-process or on Ray
    probes.split_sweep("patching", "smollm2", parts=4, ray=True)  # one big patching sweep, by layers, on Ray

Each probe runs the model through `capture` and scores it with `analytics`; its result is stored in
the cache (core.probe_results), where `analytics.METRICS` reads it.  Importing `probes` is cheap: a
name below loads its module (and torch) on first use, so a page that only reads stored results
never imports torch.
"""
from __future__ import annotations

import importlib

# public name -> the module that defines it (loaded on first use: most of them import torch)
_WHERE = {
    "run_probe": "probes.runner", "hidden_states": "probes.runner", "pattern_capture": "probes.patterns",
    "ablation_sweep": "probes.ablation", "needle_prompt": "probes.needle", "load_needles": "probes.needle",
    "run_batch": "probes.batch", "JobResult": "probes.batch", "CaptureJob": "probes.jobs", "ProbeJob": "probes.jobs",
    "sweep": "probes.jobs", "read_jobs": "probes.jobs", "job_from_json": "probes.jobs",
    "run_headhunter": ("probes.headhunter", "headhunter"), "HeadHunterParams": "probes.headhunter",
    "HeadHunterResult": "probes.headhunter",
    "build_atlas": "probes.pattern_atlas", "recluster": "probes.pattern_atlas",
    "stored_atlas": "probes.atlas_store", "stored_atlases": "probes.atlas_store",
    "steering_directions": "probes.steering", "SteeringDirections": "probes.steering",
    "vhd": "probes.vlm", "for_capture": "probes.vlm",
    "accuracy_change": "probes.vlm_accuracy", "gaze_pointing": "probes.vlm_accuracy",
    "QUESTIONS_PER_SCENE": "probes.vlm_accuracy",
    "vit_token_norms": ("probes.vision", "token_norms"), "vit_ablation": ("probes.vision", "ablation"),
    "vit_grad_gate": ("probes.vision", "grad_gate"),
    "patching_sweep": "probes.patching", "path_patching_sweep": "probes.path_patching",
    "vlm_patching_sweep": "probes.vlm_patching", "dit_patching_sweep": "probes.dit_patching",
    "vit_patching_sweep": "probes.vit_patching", "split_sweep": "probes.split",
    "attribute": "probes.dla", "dla_probe": "probes.dla",
}


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    module, attribute = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))


__all__ = sorted(_WHERE)
