"""Attention sinks: where heads park their attention.

Three views (METHODS.md §2.1, §2.2; Gu et al. 2024):

- **ACT received attention** (Yu et al., ICML 2024, "Unveiling and Harnessing Hidden Attention Sinks",
  `atten_process_cal`): s_j = sum_i A_ij / (N - j) with j 0-indexed, the mean attention key j receives
  from the queries that can see it, on the square prefill map.  The sink set is {j : s_j > tau},
  tau = THRES = 0.1, *minus the first detected index* (normally the first token, which ACT keeps):
  the rest are the "hidden sinks" ACT calibrates.
- **Gu et al. alpha** ("When Attention Sink Emerges in Language Models", ICLR 2025): for head (l, h)
  and key k, alpha_k = 1/(T - k) * sum_{i >= k} A_ik (0-indexed), the mean attention that the queries
  which can see token k give it.  A head has a sink at k when alpha_k > eps, eps = 0.3; the paper's
  Sink_k^eps metric is the fraction of heads with alpha_k > eps.  We use k = 0 (the first token), over
  every row of the captured square map.  (alpha_0 is ACT's s_0: the two papers use the same
  column mean, with different thresholds and purposes.)
- **Massive activations** (VAR, Kang et al., ICLR 2025, `DimProspector`): on the residual stream x
  entering each layer, phi(x) = |x / RMS(x)| (RMSNorm without its weight).  Sink dimensions are the few
  dimensions where phi is outsized; token j is a sink if max_{d in D_sink} phi(x_j)_d > tau = 20 in
  any of layers 2..L-1 (prefill only).  For a model without published sink dimensions, D_sink is found
  as the dimensions whose peak phi over tokens and layers 2..L-1 exceeds tau (at most `max_dims`).

Every function streams layer by layer (see analytics.summary / analytics.maps).  Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analytics.summary import summary_of

ACT_TAU = 0.1  # ACT THRES
GU_EPSILON = 0.3  # Gu et al. eps
VAR_TAU = 20.0  # VAR tau on phi(x)
VAR_FIRST_LAYER = 2  # VAR scans layers 2..L-1


def received_attention(source, rows: str | range | None = "auto") -> np.ndarray:
    """ACT s_j for every head: s  # [layer, head, key].  Default tau for sink sets: 0.1 (ACT THRES)."""
    return summary_of(source, rows).received


def sink_alpha(source) -> np.ndarray:
    """Gu et al. alpha at the first token, per head: alpha  # [layer, head] in [0, 1].

    alpha_0^{l,h} = mean_i A^{l,h}_{i0} over every query row of the captured map; eps = 0.3 marks a
    sink head (`sink_heads`)."""
    return summary_of(source).received[:, :, 0].copy()


def sink_heads(alpha: np.ndarray, epsilon: float = GU_EPSILON) -> np.ndarray:
    """Heads with a first-token sink: alpha > eps (Gu et al., eps = 0.3).  bool  # [layer, head]."""
    return np.asarray(alpha) > epsilon


def sink_logit_share(capture) -> np.ndarray:
    """share  # [layer, head]: the mean softmax mass a learned sink logit takes from each query row (GPT-OSS;
    OpenAI 2025, gpt-oss model card; Xiao et al. 2024's sink token made a parameter).  The captured maps show
    the real keys' weights as the model computes them, so each row sums to 1 minus this share
    (core.types.Capture.sink_share); zero for models without sink logits."""
    shares = [capture.sink_share(layer) for layer in range(capture.meta.n_layers)]
    if shares[0] is None:
        return np.zeros((capture.meta.n_layers, capture.meta.n_heads), dtype=np.float32)
    return np.stack([s.mean(-1) for s in shares]).astype(np.float32)


def sink_ratio(alpha: np.ndarray, epsilon: float = GU_EPSILON) -> float:
    """Gu et al. Sink_1^eps: the fraction of heads whose alpha at the first token exceeds eps."""
    return float(np.mean(sink_heads(alpha, epsilon)))


@dataclass(frozen=True)
class SinkSets:
    """ACT sink detection per head.  first  # [layer, head] the first detected sink index (-1: none);
    hidden  # [layer, head, key] True for the other sinks (the set ACT calibrates)."""

    first: np.ndarray
    hidden: np.ndarray
    tau: float

    def per_token(self) -> np.ndarray:
        """fraction  # [key]: in how many heads each token is a hidden sink."""
        return self.hidden.reshape(-1, self.hidden.shape[-1]).mean(axis=0)


def act_sink_sets(scores: np.ndarray, tau: float = ACT_TAU) -> SinkSets:
    """From s  # [..., key] (ACT received attention): S = {j : s_j > tau} minus its first index.

    ACT keeps the first detected sink (usually the first token) and calibrates the rest."""
    s = np.asarray(scores)
    above = s > tau
    any_above = above.any(axis=-1)
    first = np.where(any_above, above.argmax(axis=-1), -1)
    hidden = above.copy()
    idx = np.nonzero(any_above)
    hidden[idx + (first[idx],)] = False
    return SinkSets(first=first, hidden=hidden, tau=tau)


# ---- massive activations (VAR) ----------------------------------------------------------------

def rms_normalised(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """phi(x) = |x / RMS(x)|, RMSNorm without its weight.  x  # [token, dim] -> [token, dim] float32."""
    x = np.asarray(x, dtype=np.float32)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return np.abs(x / rms)


def _layers(hidden: Sequence, first: int) -> range:
    return range(min(first, len(hidden)), len(hidden))


def massive_dims(hidden: Sequence, tau: float = VAR_TAU, first_layer: int = VAR_FIRST_LAYER,
                 max_dims: int = 8) -> list[int]:
    """The sink dimensions D_sink: dims whose peak phi over tokens and layers first_layer..L-1 > tau.

    `hidden` is indexable by layer, hidden[l]  # [token, dim] (the residual stream entering layer l);
    it is read one layer at a time.  Sorted by peak, at most `max_dims`."""
    peak = None
    for layer in _layers(hidden, first_layer):
        layer_peak = rms_normalised(hidden[layer]).max(axis=0)  # [dim]
        peak = layer_peak if peak is None else np.maximum(peak, layer_peak)
    if peak is None:
        return []
    dims = np.nonzero(peak > tau)[0]
    dims = dims[np.argsort(-peak[dims])][:max_dims]
    return [int(d) for d in dims]


def massive_scores(hidden: Sequence, dims: Sequence[int] | None = None, tau: float = VAR_TAU,
                   first_layer: int = VAR_FIRST_LAYER) -> np.ndarray:
    """Per-token sink score: max over layers first_layer..L-1 and d in D_sink of phi(x_j)_d.

    phi  # [token]; a token is a (VAR) sink where it exceeds tau = 20.  `dims` default: `massive_dims`."""
    if dims is None:
        dims = massive_dims(hidden, tau, first_layer)
    layers = _layers(hidden, first_layer)
    n_tokens = np.asarray(hidden[layers.start if len(layers) else 0]).shape[0]
    score = np.zeros(n_tokens, dtype=np.float32)
    if not dims:
        return score
    for layer in layers:
        phi = rms_normalised(hidden[layer])[:, list(dims)]  # [token, |D|]
        score = np.maximum(score, phi.max(axis=1))
    return score


def massive_sink_tokens(hidden: Sequence, tau: float = VAR_TAU, first_layer: int = VAR_FIRST_LAYER) -> list[int]:
    """Token positions that VAR calls sinks (prefill only)."""
    return [int(j) for j in np.nonzero(massive_scores(hidden, None, tau, first_layer) > tau)[0]]


__all__ = ["ACT_TAU", "GU_EPSILON", "VAR_TAU", "SinkSets", "act_sink_sets", "massive_dims", "massive_scores",
           "massive_sink_tokens", "received_attention", "rms_normalised", "sink_alpha", "sink_heads", "sink_ratio"]
