"""Attention maps as fixed-size images, and the traits measured on them (the pattern atlas's input).

Method: Li et al., "Visual Analytics for Vision Transformers" (IEEE TVCG 2023; METHODS.md §3.2) train a
convolutional autoencoder on per-query-patch attention maps on the patch grid; here every map, text or
image, first becomes one small image so that maps of any length or grid are comparable.  Pure numpy.

Encodings (every map becomes an image  # [SIZE, SIZE] = [32, 32] float32, attention mass per cell):

- "text" (one image per head per input).  Rows: 32 query positions i sampled evenly (by rounding
  `linspace`) over FIRST+1 .. n-1, in order, so row r sits at the same relative depth of the sequence
  whatever its length (short inputs repeat rows).  Columns: each key j of row i goes to exactly one
  column, and each row's columns sum to the row's mass (1):
    * columns 0..3: the absolute first keys j = 0..3 (sink column = column 0, whatever n);
    * columns 4..18: past keys by relative offset d = i - j, far to near: column 18 is d = 0 (the
      diagonal), 17 is d = 1 (previous token), ..., 11 is d = 7, then log-spaced bins
      [8,12) [12,18) [18,28) [28,48) [48,96) [96,192) [192,inf) in columns 10..4;
    * columns 19..31: future keys (bidirectional encoders) by d' = j - i, near to far: 1..7 exact,
      then [8,12) [12,18) [18,28) [28,48) [48,96) [96,inf).
  So diagonal, previous-token, sink-column, local-block and broad maps line up as vertical bands
  regardless of length: the query axis is aligned by relative position, the key axis by offset from
  the query (plus the absolute start).  Rows start after the first 4 keys so the diagonal and the
  previous token never fall into the absolute columns.
- "centred" (vision, one image per head per sampled query patch): the query patch's weights on the
  patch grid, shifted so the query patch sits at the centre: offsets (dr, dc) in [-(R-1), R-1] x
  [-(C-1), C-1], resampled (mass-preserving, nearest) to rows/columns 0..30 (identity for a 16 x 16
  grid: cell (15 + dr, 15 + dc)).  Row 31 is filled with the mass on non-patch tokens (CLS,
  registers, a DiT's text tokens): the vision counterpart of the text sink column.
- "uncentred" (vision): the same map on the grid as is (R x C resampled to 31 x 31), row 31 likewise.
  Sampled query patches: a sqrt(q) x sqrt(q) lattice of patch centres (q = 16: rows/cols 2, 6, 10, 14
  of a 16 x 16 grid), the same for every head, so maps are comparable.

The autoencoder sees sqrt(mass) (Euclidean distance of square roots = Hellinger distance of the rows).

Traits (measured on the raw rows at sampling time, mean over the sampled rows; TRAITS order):
  first     mass on key 0 (text) / on non-patch tokens (vision)        -> "sink"
  self      mass on the query itself (diagonal)                        -> "diagonal/self"
  near      mass on the previous token (text) / the 4 adjacent patches -> "previous token" / "neighbours"
  local     mass within LOCAL_TOKENS tokens (excluding key 0) / within 2 patches
  entropy   row entropy / log(visible keys), in [0, 1]                 -> "broad/uniform"
  distance  attention-weighted mean distance from the query, without the sink: tokens (text, keys >= 1)
            or patches (vision, patch keys only); each renormalised to its own mass
  spread    distance / the distance uniform attention over the same keys would have (0 = on the query,
            ~1 = as far as uniform, > 1 = far away: the start of a long text, a corner of the image)
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

SIZE = 32  # every encoded map is SIZE x SIZE
FIRST = 4  # text: absolute first-key columns
PAST_EDGES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 18, 28, 48, 96, 192)  # 15 bins: [e_b, e_b+1), the last open
FUTURE_EDGES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 18, 28, 48, 96)  # 13 bins
SELF_COLUMN = FIRST + len(PAST_EDGES) - 1  # 18
CANVAS = SIZE - 1  # vision: offsets / grid resampled to 31 x 31; row 31 holds the non-patch mass
LOCAL_TOKENS = 8
LOCAL_PATCHES = 2.0
TRAITS = ("first", "self", "near", "local", "entropy", "distance", "spread")
TRAIT_TITLES = {
    "first": "sink mass (key 0 / non-patch tokens)",
    "self": "diagonal (self) mass",
    "near": "previous-token / adjacent-patch mass",
    "local": "local mass (≤8 tokens / ≤2 patches)",
    "entropy": "normalised entropy",
    "distance": "mean distance (tokens / patches)",
    "spread": "mean distance / uniform attention's",
}
ENCODINGS = ("text", "centred", "uncentred")

assert FIRST + len(PAST_EDGES) + len(FUTURE_EDGES) == SIZE


# ---- text encoding --------------------------------------------------------------------------------

def text_queries(n: int, rows: int = SIZE) -> np.ndarray:
    """The query positions  # [rows] int sampled from an n-token map (see the module docstring)."""
    if n < 1:
        raise ValueError("an attention map needs at least one token")
    start = min(FIRST + 1, n - 1)
    return np.rint(np.linspace(start, n - 1, rows)).astype(np.int64)


@lru_cache(maxsize=64)
def _text_columns(n: int, queries: tuple[int, ...]) -> np.ndarray:
    """column  # [rows, n] int: where key j of each sampled row goes in the text image."""
    q = np.asarray(queries)[:, None]
    j = np.arange(n)[None, :]
    d = q - j  # >= 0: past (and self), < 0: future
    past = FIRST + (len(PAST_EDGES) - 1) - (np.searchsorted(PAST_EDGES, np.maximum(d, 0), side="right") - 1)
    future = SELF_COLUMN + 1 + np.searchsorted(FUTURE_EDGES, np.maximum(-d, 1), side="right") - 1
    cols = np.where(d >= 0, past, future)
    cols = np.where(j < FIRST, j + 0 * d, cols)
    cols.setflags(write=False)
    return cols


def encode_text_rows(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """rows  # [head, R, n] attention rows at `queries` -> images  # [head, R, SIZE] float32 ("text")."""
    rows = np.asarray(rows, dtype=np.float32)
    h, r, n = rows.shape
    cols = _text_columns(n, tuple(int(x) for x in queries))  # [R, n]
    flat = (np.arange(h * r)[:, None] * SIZE + np.tile(cols, (h, 1))).ravel()
    out = np.bincount(flat, weights=rows.reshape(h * r, n).ravel().astype(np.float64), minlength=h * r * SIZE)
    return out.reshape(h, r, SIZE).astype(np.float32)


def text_traits(rows: np.ndarray, queries: np.ndarray, causal: bool) -> np.ndarray:
    """rows  # [head, R, n] at `queries` -> traits  # [head, len(TRAITS)] (mean over the rows)."""
    p = np.asarray(rows, dtype=np.float64)
    h, r, n = p.shape
    q = np.asarray(queries)
    j = np.arange(n)
    dist = np.abs(q[:, None] - j[None, :])  # [R, n]
    ar = np.arange(r)
    first = p[..., 0]
    self_ = p[:, ar, q]
    near = np.where(q > 0, p[:, ar, np.maximum(q - 1, 0)], 0.0)
    local = (p * ((dist <= LOCAL_TOKENS) & (j[None, :] >= 1))).sum(-1)
    visible = (q + 1) if causal else np.full(r, n)
    ent = -(p * np.log(np.maximum(p, 1e-12))).sum(-1) / np.log(np.maximum(visible, 2))
    rest = p * (j[None, None, :] >= 1)  # distance is measured without the sink column (its mass is `first`)
    distance = (rest * dist).sum(-1) / np.maximum(rest.sum(-1), 1e-12)
    seen = ((j[None, :] <= q[:, None]) if causal else np.ones((r, n), bool)) & (j[None, :] >= 1)
    uniform = (dist * seen).sum(-1) / np.maximum(seen.sum(-1), 1)  # [R] mean distance of uniform attention
    spread = distance / np.maximum(uniform, 0.5)
    return np.stack([first, self_, near, local, ent, distance, spread], -1).mean(1).astype(np.float32)


def encode_text_map(attn: np.ndarray, rows: int = SIZE) -> np.ndarray:
    """One head's map  # [query, key] -> image  # [rows, SIZE] ("text"); for synthetic maps and tests."""
    attn = np.asarray(attn, dtype=np.float32)
    q = text_queries(attn.shape[0], rows)
    return encode_text_rows(attn[None, q, :], q)[0]


# ---- vision encoding ------------------------------------------------------------------------------

def query_lattice(grid: tuple[int, int], count: int = 16) -> np.ndarray:
    """patches  # [q, 2] (row, col): a sqrt(count) x sqrt(count) lattice of patch centres on the grid."""
    side = max(1, int(round(np.sqrt(count))))
    rows = np.unique(((np.arange(side) + 0.5) * grid[0] / side).astype(np.int64))
    cols = np.unique(((np.arange(side) + 0.5) * grid[1] / side).astype(np.int64))
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


@lru_cache(maxsize=32)
def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] mass-preserving nearest resampling along one axis (columns sum to 1)."""
    m = np.zeros((n_out, n_in))
    if n_in <= n_out:  # upsample: each output cell takes its nearest input cell, which splits its mass
        src = np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)
        m[np.arange(n_out), src] = 1.0
        m /= m.sum(0, keepdims=True)
    else:  # downsample: each input cell adds into the output cell holding its centre
        dst = np.minimum(((np.arange(n_in) + 0.5) * n_out / n_in).astype(np.int64), n_out - 1)
        m[dst, np.arange(n_in)] = 1.0
    m.setflags(write=False)
    return m


def encode_vision_rows(rows: np.ndarray, grid: tuple[int, int], patch_start: int, queries: np.ndarray,
                       centred: bool = True) -> np.ndarray:
    """rows  # [head, q, n] of the query patches `queries`  # [q, 2] -> images  # [head, q, SIZE, SIZE]."""
    rows = np.asarray(rows, dtype=np.float32)
    h, nq, n = rows.shape
    R, C = grid
    patch = rows[..., patch_start : patch_start + R * C].reshape(h, nq, R, C)
    other = rows.sum(-1) - patch.sum((-1, -2))  # mass on CLS / registers / text tokens
    if centred:
        canvas = np.zeros((h, nq, 2 * R - 1, 2 * C - 1), dtype=np.float32)
        for i, (qr, qc) in enumerate(np.asarray(queries)):
            canvas[:, i, R - 1 - qr : 2 * R - 1 - qr, C - 1 - qc : 2 * C - 1 - qc] = patch[:, i]
    else:
        canvas = patch
    ay = _resample_matrix(canvas.shape[-2], CANVAS)
    ax = _resample_matrix(canvas.shape[-1], CANVAS)
    out = np.zeros((h, nq, SIZE, SIZE), dtype=np.float32)
    out[..., :CANVAS, :CANVAS] = np.einsum("yr,hqrc,xc->hqyx", ay, canvas, ax, optimize=True)
    out[..., CANVAS, :] = np.clip(other, 0.0, None)[..., None]
    return out


@lru_cache(maxsize=16)
def _grid_distance(R: int, C: int) -> np.ndarray:
    r, c = np.divmod(np.arange(R * C), C)
    return np.hypot(r[:, None] - r[None, :], c[:, None] - c[None, :])


def vision_traits(rows: np.ndarray, grid: tuple[int, int], patch_start: int, queries: np.ndarray) -> np.ndarray:
    """rows  # [head, q, n] -> traits  # [head, q, len(TRAITS)] for each sampled query patch."""
    p = np.asarray(rows, dtype=np.float64)
    R, C = grid
    qi = np.asarray(queries)[:, 0] * C + np.asarray(queries)[:, 1]  # [q] patch index
    patch = p[..., patch_start : patch_start + R * C]  # [h, q, P]
    dist = _grid_distance(R, C)[qi]  # [q, P]
    first = p.sum(-1) - patch.sum(-1)
    self_ = (patch * (dist == 0)).sum(-1)
    near = (patch * (dist == 1)).sum(-1)
    local = (patch * (dist <= LOCAL_PATCHES)).sum(-1)
    ent = -(p * np.log(np.maximum(p, 1e-12))).sum(-1) / np.log(max(p.shape[-1], 2))
    distance = (patch * dist).sum(-1) / np.maximum(patch.sum(-1), 1e-12)
    spread = distance / np.maximum(dist.mean(-1), 1e-12)
    return np.stack([first, self_, near, local, ent, distance, spread], -1).astype(np.float32)


def patch_span(capture) -> tuple[tuple[int, int], int] | None:
    """(grid, first patch position) of a capture whose tokens include a patch grid, else None."""
    grid = getattr(capture.meta, "grid", None)
    span = capture.spans.get("patches") or capture.spans.get("image")
    if grid is None or span is None or len(span) != grid[0] * grid[1]:
        return None
    return (int(grid[0]), int(grid[1])), span.start

