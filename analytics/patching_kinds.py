"""Activation patching on the other kinds of model, read back from the cache (issue 24, item 4): a VLM's
language-model heads patched between two pictures (probes.vlm_patching), and shapes-dit's heads patched
between two prompts, measured on the picture (probes.dit_patching); a ViT classifier's heads between two
pictures, on the class logit (probes.vit_patching).  Pure numpy, torch-free: the
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




def read_dit_patching(capture=None, **params) -> Patching:
    """The stored dit_patching result of these DitPatchingParams fields, or ProbeMissing with the command
    that makes it.  Its metric is the distance to the clean picture (clean = 0); `.result.array("clean_image")`
    and `"corrupted_image"`  # [H, W, 3] uint8 are the two prompts' pictures."""
    store, revision, model, _ = _context(capture, params)
    return Patching(stored.require(store, revision, model, "dit_patching", _probe_params("dit_patching", params)))



def read_vit_patching(capture=None, **params) -> Patching:
    """The stored vit_patching result of these VitPatchingParams fields, or ProbeMissing with the command that
    makes it; the record's "target" and "foil" name the classes."""
    store, revision, model, _ = _context(capture, params)
    return Patching(stored.require(store, revision, model, "vit_patching", _probe_params("vit_patching", params)))


__all__ = ["read_dit_patching", "read_vit_patching", "read_vlm_patching"]
