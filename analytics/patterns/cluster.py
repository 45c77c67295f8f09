"""The atlas's 2-D embedding and clusters of the autoencoder's latent codes.

- `embed_2d`: UMAP (McInnes et al. 2018) of the standardised codes on exact nearest neighbours
  (scikit-learn), seeded and single-threaded: deterministic.  Defaults: 15 neighbours, min_dist 0.1,
  200 epochs (`ClusterParams`).
- `cluster_codes`: k-means (n_init = 4) on the standardised codes, k chosen by silhouette over 3..8
  when not given (the smallest k within 5% of the best), or HDBSCAN on the 2-D embedding; text maps
  and image maps are clustered apart.  Li et al. (IEEE TVCG 2023; METHODS.md §3.2) cluster the codes
  of their autoencoder into pattern types the same way.
- `purity` / `majority`: how well clusters recover known kinds (the synthetic maps of
  analytics.patterns.sample).

Pure numpy + scikit-learn + umap-learn: no torch, no streamlit.  scikit-learn and umap-learn are
imported inside the functions that use them: they take seconds to load, and a page that opens a
stored atlas never needs them.
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits


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
