"""One streaming pass over a capture's maps that yields every one-pass head statistic at once.

The one-pass metrics (`sink_alpha`, `act_sink`, `lookback`, `entropy`, `waad`, `fai`) are all
reductions of each head's map along rows or columns, so one pass over the layers, in row blocks,
computes all of them: a 2,048-token SmolLM2 capture (30 x 9 heads, 1.1 GB of fp16 maps) is read once,
and only one row block of one layer (~19 MB) is held at a time.

WAAD and FAI (METHODS.md §4) are *linear* in the map, so WAAD of the mean local-head map equals the
mean of the per-head WAADs (and the same for FAI over global heads): the pass keeps per-head WAAD and
FAI vectors ([layer, head, token], small), and `locality.waad` / `locality.fai` average them over the
heads of the 30 % split afterwards, instead of a second pass over the maps.

Pure numpy: no torch, no streamlit.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import numpy as np

from analytics.maps import BLOCK_ROWS, Maps, as_maps, selected_rows
from analytics.one_pass import WAAD_WINDOW, HeadSummary
from analytics.reduced import stored_summary

DEFAULT_WORKERS = min(2, os.cpu_count() or 1)


def head_summary(source, rows: str | range | None = "auto", window: int = WAAD_WINDOW,
                 block_rows: int = BLOCK_ROWS, workers: int | None = None) -> HeadSummary:
    """Stream `source` (a Capture or attn  # [layer, head, query, key]) once and reduce every head.

    Memory: one row block per worker (2 workers by default: numpy releases the GIL, so two layers
    are reduced at once on two cores), plus the [layer, head, token] outputs.

    A long-context capture that stored its reductions at capture time (core.qk) is summarised from
    them instead, without reading any map (analytics.reduced)."""
    found = stored_summary(source, rows, window)
    if found is not None:
        return found
    maps = as_maps(source)
    n, L, H = maps.n_tokens, maps.n_layers, maps.n_heads
    sel = selected_rows(maps, rows)
    received = np.zeros((L, H, n), dtype=np.float64)
    lookback = np.zeros((L, H), dtype=np.float64)
    entropy = np.zeros((L, H), dtype=np.float64)
    waad = np.full((L, H, n), np.nan, dtype=np.float32)
    fai_sum = np.zeros((L, H, n), dtype=np.float64)
    window = int(window)

    def reduce_layer(layer: int) -> None:
        scratch: dict = {}
        for r0, block in maps.blocks(layer, block_rows):  # block  # [head, rows, keys]
            _reduce_block(block, r0, maps.causal, sel, window, received[layer], lookback[layer],
                          entropy[layer], waad[layer], fai_sum[layer], scratch)

    workers = DEFAULT_WORKERS if workers is None else max(1, int(workers))
    if workers == 1 or L == 1:
        for layer in range(L):
            reduce_layer(layer)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="headscope-analytics") as pool:
            list(pool.map(reduce_layer, range(L)))  # each layer writes only its own slices
    n_sel = max(1, len(sel))
    n_ent = len(range(max(sel.start, 1), sel.stop))  # row 0 sees one key: its entropy is 0 by construction
    positions = np.arange(n)
    if maps.causal:
        seen_by = (n - positions).astype(np.float64)  # rows i >= j see key j
        fai_count = np.clip(sel.stop - np.maximum(positions, sel.start), 0, None).astype(np.float64)
    else:
        seen_by = np.full(n, float(n))
        fai_count = np.full(n, float(len(sel)))
    with np.errstate(invalid="ignore", divide="ignore"):
        fai = (fai_sum / fai_count).astype(np.float32)
    fai[..., fai_count == 0] = np.nan
    return HeadSummary(
        n_tokens=n, rows=sel, window=window,
        received=(received / seen_by).astype(np.float32),
        lookback=(lookback / n_sel).astype(np.float32),
        entropy=(entropy / max(1, n_ent)).astype(np.float32),
        waad=waad, fai=fai,
    )


def _reduce_block(a: np.ndarray, r0: int, causal: bool, sel: range, window: int, received: np.ndarray,
                  lookback: np.ndarray, entropy: np.ndarray, waad: np.ndarray, fai_sum: np.ndarray,
                  scratch: dict) -> None:
    """Fold one row block (a  # [head, rows, keys], float32) into the per-head accumulators of its layer."""
    H, R, K = a.shape
    rows = np.arange(r0, r0 + R)
    colsum = a.sum(axis=1)  # [head, keys]
    received[:, :K] += colsum
    rowsum = a.sum(axis=2)  # [head, rows]; 1 up to fp16 rounding
    if causal:
        # sum_j A_ij (i - j) = i * rowsum_i - sum_j A_ij j  (keys above the diagonal are zero)
        dist = rows[None, :] * rowsum - np.einsum("hrk,k->hr", a, np.arange(K, dtype=a.dtype))
        # WAAD_i = sum_j A_ij min(i - j, W) = W rowsum_i - sum_{k < W, j = i - k >= 0} A_ij (W - k)
        k = np.arange(window)
        cols = rows[:, None] - k[None, :]  # [rows, W]
        weight = ((cols >= 0) * (window - k)[None, :]).astype(a.dtype)
        band = a[:, np.arange(R)[:, None], np.clip(cols, 0, None)]  # [head, rows, W]
        waad_rows = window * rowsum - np.einsum("hrw,rw->hr", band, weight)
    else:
        d = np.abs(rows[:, None] - np.arange(K)[None, :]).astype(a.dtype)  # [rows, keys]
        dist = np.einsum("hrk,rk->hr", a, d)
        waad_rows = np.einsum("hrk,rk->hr", a, np.minimum(d, window))
    log_a = scratch.get("log")
    if log_a is None or log_a.size < a.size:
        log_a = scratch["log"] = np.empty(a.size, dtype=a.dtype)
    log_a = log_a[: a.size].reshape(a.shape)
    np.maximum(a, np.finfo(a.dtype).tiny, out=log_a)  # 0 * log(tiny) = 0: zeros add nothing
    np.log(log_a, out=log_a)
    row_entropy = -np.einsum("hrk,hrk->hr", a, log_a)  # [head, rows]
    lo, hi = max(sel.start, r0), min(sel.stop, r0 + R)
    if lo < hi:
        local = slice(lo - r0, hi - r0)
        lookback += dist[:, local].sum(axis=1)
        waad[:, lo:hi] = waad_rows[:, local]
        fai_sum[:, :K] += colsum if (lo, hi) == (r0, r0 + R) else a[:, local].sum(axis=1)
        e_lo = max(lo, 1)
        if e_lo < hi:
            entropy += row_entropy[:, e_lo - r0 : hi - r0].sum(axis=1)


_MEMO: "OrderedDict[tuple, HeadSummary]" = OrderedDict()
_MEMO_LOCK = Lock()
_MEMO_SIZE = 8


def summary_of(source, rows: str | range | None = "auto", window: int = WAAD_WINDOW) -> HeadSummary:
    """`head_summary`, remembered for the last few captures (by capture key), so the six one-pass
    metrics of one capture cost one pass between them.  Arrays are not remembered."""
    key = getattr(source, "key", None)
    if not isinstance(key, str) or isinstance(source, (np.ndarray, Maps)):
        return head_summary(source, rows, window)
    memo_key = (key, repr(rows), int(window))
    with _MEMO_LOCK:
        if memo_key in _MEMO:
            _MEMO.move_to_end(memo_key)
            return _MEMO[memo_key]
    found = head_summary(source, rows, window)
    with _MEMO_LOCK:
        _MEMO[memo_key] = found
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return found


def forget() -> None:
    """Drop the remembered summaries (benchmarks time a cold pass)."""
    with _MEMO_LOCK:
        _MEMO.clear()
