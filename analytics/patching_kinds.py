"""Activation patching on the other kinds of model, read back from the cache (issue 24, item 4): a VLM's
language-model heads patched between two pictures (probes.vlm_patching).  Pure numpy, torch-free: the
measurement is the probe's; this module reads its stored result.

The result has the text probe's shape (analytics.attribution.Patching): the metric with each head
patched  # [layer, head] (NaN where not measured), the clean and corrupted metrics and the direction in
its summary, so `Patching.effect` normalises it the same way (0 = nothing changed, 1 = the whole clean -
corrupted gap).
"""
from __future__ import annotations

from analytics.attribution import Patching
from analytics.text import _context, _probe_params
from core import probe_results as stored


def read_vlm_patching(capture=None, **params) -> Patching:
    """The stored vlm_patching result of these VlmPatchingParams fields (store, revision and model as
    analytics.text reads probe results, or from `capture`), or ProbeMissing with the command that makes it."""
    store, revision, model, _ = _context(capture, params)
    return Patching(stored.require(store, revision, model, "vlm_patching", _probe_params("vlm_patching", params)))


__all__ = ["read_vlm_patching"]
