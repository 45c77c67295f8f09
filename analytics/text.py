"""The text metrics: the one-pass statistics of a capture's maps, and the multi-pass scores that
probes/ measured with the model and stored in the cache.

One-pass metrics read the capture's maps (streamed a row block at a time; the six of them share one
pass, see analytics.summary): Gu et al.'s sink α, ACT's received attention, Li et al.'s look-back
distance, WAAD and FAI, and the row entropy.  Multi-pass metrics read a probe result that
probes.runner stored in the cache (core.probe_results), and raise `ProbeMissing` (with the command to
run) when it is absent: the pattern scores (previous token, induction, echo, duplicate token), the
needle scores (retrieval, semantic retrieval), single-head ablation, gradient gates, DuoAttention
gates, and the massive-activation sink score φ on the stored residual stream.

`TEXT_METRICS` lists them; analytics/__init__.py adds them to `METRICS`.  Pure numpy.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from analytics.heads import group_max
from analytics.importance import DUO_THRESHOLD, ablation_importance, expand_kv, gradient_importance
from analytics.locality import entropy, fai, lookback, waad
from analytics.metric import Metric
from analytics.retrieval import RETRIEVAL_THRESHOLD
from analytics.sinks import (ACT_TAU, GU_EPSILON, VAR_TAU, massive_scores, received_attention, sink_alpha,
                             sink_logit_share)
from analytics.vlm import capture_sinks
from core import probe_results as stored
from core.errors import ProbeMissing

TEXT = ("text",)
TEXT_AND_VISION = ("text", "vlm")


# ---- one-pass metrics ----------------------------------------------------------------------------

def _sink_alpha(capture, **_) -> np.ndarray:
    return sink_alpha(capture)


def _act_sink(capture, rows="auto", **_) -> np.ndarray:
    return received_attention(capture, rows)


def _lookback(capture, rows="auto", **_) -> np.ndarray:
    return lookback(capture, rows)


def _entropy(capture, rows="auto", **_) -> np.ndarray:
    return entropy(capture, rows)


def _waad(capture, window=10, frac=0.3, rows="auto", **_) -> np.ndarray:
    return waad(capture, window=window, frac=frac, rows=rows)


def _fai(capture, frac=0.3, rows="auto", **_) -> np.ndarray:
    return fai(capture, frac=frac, rows=rows)


# ---- multi-pass metrics: read stored probe results -----------------------------------------------

def _context(capture, params: dict) -> tuple[Any, str, str, int]:
    """(store, revision, model name, GQA group size) for reading a probe result."""
    store = params.pop("store", None) or getattr(capture, "store", None)
    meta = getattr(capture, "meta", None)
    revision = params.pop("revision", None) or getattr(meta, "revision", "")
    model = params.pop("model", None) or getattr(meta, "name", "MODEL")
    group = int(params.pop("group_size", 0) or (meta.n_heads // meta.n_kv_heads if meta else 1))
    if store is None:
        raise ProbeMissing("This metric reads a probe result from the cache, and no cache was given.")
    return store, revision, model, group


def _probe_params(probe: str, params: dict) -> Any:
    names = set(stored.PARAMS[probe].__dataclass_fields__)
    return stored.params_of(probe, {k: params.pop(k) for k in list(params) if k in names})


def _pattern(name: str) -> Callable[..., np.ndarray]:
    def compute(capture, granularity: str = "head", **params) -> np.ndarray:
        store, revision, model, group = _context(capture, params)
        result = stored.require(store, revision, model, "patterns", _probe_params("patterns", params))
        scores = np.asarray(result.array(name), dtype=np.float32)
        return group_max(scores, group) if granularity == "kv" else scores

    compute.__doc__ = f"The {name} score per head from the stored pattern probe; granularity='kv' takes the max over each GQA group."
    return compute


def _needle(name: str) -> Callable[..., np.ndarray]:
    def compute(capture, **params) -> np.ndarray:
        store, revision, model, _ = _context(capture, params)
        result = stored.require(store, revision, model, "needle", _probe_params("needle", params))
        return np.asarray(result.array(name), dtype=np.float32)

    return compute


def _ablation(capture, **params) -> np.ndarray:
    store, revision, model, _ = _context(capture, params)
    result = stored.require(store, revision, model, "ablation", _probe_params("ablation", params))
    return ablation_importance(result.summary["clean_logprob"], result.array("ablated_logprob"))


def _grad_gate(capture, normalise: str = "none", **params) -> np.ndarray:
    store, revision, model, _ = _context(capture, params)
    result = stored.require(store, revision, model, "gradient", _probe_params("gradient", params))
    return gradient_importance(result.array("grads"), normalise)


def _duo_gate(capture, granularity: str = "head", **params) -> np.ndarray:
    store, revision, model, group = _context(capture, params)
    result = stored.require(store, revision, model, "duo", _probe_params("duo", params))
    alpha = np.asarray(result.array("alpha"), dtype=np.float32)  # [layer, kv_head]
    return alpha if granularity == "kv" else expand_kv(alpha, group)


def _massive_sink(capture, **params) -> np.ndarray:
    if getattr(getattr(capture, "meta", None), "modality", "") == "vlm":  # the residual rides with a VLM capture
        return capture_sinks(capture, params.get("tau", VAR_TAU)).phi
    store, revision, model, _ = _context(capture, params)
    key = getattr(capture, "key", "")
    result = stored.require(store, revision, model, "hidden", stored.HiddenParams(capture=key))
    hidden = HiddenStates(result)
    return massive_scores(hidden, params.get("dims"), params.get("tau", VAR_TAU))


class HiddenStates:
    """The stored residual stream of one capture, indexable by layer: hidden[l]  # [token, dim]."""

    def __init__(self, result: stored.ProbeResult):
        self.result = result
        self.n_layers = int(result.record["n_layers"])

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, layer: int) -> np.ndarray:
        if not 0 <= layer < self.n_layers:
            raise IndexError(layer)
        return np.asarray(self.result.array(f"X{layer:03d}"), dtype=np.float32)


RAZOR = "Tang et al. 2024, RazorAttention (ICLR 2025); probe after Olsson et al. 2022"

TEXT_METRICS = [
    Metric("sink_alpha", "First-token sink α", "Gu et al. 2024, When Attention Sink Emerges in Language Models (ICLR 2025)",
           "head", TEXT_AND_VISION,
           "Mean attention every query pays to the first token; α > 0.3 marks a sink head.",
           _sink_alpha, threshold=GU_EPSILON),
    Metric("sink_logit_share", "Sink-logit share", "OpenAI 2025, gpt-oss model card (learned attention sinks); Xiao et al. 2024, StreamingLLM",
           "head", TEXT,
           "Mean softmax mass the head's learned sink logit takes from each query (GPT-OSS); the map's rows sum to 1 minus it; 0 without sink logits.",
           lambda capture, **_: sink_logit_share(capture)),
    Metric("act_sink", "ACT received attention s_j", "Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks (ACT, ICML 2024)",
           "token", TEXT_AND_VISION,
           "Mean attention each token receives from the queries that see it; s_j > 0.1 is a sink, hidden sinks are those after the first.",
           _act_sink, threshold=ACT_TAU, params={"rows": "auto"}),
    Metric("lookback", "Look-back distance", "Li et al. 2025, Attention Illuminates LLM Reasoning",
           "head", TEXT,
           "Attention-weighted mean distance (tokens) from each query back to what it reads; bottom 30% are local heads, top 30% global.",
           _lookback, params={"rows": "auto"}),
    Metric("entropy", "Attention entropy", "Clark et al. 2019, What Does BERT Look At?; Vig & Belinkov 2019",
           "head", TEXT_AND_VISION,
           "Mean entropy (nats) of each query's attention row: low = focused, high = spread out.",
           _entropy, params={"rows": "auto"}),
    Metric("waad", "WAAD (windowed attention distance)", "Li et al. 2025, Attention Illuminates LLM Reasoning",
           "token", TEXT,
           "How far back the local heads look from each token, capped at W = 10; sharp changes mark planning points.",
           _waad, params={"window": 10, "frac": 0.3, "rows": "auto"}),
    Metric("fai", "FAI (future attention influence)", "Li et al. 2025, Attention Illuminates LLM Reasoning",
           "token", TEXT,
           "Mean attention the global heads of later tokens pay to each token; high FAI marks anchor tokens.",
           _fai, params={"frac": 0.3, "rows": "auto"}),
    Metric("massive_sink", "Massive-activation sink score φ", "Kang et al. 2025, See What You Are Told: Visual Attention Sink (VAR, ICLR 2025); Sun et al. 2024",
           "token", TEXT_AND_VISION,
           "Peak |x/RMS(x)| of each token on the model's massive dimensions (layers 2..L-1); > 20 marks a sink token.",
           _massive_sink, probe="hidden", threshold=VAR_TAU),
    Metric("prev_token", "Previous-token score", "Voita et al. 2019; Olsson et al. 2022 (In-context learning and induction heads)",
           "head", TEXT,
           "Mean attention from each token to the one right before it, on repeated random tokens.",
           _pattern("prev_token"), probe="patterns"),
    Metric("induction", "Induction score", RAZOR,
           "head", TEXT,
           "On repeated random tokens: attention to the token that followed the earlier copy of the current token.",
           _pattern("induction"), probe="patterns"),
    Metric("echo", "Echo score", RAZOR,
           "head", TEXT,
           "On repeated random tokens: attention to the earlier copies of the current token itself.",
           _pattern("echo"), probe="patterns"),
    Metric("duplicate_token", "Duplicate-token score", "Wang et al. 2022, Interpretability in the Wild (IOI)",
           "head", TEXT,
           "Attention from a token to earlier occurrences of the same token id.",
           _pattern("duplicate_token"), probe="patterns"),
    Metric("retrieval", "Retrieval score (copy-paste)", "Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality",
           "head", TEXT,
           "Share of the needle a head copies: its top-1 key is the needle token being emitted; > 0.1 marks a retrieval head.",
           _needle("retrieval"), probe="needle", threshold=RETRIEVAL_THRESHOLD),
    Metric("semantic_retrieval", "Semantic retrieval score", "CompressKV (Lin et al. 2025), semantic retrieval heads",
           "head", TEXT,
           "Attention mass a head puts on the needle whenever the emitted token occurs in it (no argmax condition).",
           _needle("semantic_retrieval"), probe="needle"),
    Metric("ablation", "Single-head ablation importance", "Michel et al. 2019, Are Sixteen Heads Really Better than One?",
           "head", TEXT,
           "Drop in the target log-prob when this one head is ablated (zero, mean or uniform); higher = more needed.",
           _ablation, probe="ablation", params={"mode": "zero"}),
    Metric("grad_gate", "Gradient head importance |∂L/∂ξ|", "Michel et al. 2019, Are Sixteen Heads Really Better than One?",
           "head", TEXT,
           "Size of the loss gradient with respect to a gate on the head's output: a one-pass proxy for ablation.",
           _grad_gate, probe="gradient"),
    Metric("duo_gate", "DuoAttention gate α", "Xiao et al. 2024, DuoAttention (ICLR 2025)",
           "head", TEXT,
           "Learned mix of full vs streaming attention per KV head: near 1 needs the full context (retrieval head), near 0 a sink + recent window suffices.",
           _duo_gate, probe="duo", threshold=DUO_THRESHOLD),
]
