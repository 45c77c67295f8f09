"""How one layer's maps are laid out on disk, and the helpers that read those layouts.

- "tril" (causal models): [head, n*(n+1)/2] float16, the rows of the lower triangle packed one after
  the other (row i holds keys 0..i).  Half the bytes of the square, and row i's place does not depend
  on n, so generated rows extend the same packing.
- "full" (bidirectional encoders, vision, DiT): [head, query, key] float16.
- "qk" (long causal inputs, core.qk): the layer's queries and keys; maps are computed on request.

The model view's thumbnails are every map max-pooled into `bins` x `bins` blocks (`max_pool`),
stored beside the maps under `overview_name(bins)`.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def _tril_flat_index(n: int) -> np.ndarray:
    """Flat indices of the lower triangle of an n x n matrix, in packed row order."""
    rows, cols = np.tril_indices(n)
    return rows * n + cols


def unpack_tril(packed: np.ndarray, n: int) -> np.ndarray:
    """[..., n*(n+1)/2] packed lower-triangle rows -> [..., n, n] with zeros above the diagonal."""
    lead = packed.shape[:-1]
    out = np.zeros(lead + (n * n,), dtype=packed.dtype)
    out[..., _tril_flat_index(n)] = packed
    return out.reshape(lead + (n, n))


def overview_name(bins: int) -> str:
    """Cache entry name of a capture's model-view thumbnails."""
    return f"overview{bins:04d}"


def max_pool(maps: np.ndarray, bins: int) -> np.ndarray:
    """maps  # [..., n, n] -> [..., bins, bins], the max over each block (ragged last block padded with 0)."""
    n = maps.shape[-1]
    size = -(-n // bins)  # ceil
    padded_n = size * bins
    if padded_n != n:
        pad = [(0, 0)] * (maps.ndim - 2) + [(0, padded_n - n), (0, padded_n - n)]
        maps = np.pad(maps, pad)
    lead = maps.shape[:-2]
    blocks = maps.reshape(lead + (bins, size, bins, size))
    return blocks.max(axis=(-3, -1))


def pack_offset(row: int) -> int:
    """Where row `row` starts in the packed lower triangle."""
    return row * (row + 1) // 2
