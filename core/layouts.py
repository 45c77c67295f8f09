"""How one layer's maps are laid out on disk, and the helpers that read those layouts.

- "tril" (causal models): [head, n*(n+1)/2] float16, the rows of the lower triangle packed one after
  the other (row i holds keys 0..i).  Half the bytes of the square, and row i's place does not depend
  on n, so generated rows extend the same packing.
- "full" (bidirectional encoders, vision, DiT): [head, query, key] float16.
- "qk" (long causal inputs, core.qk): the layer's queries and keys; maps are computed on request.

A "full" layer whose maps can be non-zero in one block only (a DiT's image-only self-attention on a
token axis of image and text tokens: PixArt, Sana, SD3.5's extra attention) may store just that block,
[..., rows, keys]; `PaddedBlock` reads it back as the [..., n, n] maps with zeros outside, for any slice
(Capture.layout_info["blocks"][layer] = [q0, k0]: where the block starts).

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


class PaddedBlock:
    """stored  # [..., rows, keys], the block at (q0, k0) of maps  # [..., n, n] that are zero elsewhere, read
    as those maps: indexing (integers and unit-step slices) and np.asarray give exactly what the whole maps
    would, reading only the stored entries the index covers."""

    def __init__(self, stored: np.ndarray, n: int, q0: int, k0: int):
        self.stored, self.n, self.q0, self.k0 = stored, n, q0, k0
        self.shape = tuple(stored.shape[:-2]) + (n, n)
        self.dtype, self.ndim = stored.dtype, stored.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1:]
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, last = key[:-2], key[-2:]
        spans, squeeze = [], []
        for index in last:  # each of the two map axes as a range of positions
            if isinstance(index, slice):
                span = range(self.n)[index]
                if span.step != 1:
                    raise IndexError("PaddedBlock reads unit-step slices only")
                spans.append(span), squeeze.append(slice(None))
            else:
                position = range(self.n)[index]  # raises IndexError like an array
                spans.append(range(position, position + 1)), squeeze.append(0)
        lead_shape = np.broadcast_to(np.zeros((), np.int8), self.stored.shape[:-2])[lead].shape
        out = np.zeros(lead_shape + (len(spans[0]), len(spans[1])), dtype=self.dtype)
        (rows, keys), (r_block, k_block) = spans, self.stored.shape[-2:]
        r0, r1 = max(rows.start, self.q0), min(rows.stop, self.q0 + r_block)
        c0, c1 = max(keys.start, self.k0), min(keys.stop, self.k0 + k_block)
        if r0 < r1 and c0 < c1:
            out[..., r0 - rows.start:r1 - rows.start, c0 - keys.start:c1 - keys.start] = \
                self.stored[lead + (slice(r0 - self.q0, r1 - self.q0), slice(c0 - self.k0, c1 - self.k0))]
        return out[(...,) + tuple(squeeze)]


def pack_offset(row: int) -> int:
    """Where row `row` starts in the packed lower triangle."""
    return row * (row + 1) // 2
