"""Head analytics: numpy in, numpy out.  No torch, no streamlit (DESIGN.md, "One direction of flow").

`METRICS` lists every head metric HeadScope knows; pages build their menus from it, so a metric
registered here appears everywhere at once.  Each modality's module declares its metrics as `Metric`
objects (analytics.metric) in one list, and this front door assembles them, text first:
- analytics.text    TEXT_METRICS: the one-pass statistics of the maps and the stored probe scores,
- analytics.vision  VISION_METRICS: ViT distances, rollout, token norms, ablation and gradient gates,
- analytics.dit     DIT_METRICS: cross-attention share, grounding, attention distance of DiTs,
- analytics.vlm     VLM_METRICS: visual mass, image-centric heads, gaze shifts, VHD, visual sinks,
- analytics.attribution  ATTRIBUTION_METRICS: direct logit attribution and activation patching.

A metric's `compute(capture, **params)` returns scores  # [layer, head] (kind "head") or
# [layer, head, token] / [token] (kind "token"); one that reads a stored probe result raises
`ProbeMissing` (with the command to run) when it is absent.
"""
from __future__ import annotations

import numpy as np

from analytics.attribution import ATTRIBUTION_METRICS
from analytics.dit import DIT_METRICS
from analytics.metric import Metric
from analytics.text import TEXT_METRICS, HiddenStates
from analytics.vision import VISION_METRICS
from analytics.vlm import VLM_METRICS
from core.errors import ProbeMissing

_ALL = (*TEXT_METRICS, *ATTRIBUTION_METRICS, *VISION_METRICS, *DIT_METRICS, *VLM_METRICS)
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
assert len(METRICS) == len(_ALL), "two metrics share a name"


def compute(name: str, capture, **params) -> np.ndarray:
    """METRICS[name].compute(capture, **params), with a clear error for an unknown name."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; metrics are {', '.join(METRICS)}")
    return METRICS[name].compute(capture, **params)


__all__ = ["METRICS", "Metric", "ProbeMissing", "compute", "HiddenStates"]
