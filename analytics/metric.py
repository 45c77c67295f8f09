"""`Metric`: one head or token metric as the pages list it (DESIGN.md, "Metrics registry").

Every modality's module declares its metrics as `Metric` objects in one list (analytics.text
TEXT_METRICS, analytics.vision VISION_METRICS, analytics.dit DIT_METRICS, analytics.vlm VLM_METRICS);
analytics/__init__.py assembles `METRICS` from those lists, so a metric declared there appears on every
page at once.  A metric's `compute(capture, **params)` returns
- kind "head":  scores  # [layer, head]  (or [layer, kv_head] where a metric is asked for
  `granularity="kv"`),
- kind "token": scores  # [layer, head, token] or [token].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    title: str
    paper: str  # citation
    kind: str  # "head" -> [layer, head]; "token" -> [layer, head, token] or [token]
    modalities: tuple[str, ...]
    explanation: str  # one line for the UI
    compute: Callable[..., np.ndarray]
    probe: str | None = None  # the probe whose stored result it reads, if any
    threshold: float | None = None  # the paper's cut-off, drawn as a contour / line where it applies
    params: dict[str, Any] = field(default_factory=dict)  # documented defaults

    @property
    def multi_pass(self) -> bool:
        return self.probe is not None
