"""Pattern atlas: attention maps as fixed-size images, their clusters, and per-head cluster profiles.

Pure numpy (+ scikit-learn for clustering, umap-learn for the 2-D embedding): no torch, no streamlit.
The autoencoder that turns the images into latent codes lives on the torch side
(probes/pattern_atlas.py); this module encodes maps, measures traits, clusters codes, labels
clusters, computes head profiles, and reads/writes a finished `Atlas` to the cache.

Method: Li et al., "Visual Analytics for Vision Transformers" (IEEE TVCG 2023; METHODS.md §3.2) train a
convolutional autoencoder on per-query-patch attention maps on the patch grid, project the codes to 2-D
and cluster them into pattern types; each head is summarised by its distribution over the clusters.
Here the same is done for text heads too, with the alignment below.

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

import threading
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Callable, Iterable, Sequence

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
KIND = "patterns"  # Store metadata "kind" of atlas records (capture listings skip them)

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


# ---- sampled maps ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input the maps come from (a capture, or a synthetic set)."""

    key: str
    model: str
    modality: str  # "text" | "vision" | "dit" | "vlm" | "synthetic"
    intervention: str  # Intervention.key(), "none" when there is none
    title: str  # short human description: the prompt's start or the image name
    n_layers: int
    n_heads: int
    encoding: str  # "text" | "centred" | "uncentred"

    @property
    def group(self) -> str:
        """Heads are compared within a group: one model under one intervention."""
        return self.model if self.intervention == "none" else f"{self.model} · {self.intervention}"


@dataclass
class MapSet:
    """Encoded maps and where each one comes from (all arrays share the first axis, one row per map)."""

    images: np.ndarray  # [map, SIZE, SIZE] float32: attention mass per cell
    source: np.ndarray  # [map] int: index into `sources`
    layer: np.ndarray  # [map] int
    head: np.ndarray  # [map] int
    query: np.ndarray  # [map] int: the query patch index (vision) or -1 (text: the whole map)
    traits: np.ndarray  # [map, len(TRAITS)] float32
    sources: list[Source]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def concat(cls, parts: Sequence["MapSet"]) -> "MapSet":
        sources: list[Source] = []
        pieces = []
        for part in parts:
            pieces.append(part.source + len(sources))
            sources.extend(part.sources)
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts]) if parts else None  # noqa: E731
        if not parts:
            return cls(np.zeros((0, SIZE, SIZE), np.float32), *(np.zeros(0, np.int64) for _ in range(4)),
                       np.zeros((0, len(TRAITS)), np.float32), [])
        return cls(cat("images"), np.concatenate(pieces), cat("layer"), cat("head"), cat("query"), cat("traits"),
                   sources)

    def modality(self) -> np.ndarray:
        """[map] str: the modality of each map's source."""
        return np.asarray([s.modality for s in self.sources])[self.source]

    def family(self) -> np.ndarray:
        """[map] str: "text" or "image" (centred and uncentred maps), the families clustered apart."""
        return np.asarray(["text" if s.encoding == "text" else "image" for s in self.sources])[self.source]


def source_of(capture, encoding: str) -> Source:
    spec = capture.spec
    title = spec.image if spec.image else " ".join(spec.prompt.split())[:48]
    return Source(key=capture.key, model=capture.meta.name, modality=capture.meta.modality,
                  intervention=spec.intervention.key(), title=title or capture.key[:8],
                  n_layers=capture.meta.n_layers, n_heads=capture.meta.n_heads, encoding=encoding)


def encoding_of(capture, vision: str = "centred") -> str:
    """The encoding a capture's maps get: vision ("centred"/"uncentred") for patch-grid models, else text."""
    if capture.meta.modality in ("vision", "dit") and patch_span(capture) is not None:
        return vision
    return "text"


def sample_capture(capture, vision: str = "centred", queries: int = 16) -> MapSet:
    """Encode every head of one capture (text: one image per head; vision: one per sampled query patch).

    Reads a layer's sampled rows only (Capture.row), one layer at a time: never a whole capture, and
    for causal ("tril") layouts never a whole layer either."""
    encoding = encoding_of(capture, vision)
    meta = capture.meta
    L, H, n = meta.n_layers, meta.n_heads, capture.n_tokens
    images, traits, layer_ix, head_ix, query_ix = [], [], [], [], []
    if encoding == "text":
        q = text_queries(n)
        unique, inverse = np.unique(q, return_inverse=True)
        for layer in range(L):
            block = np.stack([np.asarray(capture.row(layer, int(i)), dtype=np.float32) for i in unique], 1)
            block = block[:, inverse]  # [head, R, n]
            images.append(encode_text_rows(block, q))
            traits.append(text_traits(block, q, meta.causal))
            layer_ix.append(np.full(H, layer))
            head_ix.append(np.arange(H))
            query_ix.append(np.full(H, -1))
    else:
        grid, start = patch_span(capture)
        lattice = query_lattice(grid, queries)
        tokens = start + lattice[:, 0] * grid[1] + lattice[:, 1]
        for layer in range(L):
            block = np.stack([np.asarray(capture.row(layer, int(t)), dtype=np.float32) for t in tokens], 1)
            img = encode_vision_rows(block, grid, start, lattice, centred=encoding == "centred")
            images.append(img.reshape(-1, SIZE, SIZE))
            traits.append(vision_traits(block, grid, start, lattice).reshape(-1, len(TRAITS)))
            layer_ix.append(np.full(H * len(tokens), layer))
            head_ix.append(np.repeat(np.arange(H), len(tokens)))
            query_ix.append(np.tile(lattice[:, 0] * grid[1] + lattice[:, 1], H))
    m = sum(len(x) for x in layer_ix)
    return MapSet(np.concatenate(images), np.zeros(m, np.int64), np.concatenate(layer_ix).astype(np.int64),
                  np.concatenate(head_ix).astype(np.int64), np.concatenate(query_ix).astype(np.int64),
                  np.concatenate(traits), [source_of(capture, encoding)])


def sample_maps(captures: Iterable, vision: str = "centred", queries: int = 16,
                progress: Callable[[float, str], None] | None = None) -> MapSet:
    """MapSet of every head of every capture (one capture, one layer at a time)."""
    captures = list(captures)
    parts = []
    for i, capture in enumerate(captures):
        if progress:
            progress(i / max(len(captures), 1), f"encoding maps of {capture.meta.name} ({i + 1}/{len(captures)})")
        parts.append(sample_capture(capture, vision, queries))
    return MapSet.concat(parts)


def maps_from_arrays(maps: Sequence[np.ndarray], model: str = "synthetic", causal: bool = True,
                     title: str = "synthetic") -> MapSet:
    """A text MapSet from loose [query, key] maps (synthetic maps, tests): one 'head' per map."""
    images, traits = [], []
    for attn in maps:
        attn = np.asarray(attn, dtype=np.float32)
        q = text_queries(attn.shape[0])
        images.append(encode_text_rows(attn[None, q, :], q)[0])
        traits.append(text_traits(attn[None, q, :], q, causal)[0])
    m = len(images)
    src = Source(key="synthetic", model=model, modality="text", intervention="none", title=title,
                 n_layers=1, n_heads=m, encoding="text")
    return MapSet(np.stack(images), np.zeros(m, np.int64), np.zeros(m, np.int64), np.arange(m), np.full(m, -1),
                  np.stack(traits), [src])


# ---- synthetic maps of known kinds ----------------------------------------------------------------

SYNTHETIC_KINDS = ("diagonal", "previous", "sink", "uniform", "block")


def synthetic_map(kind: str, n: int, rng: np.random.Generator, causal: bool = True) -> np.ndarray:
    """attn  # [n, n] float32 of a known kind with random strength and a little noise (rows sum to 1).

    diagonal: mass on the query itself; previous: on i-1; sink: on key 0; uniform: flat over the
    visible keys; block: flat within the query's block of 4..12 tokens (block-local)."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    visible = (j <= i) if causal else np.ones((n, n), bool)
    base = visible / visible.sum(1, keepdims=True)
    if kind == "uniform":
        target = base
    elif kind == "diagonal":
        target = (i == j).astype(float)
    elif kind == "previous":
        target = (j == np.maximum(i - 1, 0)).astype(float)
    elif kind == "sink":
        target = (j == 0).astype(float) + 0.0 * i
    elif kind == "block":
        size = int(rng.integers(4, 13))
        target = ((i // size) == (j // size)) & visible
        target = target / target.sum(1, keepdims=True)
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; kinds are {', '.join(SYNTHETIC_KINDS)}")
    strength = rng.uniform(0.75, 0.95) if kind != "uniform" else 1.0
    noise = rng.dirichlet(np.full(n, 0.5), size=n) * visible
    noise = noise / np.maximum(noise.sum(1, keepdims=True), 1e-12)
    attn = strength * target + (1 - strength) * 0.5 * (base + noise)
    attn = attn + (0.05 * noise if kind == "uniform" else 0)
    attn = attn * visible
    return (attn / attn.sum(1, keepdims=True)).astype(np.float32)


def synthetic_set(lengths: Sequence[int] = (24, 48, 96, 160), per: int = 12, seed: int = 0,
                  kinds: Sequence[str] = SYNTHETIC_KINDS) -> tuple[list[np.ndarray], np.ndarray]:
    """(maps, kind index  # [map]): `per` maps of each kind at each length."""
    rng = np.random.default_rng(seed)
    maps, truth = [], []
    for k, kind in enumerate(kinds):
        for n in lengths:
            for _ in range(per):
                maps.append(synthetic_map(kind, n, rng))
                truth.append(k)
    return maps, np.asarray(truth)


# ---- embedding and clustering ---------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterParams:
    method: str = "kmeans"  # "kmeans" (k by silhouette when k == 0) | "hdbscan" (on the 2-D embedding)
    k: int = 0  # 0 = choose by silhouette over k_min..k_max
    k_min: int = 3
    k_max: int = 8
    seed: int = 0
    neighbors: int = 15  # UMAP
    min_dist: float = 0.1
    epochs: int = 200


_WARM_LOCK = threading.Lock()
_WARM: dict[str, float] = {}  # "seconds" once UMAP's kernels are compiled in this process


def warm_umap() -> float:
    """Compile UMAP's numba kernels once per process (~8 s of CPU on a cold process); returns the seconds
    it took (0 once warm).  Runs the code path `embed_2d` uses (precomputed neighbours, spectral start)."""
    import time

    with _WARM_LOCK:
        if "seconds" in _WARM:
            return 0.0
        t0 = time.perf_counter()
        x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
        _umap(x, ClusterParams(neighbors=8, epochs=5))
        _WARM["seconds"] = time.perf_counter() - t0
        return _WARM["seconds"]


def _umap(z: np.ndarray, params: ClusterParams) -> np.ndarray:
    """UMAP of z on exact nearest neighbours (scikit-learn), single-threaded and seeded.

    Handing UMAP the neighbours skips its approximate NN-descent, whose numba compile alone costs
    ~30 s of CPU per process; exact k-NN of 10,000 16-d codes takes well under a second."""
    import warnings

    import umap
    from sklearn.neighbors import NearestNeighbors

    k = min(params.neighbors, len(z) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(z).kneighbors(z)
    reducer = umap.UMAP(n_neighbors=k, min_dist=params.min_dist, n_epochs=params.epochs, random_state=params.seed,
                        n_jobs=1, init="spectral", precomputed_knn=(idx, dist, None))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never call transform()
        warnings.filterwarnings("ignore", message=".*n_jobs value 1 overridden.*")
        return reducer.fit_transform(z).astype(np.float32)


def standardise(codes: np.ndarray) -> np.ndarray:
    """codes  # [map, latent] -> z-scored per dimension (dead dimensions stay 0)."""
    codes = np.asarray(codes, dtype=np.float64)
    sd = codes.std(0)
    return ((codes - codes.mean(0)) / np.where(sd > 1e-8, sd, 1.0)).astype(np.float32)


def embed_2d(codes: np.ndarray, params: ClusterParams = ClusterParams()) -> np.ndarray:
    """xy  # [map, 2] float32: UMAP of the standardised codes (exact neighbours, seeded, single-threaded:
    deterministic)."""
    from threadpoolctl import threadpool_limits

    z = standardise(codes)
    n = len(z)
    if n < 16:  # too few for a neighbour graph: a line is as good as anything
        return np.stack([np.arange(n), np.zeros(n)], 1).astype(np.float32)
    warm_umap()
    with threadpool_limits(1):  # BLAS/OpenMP: one thread (identical results, and no spinning on a busy machine)
        return _umap(z, params)


@dataclass
class Clustering:
    labels: np.ndarray  # [map] int, 0..k-1 ordered by size (largest first); -1 = noise (hdbscan)
    k: int
    scores: dict[str, dict[int, float]] = field(default_factory=dict)  # per family: silhouette per tried k
    chosen: dict[str, int] = field(default_factory=dict)  # per family: the k used


def _sorted_by_size(labels: np.ndarray) -> np.ndarray:
    ids = [c for c in np.unique(labels) if c >= 0]
    order = sorted(ids, key=lambda c: (-(labels == c).sum(), c))
    remap = {old: new for new, old in enumerate(order)}
    return np.asarray([remap.get(int(c), -1) for c in labels], dtype=np.int64)


SILHOUETTE_TOLERANCE = 0.05  # auto k: the smallest k whose silhouette is within 5% of the best


def _kmeans(z: np.ndarray, params: ClusterParams) -> tuple[np.ndarray, int, dict[int, float]]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(z)
    fit = lambda k: KMeans(n_clusters=k, n_init=4, random_state=params.seed).fit_predict(z)  # noqa: E731
    if params.k or n < 4:
        k = max(1, min(params.k or 1, n))
        return fit(k), k, {}
    scores, fits = {}, {}
    for k in range(params.k_min, min(params.k_max, n - 1) + 1):
        labels = fit(k)
        if len(np.unique(labels)) < 2:
            continue
        fits[k] = labels
        scores[k] = float(silhouette_score(z, labels, sample_size=min(n, 2000), random_state=params.seed))
    if not scores:
        return np.zeros(n, np.int64), 1, {}
    top = max(scores.values())
    k = min(k for k, s in scores.items() if s >= top - SILHOUETTE_TOLERANCE * abs(top))
    return fits[k], k, scores


def cluster_codes(codes: np.ndarray, xy: np.ndarray | None = None, params: ClusterParams = ClusterParams(),
                  family: np.ndarray | None = None) -> Clustering:
    """Cluster the maps: k-means (n_init=4) on the standardised latent codes, or HDBSCAN on the 2-D embedding.

    `family`  # [map] str: maps of different encodings (text vs image maps) never share a cluster; each
    family is clustered on its own (its own k) and the cluster ids are then numbered by size.  With
    params.k == 0, k is chosen by silhouette (on up to 2,000 maps) over k_min..k_max: the smallest k
    within SILHOUETTE_TOLERANCE of the best score (the silhouette of attention maps tends to creep up
    with k as one pattern splits by input length; the parsimonious pick keeps one cluster per pattern).
    Deterministic for a given seed."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # OpenMP k-means on one thread: same clusters, 3-20x less CPU on a shared machine
        return _cluster_codes(codes, xy, params, family)


def _cluster_codes(codes, xy, params: ClusterParams, family) -> Clustering:
    from sklearn.cluster import HDBSCAN

    n = len(codes)
    family = np.full(n, "all") if family is None else np.asarray(family)
    if params.method not in ("kmeans", "hdbscan"):
        raise ValueError(f"unknown clustering method {params.method!r}")
    if params.method == "hdbscan" and xy is None:
        raise ValueError("HDBSCAN clusters the 2-D embedding; pass xy")
    labels = np.full(n, -1, np.int64)
    scores, chosen, offset = {}, {}, 0
    for fam in dict.fromkeys(family.tolist()):
        members = np.flatnonzero(family == fam)
        if params.method == "hdbscan":
            part = HDBSCAN(min_cluster_size=max(5, len(members) // 100), copy=True).fit_predict(xy[members])
            k = int(part.max()) + 1 if part.size else 0
        else:
            part, k, scores[fam] = _kmeans(standardise(codes[members]), params)
        chosen[fam] = k
        labels[members] = np.where(part >= 0, part + offset, -1)
        offset += k
    labels = _sorted_by_size(labels)
    return Clustering(labels, int(labels.max()) + 1 if (labels >= 0).any() else 0, scores, chosen)


def purity(truth: np.ndarray, labels: np.ndarray) -> float:
    """Cluster purity: the share of maps whose cluster's majority kind is their own kind."""
    truth, labels = np.asarray(truth), np.asarray(labels)
    total = 0
    for c in np.unique(labels):
        total += np.bincount(truth[labels == c]).max()
    return total / max(len(truth), 1)


def majority(truth: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """{cluster: its majority kind}."""
    return {int(c): int(np.bincount(truth[labels == c]).argmax()) for c in np.unique(labels)}


# ---- cluster descriptions -------------------------------------------------------------------------

def cluster_traits(traits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[k, len(TRAITS)]: the mean traits of each cluster's maps (NaN for an empty cluster)."""
    out = np.full((k, traits.shape[1]), np.nan, dtype=np.float32)
    for c in range(k):
        members = labels == c
        if members.any():
            out[c] = traits[members].mean(0)
    return out


LOCAL_SHARE, LOCAL_SHARE_VISION = 0.5, 0.3


def describe(traits: np.ndarray, modality: str = "text") -> str:
    """A short label for a pattern from its mean traits (TRAITS order).

    The strongest of sink / self / near wins at >= 0.45, with a second one >= 0.25 (or local mass
    >= 0.4) added after "+".  Otherwise: near-uniform rows (entropy >= 0.85) are "broad/uniform"; then
    by where the non-sink mass lies: "local" (local mass >= 0.5, or >= 0.3 on a patch grid where the 13
    patches within 2 hold 5% of uniform attention; or spread <= 0.35, a third of uniform attention's
    distance), "global" (spread >= 0.8) or "mid-range"; a sink share >= 0.25 is added."""
    t = dict(zip(TRAITS, (float(x) for x in traits)))
    vision = modality in ("vision", "dit")
    names = {
        "first": "text tokens" if modality == "dit" else "sink (CLS/prefix tokens)" if vision else "sink (first column)",
        "self": "diagonal/self",
        "near": "neighbour patches" if vision else "previous token",
    }
    short = {"first": "text" if modality == "dit" else "sink", "self": "self",
             "near": "neighbours" if vision else "prev", "local": "local"}
    peaks = sorted(("first", "self", "near"), key=lambda n: -t[n])
    if t[peaks[0]] >= 0.45:
        label = names[peaks[0]]
        if t[peaks[1]] >= 0.25:
            label += f" + {short[peaks[1]]}"
        elif peaks[0] == "first" and t["local"] >= 0.4:
            label += " + local"
        return label
    if t["entropy"] >= 0.85:
        return "broad/uniform"
    sink = f" + {short['first']}" if t["first"] >= 0.25 else ""
    if t["local"] >= (LOCAL_SHARE_VISION if vision else LOCAL_SHARE) or t["spread"] <= 0.35:
        return "local" + sink
    if t["spread"] >= 0.8:
        return "global" + sink
    return "mid-range" + sink


def cluster_labels(ctraits: np.ndarray, modalities: Sequence[str]) -> list[str]:
    """Unique labels for clusters.  Clusters that get the same description are told apart by the trait
    where each differs most from the others (" · local 0.34"), then by " #2", " #3" if still equal."""
    base = [describe(row, m) if np.all(np.isfinite(row)) else "empty" for row, m in zip(ctraits, modalities)]
    labels = list(base)
    scale = np.nanstd(ctraits, 0) + 1e-6 if len(ctraits) else None
    shown = [TRAITS.index(t) for t in ("first", "self", "near", "local", "entropy", "spread")]
    for label in set(base):
        same = [c for c, b in enumerate(base) if b == label]
        if len(same) < 2 or label == "empty":
            continue
        mean = ctraits[same].mean(0)
        for c in same:
            diff = np.abs(ctraits[c, shown] - mean[shown]) / scale[shown]
            t = shown[int(diff.argmax())]
            labels[c] = f"{label} · {TRAITS[t]} {ctraits[c, t]:.2f}"
    seen: dict[str, int] = {}
    for c, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[c] = f"{label} #{seen[label]}"
    return labels


def cluster_modalities(maps: MapSet, labels: np.ndarray, k: int) -> list[str]:
    """The most common source modality in each cluster."""
    mod = maps.modality()
    out = []
    for c in range(k):
        values, counts = np.unique(mod[labels == c], return_counts=True)
        out.append(str(values[counts.argmax()]) if len(values) else "text")
    return out


def nearest_members(codes: np.ndarray, labels: np.ndarray, k: int, count: int = 6) -> np.ndarray:
    """[k, count] map indices nearest (standardised latent distance) to each cluster's mean; -1 pads."""
    z = standardise(codes)
    out = np.full((k, count), -1, dtype=np.int64)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if idx.size:
            d = np.linalg.norm(z[idx] - z[idx].mean(0), axis=1)
            best = idx[np.argsort(d, kind="stable")[:count]]
            out[c, : best.size] = best
    return out


# ---- head profiles --------------------------------------------------------------------------------

def head_profiles(labels: np.ndarray, layer: np.ndarray, head: np.ndarray, n_layers: int, n_heads: int,
                  k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """profiles  # [layer, head, k]: each head's share of maps in each cluster (over inputs and, for
    vision, query patches); rows of heads without maps are all NaN."""
    sel = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
    sel &= np.asarray(labels) >= 0
    counts = np.zeros((n_layers, n_heads, k))
    np.add.at(counts, (layer[sel], head[sel], labels[sel]), 1.0)
    total = counts.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / total, np.nan)


def selection_heads(maps: MapSet, labels: np.ndarray, selected: np.ndarray, names: Sequence[str]) -> list[dict]:
    """The heads some maps come from: one row per (group, layer, head) with its number of selected maps and
    their clusters ("local ×3, sink ×1"), most maps first."""
    rows: dict = {}
    for i in np.asarray(selected, dtype=np.int64):
        group = maps.sources[maps.source[i]].group
        key = (group, int(maps.layer[i]), int(maps.head[i]))
        row = rows.setdefault(key, {"model": group, "layer": key[1], "head": key[2], "maps": 0, "clusters": {}})
        row["maps"] += 1
        c = int(labels[i])
        row["clusters"][c] = row["clusters"].get(c, 0) + 1
    table = sorted(rows.values(), key=lambda r: (-r["maps"], r["model"], r["layer"], r["head"]))
    for r in table:
        r["clusters"] = ", ".join(f"{names[c] if c >= 0 else 'noise'} ×{m}"
                                  for c, m in sorted(r["clusters"].items(), key=lambda x: -x[1]))
    return table


def dominant(profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster  # [layer, head] int (-1: no maps), share  # [layer, head] of that cluster)."""
    filled = np.nan_to_num(profiles, nan=-1.0)
    best = filled.argmax(-1)
    share = np.take_along_axis(filled, best[..., None], -1)[..., 0]
    return np.where(share >= 0, best, -1), np.where(share >= 0, share, np.nan)


def profile_shift(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[layer, head]: total-variation distance between two profiles (0 = same mix, 1 = disjoint)."""
    return 0.5 * np.abs(np.asarray(before) - np.asarray(after)).sum(-1)


def layer_composition(profiles: np.ndarray) -> np.ndarray:
    """[layer, k]: the mean profile of each layer's heads (how the layer splits over pattern types)."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(profiles, axis=1)


# ---- the atlas ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AtlasParams:
    """Everything that determines an atlas besides its captures (all of it goes into the cache keys)."""

    vision: str = "centred"  # encoding of patch-grid models: "centred" | "uncentred"
    queries: int = 16  # vision: query patches per head
    latent: int = 16
    steps: int = 600  # autoencoder optimiser steps (mini-batches of `batch`), whatever the number of maps
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0
    cluster: ClusterParams = ClusterParams()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "AtlasParams":
        data = dict(data)
        data["cluster"] = ClusterParams(**data.get("cluster", {}))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def model_json(self) -> dict:
        """The part that determines the maps and the trained autoencoder."""
        d = self.to_json()
        d.pop("cluster")
        return d


@dataclass
class Atlas:
    """A trained pattern atlas: maps, codes, 2-D embedding, clusters, prototypes, labels."""

    key: str  # atlas key (model key + embedding/clustering params)
    model_key: str  # autoencoder key (captures + encoding + training params)
    params: AtlasParams
    maps: MapSet
    codes: np.ndarray  # [map, latent] float32
    xy: np.ndarray  # [map, 2] float32
    cluster: np.ndarray  # [map] int
    k: int
    prototypes: np.ndarray  # [k, SIZE, SIZE] float32: the decoded centre of each cluster (mass units)
    nearest: np.ndarray  # [k, m] map indices nearest to each centre
    labels: list[str]  # automatic labels
    ctraits: np.ndarray  # [k, len(TRAITS)]
    scores: dict[str, dict[int, float]] = field(default_factory=dict)  # per family: silhouette per tried k
    chosen: dict[str, int] = field(default_factory=dict)  # per family: clusters used
    loss: list[float] = field(default_factory=list)  # autoencoder training loss (every 50 steps)
    timings: dict[str, float] = field(default_factory=dict)

    def groups(self) -> list[str]:
        """Source groups (model · intervention) in first-seen order."""
        return list(dict.fromkeys(s.group for s in self.maps.sources))

    def group_mask(self, group: str, source: int | None = None) -> np.ndarray:
        """[map] bool: the maps of one group (optionally of one source in it)."""
        in_group = np.asarray([s.group == group for s in self.maps.sources])
        mask = in_group[self.maps.source]
        return mask if source is None else mask & (self.maps.source == source)

    def profiles(self, group: str, source: int | None = None) -> np.ndarray:
        """[layer, head, k] of one group's heads (over all its inputs, or one `source`)."""
        src = next(s for s in self.maps.sources if s.group == group)
        return head_profiles(self.cluster, self.maps.layer, self.maps.head, src.n_layers, src.n_heads, self.k,
                             self.group_mask(group, source))


def _put_mapset(store, key: str, maps: MapSet) -> dict:
    store.put_array(key, "images", maps.images.astype(np.float16))
    for name in ("source", "layer", "head", "query"):
        store.put_array(key, name, getattr(maps, name).astype(np.int32))
    store.put_array(key, "traits", maps.traits.astype(np.float32))
    return {"sources": [asdict(s) for s in maps.sources]}


def _get_mapset(store, key: str, record: dict) -> MapSet:
    get = lambda name: np.asarray(store.get_array(key, name))  # noqa: E731
    return MapSet(get("images").astype(np.float32), *(get(n).astype(np.int64) for n in ("source", "layer", "head", "query")),
                  get("traits").astype(np.float32), [Source(**s) for s in record["sources"]])


def save_model_record(store, model_key: str, maps: MapSet, codes: np.ndarray, weights: dict[str, np.ndarray],
                      params: AtlasParams, loss: list[float], timings: dict) -> None:
    """Store the sampled maps, the autoencoder's weights and the codes under `model_key` (meta last)."""
    record = _put_mapset(store, model_key, maps)
    store.put_array(model_key, "codes", codes.astype(np.float32))
    for i, (name, w) in enumerate(weights.items()):
        store.put_array(model_key, f"w{i:03d}", np.ascontiguousarray(w, dtype=np.float32))
    record.update(kind=KIND, part="model", params=params.to_json(), weights=list(weights), loss=list(loss),
                  timings=timings)
    store.put_meta(model_key, record)


def load_model_record(store, model_key: str) -> tuple[MapSet, np.ndarray, dict[str, np.ndarray], dict] | None:
    """(maps, codes, weights, record) stored under `model_key`, or None."""
    from core.errors import CorruptEntry

    try:
        record = store.get_meta(model_key)
        if not record or record.get("kind") != KIND or record.get("part") != "model":
            return None
        maps = _get_mapset(store, model_key, record)
        codes = np.asarray(store.get_array(model_key, "codes"), dtype=np.float32)
        weights = {name: np.asarray(store.get_array(model_key, f"w{i:03d}"))
                   for i, name in enumerate(record["weights"])}
        return maps, codes, weights, record
    except (CorruptEntry, KeyError, TypeError, ValueError):
        store.evict(model_key)
        return None


def save_atlas(store, atlas: Atlas) -> None:
    """Store the embedding, clusters and prototypes under `atlas.key` (meta last)."""
    store.put_array(atlas.key, "xy", atlas.xy.astype(np.float32))
    store.put_array(atlas.key, "cluster", atlas.cluster.astype(np.int32))
    store.put_array(atlas.key, "prototypes", atlas.prototypes.astype(np.float32))
    store.put_array(atlas.key, "nearest", atlas.nearest.astype(np.int32))
    store.put_array(atlas.key, "ctraits", atlas.ctraits.astype(np.float32))
    store.put_meta(atlas.key, {"kind": KIND, "part": "atlas", "model_key": atlas.model_key, "k": atlas.k,
                               "labels": atlas.labels, "modalities": cluster_modalities(atlas.maps, atlas.cluster, atlas.k), "params": atlas.params.to_json(),
                               "scores": {f: {str(k): v for k, v in sc.items()} for f, sc in atlas.scores.items()},
                               "chosen": atlas.chosen,
                               "timings": atlas.timings})


def load_atlas(store, key: str) -> Atlas | None:
    """A stored atlas by key (no torch needed), or None when it (or its model record) is absent."""
    from core.errors import CorruptEntry

    try:
        record = store.get_meta(key)
        if not record or record.get("kind") != KIND or record.get("part") != "atlas":
            return None
        model = load_model_record(store, record["model_key"])
        if model is None:
            return None
        maps, codes, _, model_record = model
        get = lambda name: np.asarray(store.get_array(key, name))  # noqa: E731
        ctraits = get("ctraits").astype(np.float32)
        return Atlas(key=key, model_key=record["model_key"], params=AtlasParams.from_json(record["params"]),
                     maps=maps, codes=codes, xy=get("xy").astype(np.float32), cluster=get("cluster").astype(np.int64),
                     k=int(record["k"]), prototypes=get("prototypes").astype(np.float32),
                     nearest=get("nearest").astype(np.int64), ctraits=ctraits,
                     labels=cluster_labels(ctraits, record["modalities"]),  # today's rules on the stored traits
                     scores={f: {int(k): float(v) for k, v in sc.items()} for f, sc in record.get("scores", {}).items()},
                     chosen={f: int(v) for f, v in record.get("chosen", {}).items()},
                     loss=list(model_record.get("loss", [])),
                     timings={**model_record.get("timings", {}), **record.get("timings", {})})
    except (CorruptEntry, KeyError, TypeError, ValueError):
        store.evict(key)
        return None


def atlas_records(store) -> list[tuple[str, dict]]:
    """(key, metadata) of every stored atlas, oldest first."""
    out = []
    for key in store.keys():
        try:
            record = store.get_meta(key)
        except Exception:  # noqa: BLE001 - an unreadable record is not an atlas
            continue
        if record and record.get("kind") == KIND and record.get("part") == "atlas":
            out.append((key, record))
    return out


def selection_text(indices: Iterable[int]) -> str:
    """Map indices -> a compact, URL-safe link value: ranges "3.7-12.40", or, when shorter, "z" + the
    base64url of the zlib-compressed bitset (a lasso over thousands of scattered maps)."""
    import base64
    import zlib

    idx = sorted(set(int(i) for i in indices))
    parts, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    ranges = ".".join(parts)
    if not idx or len(ranges) < 24:
        return ranges
    mask = np.zeros(idx[-1] + 1, bool)
    mask[idx] = True
    packed = "z" + base64.urlsafe_b64encode(zlib.compress(np.packbits(mask).tobytes(), 9)).decode().rstrip("=")
    return packed if len(packed) < len(ranges) else ranges


def parse_selection(text: str, limit: int = 1_000_000) -> list[int]:
    """A `selection_text` value -> sorted map indices; ValueError if malformed (or over `limit` maps)."""
    import base64
    import binascii
    import zlib

    if text.startswith("z"):
        try:
            raw = base64.urlsafe_b64decode(text[1:] + "=" * (-len(text[1:]) % 4))
            inflater = zlib.decompressobj()
            bits = inflater.decompress(raw, limit // 8 + 1)
        except (binascii.Error, ValueError, zlib.error) as exc:
            raise ValueError("not a selection") from exc
        if inflater.unconsumed_tail:
            raise ValueError("too many points")
        return np.flatnonzero(np.unpackbits(np.frombuffer(bits, np.uint8))).tolist()
    out: list[int] = []
    for part in filter(None, text.split(".")):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if a < 0 or b < a or b - a > limit:
            raise ValueError(f"bad range {part!r}")
        out.extend(range(a, b + 1))
        if len(out) > limit:
            raise ValueError("too many points")
    return out
