"""Attention maps as a stream: one layer, or one block of query rows, at a time.

Every metric in `analytics/` reads its input through `as_maps(x)`, so the same function works on
- a `Capture` (maps read lazily from the cache; a long capture is never unpacked whole: rows come in
  blocks of `BLOCK_ROWS` through `Capture.rows`, and at most one layer's maps are ever held), and
- a plain array, attn  # [layer, head, query, key] or [head, query, key] (hand-built test maps,
  a probe's small maps).

Pure numpy: no torch, no streamlit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

BLOCK_ROWS = 256  # query rows per block: one block of a 9-head, 2,048-token layer is ~19 MB of float32


class Maps:
    """The interface the metrics use."""

    n_layers: int
    n_heads: int
    n_tokens: int
    spans: dict[str, range]
    causal: bool

    def layer(self, layer: int) -> np.ndarray:
        """attn  # [head, query, key] float32 of one layer."""
        raise NotImplementedError

    def blocks(self, layer: int, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row r0, attn  # [head, rows, keys]) for consecutive row blocks of one layer.

        For causal maps the block of rows r0..r1-1 holds keys 0..r1-1 only (later keys are masked
        anyway); for full maps it holds every key."""
        n = self.n_tokens
        for r0 in range(0, n, block_rows):
            r1 = min(n, r0 + block_rows)
            yield r0, self._rows(layer, r0, r1)

    def _rows(self, layer: int, r0: int, r1: int) -> np.ndarray:
        full = self.layer(layer)
        return full[:, r0:r1, :r1] if self.causal else full[:, r0:r1, :]


@dataclass
class ArrayMaps(Maps):
    """Maps held in memory.  attn  # [layer, head, query, key]."""

    attn: np.ndarray
    spans: dict[str, range]
    causal: bool = True

    def __post_init__(self) -> None:
        a = np.asarray(self.attn)
        if a.ndim == 2:
            a = a[None, None]
        elif a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention maps must be [layer, head, query, key], got shape {np.shape(self.attn)}")
        self.attn = a
        self.n_layers, self.n_heads, self.n_tokens = a.shape[0], a.shape[1], a.shape[2]

    def layer(self, layer: int) -> np.ndarray:
        return np.asarray(self.attn[layer], dtype=np.float32)

    def _rows(self, layer: int, r0: int, r1: int) -> np.ndarray:
        stop = r1 if self.causal else self.n_tokens
        return np.asarray(self.attn[layer, :, r0:r1, :stop], dtype=np.float32)


class CaptureMaps(Maps):
    """A `Capture` (or anything shaped like one: `.meta`, `.tokens`, `.spans`, `.attention(layer)`)."""

    def __init__(self, capture) -> None:
        self.capture = capture
        self.n_layers = capture.meta.n_layers
        self.n_heads = capture.meta.n_heads
        self.n_tokens = len(capture.tokens)
        self.spans = dict(getattr(capture, "spans", {}) or {})
        self.causal = bool(getattr(capture.meta, "causal", True))

    def layer(self, layer: int) -> np.ndarray:
        return np.asarray(self.capture.attention(layer), dtype=np.float32)

    def _rows(self, layer: int, r0: int, r1: int) -> np.ndarray:
        rows = getattr(self.capture, "rows", None)
        if rows is not None:  # reads only these rows' bytes
            return rows(layer, r0, r1)
        return super()._rows(layer, r0, r1)


def as_maps(source, spans: dict[str, range] | None = None, causal: bool = True) -> Maps:
    """Wrap a Capture, a Capture-like object or an array as `Maps`."""
    if isinstance(source, Maps):
        return source
    if isinstance(source, np.ndarray):
        return ArrayMaps(source, dict(spans or {}), causal)
    if hasattr(source, "attention") and hasattr(source, "meta"):
        return CaptureMaps(source)
    raise TypeError(f"expected a Capture or an attention array, not {type(source).__name__}")


def selected_rows(maps: Maps, rows: str | range | None = "auto") -> range:
    """The query rows a metric averages over.

    "auto" (the default of METHODS.md §4): the response rows when the capture has a non-empty
    "response" span, else every row.  "all", a span name, or an explicit range also work."""
    n = maps.n_tokens
    if rows is None or rows == "all":
        return range(0, n)
    if isinstance(rows, range):
        return range(max(0, rows.start), min(n, rows.stop))
    if rows == "auto":
        response = maps.spans.get("response")
        if response is not None and len(response) > 0:
            return range(max(0, response.start), min(n, response.stop))
        return range(0, n)
    if rows in maps.spans:
        span = maps.spans[rows]
        return range(max(0, span.start), min(n, span.stop))
    raise ValueError(f"unknown row selection {rows!r}: use 'auto', 'all', a span name or a range")
