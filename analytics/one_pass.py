"""The one-pass head statistics of a capture as one record, `HeadSummary`.

The six one-pass metrics (`sink_alpha`, `act_sink`, `lookback`, `entropy`, `waad`, `fai`) are all
reductions of each head's map along rows or columns.  Two places produce their record: one streamed
pass over the maps (analytics.summary) and the exact reductions a long-context capture stored while it
was recorded (analytics.reduced); analytics.summary.head_summary takes the stored ones when they fit.

Pure numpy: no torch, no streamlit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WAAD_WINDOW = 10  # W of METHODS.md §4 (Li et al. 2025)


@dataclass(frozen=True)
class HeadSummary:
    """Per-head reductions of one capture's maps.  Shapes name their axes."""

    n_tokens: int
    rows: range  # the query rows that lookback, entropy, WAAD and FAI use
    window: int  # WAAD window W
    received: np.ndarray  # [layer, head, key]  ACT s_j = sum_i A_ij / (number of rows that see j), every row
    lookback: np.ndarray  # [layer, head]  attention-weighted mean look-back distance over `rows`
    entropy: np.ndarray  # [layer, head]  mean row entropy (nats) over `rows`, row 0 left out
    waad: np.ndarray  # [layer, head, query]  per-head WAAD_t for t in `rows`, NaN elsewhere
    fai: np.ndarray  # [layer, head, key]  per-head FAI_s = mean over t in `rows`, t >= s, of A_ts

    @property
    def n_layers(self) -> int:
        return self.lookback.shape[0]

    @property
    def n_heads(self) -> int:
        return self.lookback.shape[1]
