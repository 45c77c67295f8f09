"""HeadScope's Python API: capture a model's attention maps, read them back, edit heads.

    import capture

    spec = capture.RunSpec(model="smollm2", prompt="The capital of France is", max_new_tokens=5)
    cap = capture.run(spec)                      # from the cache when it is there, else the model runs
    cap.head(3, 2)                               # [query, key] float16, read lazily from the cache
    pruned = capture.run(capture.RunSpec(model="smollm2", prompt=spec.prompt, max_new_tokens=5,
                                         intervention=capture.ablate_heads([(3, 2)])))

Pages, notebooks, the command line and probes come in through this door; the rooms behind it are
`capture.engine` (the attention function, recorder, hooks), one room per modality (`capture.text`,
`capture.vision`, `capture.vlm`, `capture.dit`) and the `registry` of models.  Importing `capture` is
torch-free: a capture served from the cache never loads torch; `run` of a new spec and `load` do.
Every error meant for a person is one of `USER_ERRORS` (core.errors), with a one-sentence message.
"""
from cache.interventions import recall, remember
from capture.api import cached, default_store, load_capture, run
from capture.dit import presets as dit_presets
from capture.embedded import DEFAULT_MODEL, EMBEDDED
from capture.images import sample_names, scene_picture, store_file, store_upload
from capture.registry import load, modality, revision
from capture.text import presets
from capture.vlm import presets as vlm_presets
from capture.vlm.model import MAX_NEW_TOKENS as VLM_MAX_NEW_TOKENS
from core import dit_capture, scenes
from core.errors import (USER_ERRORS, CacheError, HeadScopeError, InputError, InterventionError, ModelUnavailable,
                         ProbeMissing)
from core.interventions import HeadEdit, Intervention, ablate_heads, kv_group_edits, uniform_ablation
from core.progress import Progress, no_progress
from core.qk import HEAD_OVERVIEW_BINS
from core.types import MAX_STEPS, Capture, ModelMeta, Output, RunSpec

# torch-backed names, loaded on first use so that `import capture` stays torch-free
_LAZY = {"continuation_logprobs": "capture.text.logprobs"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'capture' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["run", "cached", "load_capture", "default_store", "load", "modality", "revision", "EMBEDDED",
           "DEFAULT_MODEL", "RunSpec", "Capture", "ModelMeta", "Output", "Intervention", "HeadEdit", "ablate_heads",
           "uniform_ablation", "kv_group_edits", "remember", "recall", "presets", "vlm_presets", "dit_presets",
           "sample_names", "scene_picture", "store_upload", "store_file", "Progress", "no_progress", "USER_ERRORS",
           "HeadScopeError", "InputError", "InterventionError", "ModelUnavailable", "CacheError", "ProbeMissing",
           "continuation_logprobs", "scenes", "dit_capture", "MAX_STEPS", "VLM_MAX_NEW_TOKENS", "HEAD_OVERVIEW_BINS"]
