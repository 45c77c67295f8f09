"""How far heads look back, how spread their attention is, and the reasoning-rhythm metrics WAAD / FAI.

Li et al. 2025, "Attention Illuminates LLM Reasoning" (METHODS.md §4):
- look-back distance d^{l,h} = 1/|R| sum_{t in R} sum_{s <= t} A_ts (t - s): the attention-weighted mean
  distance to the attended key, over the response rows R (all rows when there is no response span);
- head split over all (layer, head): the bottom 30 % by d are the local heads H_loc, the top 30 % the
  global heads H_glob (`frac` = 0.3); A_loc and A_glob are the *means* of the maps in each group;
- WAAD_t = sum_{s <= t} A_loc_ts * min(t - s, W), W = 10 (windowed average attention distance);
- FAI_s = mean over t in T(s) of A_glob_ts, with T(s) = the rows of R from s to the end of the response
  (the paper's analysis variant; the RL variant's [s + 10, s + 50] window is not used here).
Both are linear in the map, so they are computed as the mean of per-head values over H_loc / H_glob
(analytics.summary), in one streaming pass.

Attention entropy (a standard head statistic, e.g. Vig & Belinkov 2019; Clark et al. 2019): per head,
the mean over rows of -sum_j A_ij ln A_ij in nats, over the same rows R with row 0 left out (it has a
single visible key).

Also the preplan / anchor token sets of Li et al.: preplan = top 40 % of tokens by
Delta_t = |WAAD_t - WAAD_{t+1}|, anchors = top 40 % by FAI.

Pure numpy; every function streams the layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analytics.one_pass import WAAD_WINDOW
from analytics.summary import summary_of

SPLIT_FRAC = 0.3  # bottom / top 30 % of heads by look-back distance
TOKEN_SET_FRAC = 0.4  # preplan / anchor sets: top 40 %


def lookback(source, rows: str | range | None = "auto") -> np.ndarray:
    """Mean look-back distance d  # [layer, head], in tokens (Li et al. 2025, METHODS.md §4)."""
    return summary_of(source, rows).lookback.copy()


def entropy(source, rows: str | range | None = "auto") -> np.ndarray:
    """Mean row entropy  # [layer, head], nats, over rows R minus row 0."""
    return summary_of(source, rows).entropy.copy()


@dataclass(frozen=True)
class HeadSplit:
    """local, global_  # [layer, head] bool: bottom / top `frac` of heads by look-back distance."""

    local: np.ndarray
    global_: np.ndarray
    frac: float


def head_split(distance: np.ndarray, frac: float = SPLIT_FRAC, layers: list[int] | None = None) -> HeadSplit:
    """Li et al.'s split: rank every head (of `layers`, default all) by d; the lowest round(frac * n)
    are local, the highest round(frac * n) global (at least one each).  Ties break by head order."""
    d = np.asarray(distance, dtype=np.float64)
    eligible = np.zeros(d.shape, dtype=bool)
    if layers is None:
        eligible[:] = True
    else:
        eligible[list(layers)] = True
    flat = np.flatnonzero(eligible.ravel())
    k = max(1, int(round(frac * len(flat))))
    order = flat[np.argsort(d.ravel()[flat], kind="stable")]
    local = np.zeros(d.size, dtype=bool)
    glob = np.zeros(d.size, dtype=bool)
    local[order[:k]] = True
    glob[order[-k:]] = True
    return HeadSplit(local.reshape(d.shape), glob.reshape(d.shape), frac)


def waad(source, window: int = WAAD_WINDOW, frac: float = SPLIT_FRAC, rows: str | range | None = "auto",
         layers: list[int] | None = None) -> np.ndarray:
    """WAAD_t  # [token] over the local heads (W = 10, bottom 30 %); NaN outside the rows R."""
    summary = summary_of(source, rows, window)
    split = head_split(summary.lookback, frac, layers)
    return summary.waad[split.local].mean(axis=0)


def fai(source, frac: float = SPLIT_FRAC, rows: str | range | None = "auto",
        layers: list[int] | None = None) -> np.ndarray:
    """FAI_s  # [token] over the global heads (top 30 %): mean attention later rows of R pay to s."""
    summary = summary_of(source, rows)
    split = head_split(summary.lookback, frac, layers)
    return summary.fai[split.global_].mean(axis=0)


# ---- the same formulas on one given map (e.g. a hand-built or averaged map) -------------------

def _rows_of(n: int, rows: range | None) -> range:
    return range(0, n) if rows is None else rows


def waad_of_map(attn: np.ndarray, window: int = WAAD_WINDOW, rows: range | None = None) -> np.ndarray:
    """WAAD_t = sum_{s <= t} A_ts min(t - s, W) for one causal map attn  # [query, key]; NaN outside rows."""
    a = np.asarray(attn, dtype=np.float64)
    n = a.shape[0]
    t = np.arange(n)
    w = np.minimum(np.clip(t[:, None] - t[None, :], 0, None), window)
    out = np.full(n, np.nan)
    r = _rows_of(n, rows)
    out[r.start : r.stop] = (a * w).sum(axis=1)[r.start : r.stop]
    return out


def fai_of_map(attn: np.ndarray, rows: range | None = None) -> np.ndarray:
    """FAI_s = mean over t in rows, t >= s, of A_ts, for one causal map attn  # [query, key]."""
    a = np.asarray(attn, dtype=np.float64)
    n = a.shape[0]
    r = _rows_of(n, rows)
    out = np.full(n, np.nan)
    for s in range(n):
        ts = [t for t in r if t >= s]
        if ts:
            out[s] = a[ts, s].mean()
    return out


def token_sets(waad_t: np.ndarray, fai_s: np.ndarray, frac: float = TOKEN_SET_FRAC) -> tuple[np.ndarray, np.ndarray]:
    """(preplan, anchors) bool  # [token]: top 40 % by Delta_t = |WAAD_t - WAAD_{t+1}|, top 40 % by FAI."""
    w = np.asarray(waad_t, dtype=np.float64)
    delta = np.full(w.shape, np.nan)
    delta[:-1] = np.abs(w[:-1] - w[1:])
    return _top(delta, frac), _top(np.asarray(fai_s, dtype=np.float64), frac)


def _top(values: np.ndarray, frac: float) -> np.ndarray:
    ok = np.flatnonzero(np.isfinite(values))
    out = np.zeros(values.shape, dtype=bool)
    if len(ok):
        k = max(1, int(round(frac * len(ok))))
        out[ok[np.argsort(-values[ok], kind="stable")[:k]]] = True
    return out


__all__ = ["SPLIT_FRAC", "HeadSplit", "entropy", "fai", "fai_of_map", "head_split", "lookback", "token_sets",
           "waad", "waad_of_map"]
