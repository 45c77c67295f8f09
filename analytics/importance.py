"""Head importance from ablation sweeps, gradients and DuoAttention gates, as [layer, head] arrays.

The measurements themselves need the model and live in `probes.ablation`, `probes.gradient` and
`probes.duo`; this module turns their stored results into scores and rankings.

- Single-head ablation (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; Li et al.
  TVCG 2023 for ViTs; METHODS.md §3.2, §10.1): importance = clean target log-prob - ablated target
  log-prob, so a head whose removal hurts scores > 0.  The ablation mode is explicit: "zero" (head
  output z <- 0, PH3 / pruning), "mean" (z <- its mean over the prompt's positions) or "uniform"
  (uniform attention over the visible keys, Wu et al.'s retrieval-head masking).
- Gradient importance (Michel et al. 2019, eq. 2): I_h = E_x |dL(x)/d xi_h| with xi_h a gate on head h's
  output (xi = 1), L the language-model loss; Michel et al. normalise per layer by the l2 norm over
  the layer's heads (`normalise="layer"`), which we expose but do not apply by default.
- DuoAttention gates (Xiao et al. 2024, METHODS.md §1.3): alpha per (layer, KV head) in [0, 1];
  retrieval ("full attention") heads are alpha >= 0.5, or the top (1 - sparsity) quantile.

Pure numpy.
"""
from __future__ import annotations

import numpy as np

DUO_THRESHOLD = 0.5


def ablation_importance(clean: float, ablated: np.ndarray) -> np.ndarray:
    """clean target log-prob (scalar) and ablated  # [layer, head] -> drop  # [layer, head]."""
    return (float(clean) - np.asarray(ablated, dtype=np.float64)).astype(np.float32)


def gradient_importance(grads: np.ndarray, normalise: str = "none") -> np.ndarray:
    """grads  # [example, layer, head] of dL/d xi -> I  # [layer, head] = mean_x |grad|.

    normalise="layer" divides each layer by its l2 norm over heads (Michel et al. section 4.2)."""
    g = np.abs(np.asarray(grads, dtype=np.float64))
    imp = g.mean(axis=0) if g.ndim == 3 else g
    if normalise == "layer":
        norm = np.sqrt((imp**2).sum(axis=1, keepdims=True))
        imp = np.divide(imp, norm, out=np.zeros_like(imp), where=norm > 0)
    elif normalise != "none":
        raise ValueError(f"normalise must be 'none' or 'layer', not {normalise!r}")
    return imp.astype(np.float32)


def rank_heads(scores: np.ndarray, descending: bool = True) -> list[tuple[int, int, float]]:
    """(layer, head, score) for every head, most important first (NaNs last)."""
    s = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(s), -np.inf, s) if descending else np.where(np.isnan(s), np.inf, -s)
    order = np.argsort(-key, axis=None, kind="stable")
    H = s.shape[1]
    return [(int(i // H), int(i % H), float(s.flat[i])) for i in order]


def expand_kv(scores_kv: np.ndarray, group_size: int) -> np.ndarray:
    """[layer, kv_head] -> [layer, head]: every query head shows its KV group's value."""
    return np.repeat(np.asarray(scores_kv), group_size, axis=1)


def duo_retrieval_heads(alpha: np.ndarray, threshold: float = DUO_THRESHOLD,
                        sparsity: float | None = None) -> np.ndarray:
    """DuoAttention binarisation: alpha  # [layer, kv_head] -> bool full-attention heads.

    Threshold 0.5 by default; with `sparsity` s in [0, 1], the fraction s of KV heads with the lowest
    alpha become streaming heads instead (the scripts use 0, 0.5 and 0.75)."""
    a = np.asarray(alpha, dtype=np.float64)
    if sparsity is None:
        return a >= threshold
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError("sparsity must be in [0, 1]")
    n_stream = int(round(sparsity * a.size))
    full = np.ones(a.size, dtype=bool)
    full[np.argsort(a, axis=None, kind="stable")[:n_stream]] = False
    return full.reshape(a.shape)


__all__ = ["DUO_THRESHOLD", "ablation_importance", "duo_retrieval_heads", "expand_kv", "gradient_importance",
           "rank_heads"]
