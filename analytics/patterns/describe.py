"""What the atlas's clusters are: their mean traits and automatic labels, and each head's profile over them.

A cluster is described by the mean traits of its maps (TRAITS of analytics.patterns.encode) and named
by `describe`'s rules (sink, diagonal/self, previous token / neighbours, local, global, broad/uniform);
clusters that get the same name are told apart by the trait where each differs most.  A head is then
summarised by its distribution over the clusters (Li et al., IEEE TVCG 2023; METHODS.md §3.2): its
profile, its dominant cluster, and how far the profile moves under an intervention (total variation).
Pure numpy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from analytics.patterns.encode import TRAITS
from analytics.patterns.sample import MapSet


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
