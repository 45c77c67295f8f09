"""The one-pass head statistics from reductions stored at capture time (long-context "qk" captures).

A long capture keeps no maps (core.qk), but its recorded pass stored exact reductions of every
head's float32 weights: column sums over all rows (and over the response rows), and per row the
entropy, the mean look-back distance and WAAD with W = 10.  Every field of `HeadSummary` is a sum of
those over a set of rows, so `stored_summary` builds it in milliseconds instead of a pass over
30 × 9 × n² weights:

- received (ACT s_j, Gu et al. alpha)  = colsum_j / (n - j)
- lookback (Li et al.)                 = mean of distance_i over the rows R
- entropy                              = mean of entropy_i over R minus row 0
- waad (per head, W = 10)              = waad_i on R, NaN elsewhere
- fai (per head)                       = colsum over R / the number of rows of R that see j

R is the metrics' row selection (analytics.maps.selected_rows).  FAI needs column sums over exactly
R, so it is available for R = every row, the response rows, or the prompt rows; for any other R (or
another WAAD window) `stored_summary` returns None and analytics.summary streams the maps instead
(computed on request from the stored queries and keys: exact, but a full attention pass).

Pure numpy: no torch, no streamlit.
"""
from __future__ import annotations

import numpy as np

from analytics.maps import as_maps, selected_rows
from analytics.one_pass import WAAD_WINDOW, HeadSummary


def _column_sums(red: dict, params, sel: range, n: int) -> np.ndarray | None:
    """sum_{i in sel} A_ij  # [layer, head, key] float64, or None if the stored sums do not cover `sel`."""
    colsum = np.asarray(red["colsum"], dtype=np.float64)
    if sel == range(0, n):
        return colsum
    split = getattr(params, "split", None)
    if split is None or "colsum_response" not in red:
        return None
    response = np.asarray(red["colsum_response"], dtype=np.float64)
    if sel == range(split, n):
        return response
    if sel == range(0, split):
        return colsum - response
    return None


def stored_summary(source, rows: str | range | None = "auto", window: int = WAAD_WINDOW) -> HeadSummary | None:
    """`HeadSummary` of a capture from its stored reductions, or None when it has none that fit
    (no reductions, another WAAD window, or a row selection the stored column sums do not cover)."""
    reductions = getattr(source, "reductions", None)
    if not callable(reductions) or isinstance(source, np.ndarray):
        return None
    red = reductions()
    params = getattr(source, "qk_params", None)
    if not red or params is None or int(window) != int(params.waad_window):
        return None
    maps = as_maps(source)
    n = maps.n_tokens
    sel = selected_rows(maps, rows)
    fai_sum = _column_sums(red, params, sel, n)
    if fai_sum is None:
        return None
    positions = np.arange(n)
    received = np.asarray(red["colsum"], dtype=np.float64) / (n - positions)  # rows i >= j see key j
    distance = np.asarray(red["distance"], dtype=np.float64)
    entropy_rows = np.asarray(red["entropy"], dtype=np.float64)
    n_ent = len(range(max(sel.start, 1), sel.stop))  # row 0 sees one key: its entropy is 0 by construction
    waad = np.full(distance.shape, np.nan, dtype=np.float32)
    waad[..., sel.start : sel.stop] = np.asarray(red["waad"])[..., sel.start : sel.stop]
    fai_count = np.clip(sel.stop - np.maximum(positions, sel.start), 0, None).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        fai = (fai_sum / fai_count).astype(np.float32)
    fai[..., fai_count == 0] = np.nan
    return HeadSummary(
        n_tokens=n, rows=sel, window=int(window),
        received=received.astype(np.float32),
        lookback=(distance[..., sel.start : sel.stop].sum(-1) / max(1, len(sel))).astype(np.float32),
        entropy=(entropy_rows[..., max(sel.start, 1) : sel.stop].sum(-1) / max(1, n_ent)).astype(np.float32),
        waad=waad, fai=fai,
    )


__all__ = ["stored_summary"]
