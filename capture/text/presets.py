"""Named interventions from the papers (METHODS.md), built from the six primitives.

Each preset is a function `build(meta, heads=None, **params) -> Intervention` whose defaults are the
METHODS.md defaults (or, where a default needs a long context or a 7B model, a documented scaled
value), with every parameter adjustable.  The resulting `Intervention.preset` is the preset's name.
`PRESETS` lists them for the UI: name, title, one-line description, paper, slider parameters and
the extra data a preset needs (a score array, gates, steering directions).

`heads` is a list of (layer, query head).  Where a preset's method picks its own heads (ACT's
search, VAR's per-row selection, ITI's probe ranking), `heads=None` uses the default stated in
its docstring.

This module is torch-free (numpy only): computing steering directions needs the model and lives
in `probes.steering`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from core.errors import InterventionError
from core.interventions import SINK_THRESHOLD, HeadEdit, Intervention, kv_group_edits, uniform_ablation
from core.types import ModelMeta

Heads = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Param:
    """One adjustable parameter of a preset (a slider, or a checkbox for bools)."""

    name: str
    default: float | int | bool
    low: float = 0.0
    high: float = 1.0
    step: float = 0.05
    help: str = ""


@dataclass(frozen=True)
class Preset:
    name: str  # Intervention.preset
    title: str
    description: str  # one line for the UI
    paper: str  # where in METHODS.md
    build: Callable[..., Intervention]
    params: tuple[Param, ...] = ()
    needs: tuple[str, ...] = ()  # extra keyword data besides heads: "scores", "gates", "directions"
    heads_default: str = ""  # what heads=None means ("" = the preset needs chosen heads)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}


def _sinks_key(tau: float, include_first: bool) -> str:
    """The position set of ACT sinks with threshold tau ("sinks" at the default 0.1)."""
    base = "allsinks" if include_first else "sinks"
    if abs(tau - SINK_THRESHOLD) < 1e-12:
        return base
    if tau <= 0:
        raise InterventionError("The sink threshold must be positive.")
    return f"{base}:{f'{tau:.6f}'.rstrip('0').rstrip('.')}"


def _middle_heads(meta: ModelMeta, skip_first: int = 2, skip_last: int = 1) -> list[tuple[int, int]]:
    """Every head of layers skip_first .. n_layers - 1 - skip_last (falls back to all layers on tiny models)."""
    layers = range(skip_first, meta.n_layers - skip_last)
    if len(layers) == 0:
        layers = range(meta.n_layers)
    return [(l, h) for l in layers for h in range(meta.n_heads)]


def checked_heads(meta: ModelMeta, heads: Heads | None) -> list[tuple[int, int]]:
    """The (layer, head) pairs, sorted and without repeats; InterventionError names one outside the model."""
    out = sorted({(int(l), int(h)) for l, h in (heads or ())})
    for l, h in out:
        if not (0 <= l < meta.n_layers and 0 <= h < meta.n_heads):
            raise InterventionError(f"Head L{l}H{h} is outside this model ({meta.n_layers} x {meta.n_heads}).")
    return out


def _need_heads(meta: ModelMeta, heads: Heads | None, preset: str) -> list[tuple[int, int]]:
    out = checked_heads(meta, heads)
    if not out:
        raise InterventionError(f"The {preset} preset acts on chosen heads; pick at least one head.")
    return out


# ---- the presets --------------------------------------------------------------------------------

def prune(meta: ModelMeta, heads: Heads | None = None, *, factor: float = 0.0) -> Intervention:
    """Zero-ablate (factor 0) or rescale the outputs of the chosen heads (PH3 / pruning, METHODS §5.1, P1)."""
    edits = tuple(HeadEdit(l, h, "scale", factor) for l, h in _need_heads(meta, heads, "prune"))
    return Intervention(edits=edits, preset="prune")


def uniform(meta: ModelMeta, heads: Heads | None = None, *, u: float = 1.0) -> Intervention:
    """Uniform attention on the chosen heads: mix toward uniform over the visible keys (u = 1 is
    retrieval-head masking's ablation, METHODS §1.1 / §10.1: the head outputs the mean of its values)."""
    edits = tuple(HeadEdit(l, h, "mix", u, keys="uniform") for l, h in _need_heads(meta, heads, "uniform"))
    return Intervention(edits=edits, preset="uniform")


def retrieval_mask(meta: ModelMeta, heads: Heads | None = None, *, scores: np.ndarray | None = None, k: int = 30,
                   random: bool = False, seed: int = 0, threshold: float = 0.1) -> Intervention:
    """Retrieval-head masking (Wu et al. 2024, METHODS §1.1): uniform attention (u = 1) on the top-k
    heads by `scores`  # [layer, head], or, with random=True, on k random heads drawn (seeded) from the
    non-retrieval heads (score <= threshold; if too few, from the heads outside the top k).
    Defaults: k = 30 (the README's example), threshold 0.1.  `heads`, if given, is used as is."""
    if heads:
        chosen = checked_heads(meta, heads)
    else:
        if scores is None:
            raise InterventionError("Retrieval-head masking needs retrieval scores; run the retrieval probe first.")
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (meta.n_layers, meta.n_heads):
            raise InterventionError(f"Retrieval scores must be [layer, head] = ({meta.n_layers}, {meta.n_heads}).")
        k = int(max(0, min(k, scores.size)))
        order = np.argsort(-scores, axis=None, kind="stable")
        top = [divmod(int(i), meta.n_heads) for i in order[:k]]
        if random:
            pool = [divmod(int(i), meta.n_heads) for i in np.flatnonzero(scores.ravel() <= threshold)]
            if len(pool) < k:
                pool = [divmod(int(i), meta.n_heads) for i in order[k:]]
            rng = np.random.default_rng(seed)
            picked = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
            chosen = sorted(pool[i] for i in picked)
        else:
            chosen = sorted(top)
    iv = uniform_ablation(chosen)
    return Intervention(edits=iv.edits, preset="retrieval-mask")


def act(meta: ModelMeta, heads: Heads | None = None, *, tau: float = 0.1, beta: float = 0.4,
        keep_first: bool = True) -> Intervention:
    """ACT attention calibration (Yu et al. 2024, METHODS §2.1): on each chosen head, the hidden
    sinks s_j > tau (first sink kept) keep beta of their mass; the rest goes to the other keys in
    proportion.  Defaults tau 0.1, beta 0.4.  heads=None: every head of layers 2 .. L-2 (ACT searches
    layers 2-30 of 32; it then keeps only the heads that help, which needs a calibration set)."""
    chosen = checked_heads(meta, heads) or _middle_heads(meta)
    keys = _sinks_key(tau, include_first=not keep_first)
    edits = tuple(HeadEdit(l, h, "redistribute", beta, keys=keys) for l, h in chosen)
    return Intervention(edits=edits, preset="act")


def var(meta: ModelMeta, heads: Heads | None = None, *, p: float = 0.6, tau: float = 0.1,
        include_first: bool = True) -> Intervention:
    """Sink suppression, a text analogue of VAR (Kang et al. 2025, METHODS §2.2): on the chosen heads,
    every sink column is multiplied by p = 0.6 and the freed mass goes to the non-sink tokens in
    proportion.  Text-only deviations: sinks are ACT's s_j > tau (VAR finds them from massive
    activations, tau = 20 on RMS-normalised dims) and the mass goes to every non-sink token (VAR: the
    non-sink image tokens, on image-centric rows).  heads=None: every head of layers 2 .. L-2 (VAR
    skips the last layer)."""
    chosen = checked_heads(meta, heads) or _middle_heads(meta)
    keys = _sinks_key(tau, include_first=include_first)
    edits = tuple(HeadEdit(l, h, "redistribute", p, keys=keys) for l, h in chosen)
    return Intervention(edits=edits, preset="var")


DUO_SINK, DUO_RECENT = 4, 32  # DuoAttention deploys 64 sink + 256 recent; scaled for CPU-length prompts


def duo_streaming(meta: ModelMeta, heads: Heads | None = None, *, gates: np.ndarray | None = None,
                  threshold: float = 0.5, sink: int = DUO_SINK, recent: int = DUO_RECENT,
                  mean_token: bool = False) -> Intervention:
    """DuoAttention streaming heads (Xiao et al. 2024, METHODS §1.3): the streaming (non-retrieval)
    KV heads see only the first `sink` tokens and the `recent` latest keys (causal and (j < sink or
    i - j < recent)); retrieval heads keep everything.  Streaming KV heads are those with gate
    alpha < threshold (0.5) in `gates`  # [layer, kv_head]; or, without gates, the KV groups of the
    chosen `heads` (a KV-level edit covers its whole GQA group); with neither, every head streams.
    Defaults scaled for short CPU contexts: sink 4 (StreamingLLM / RazorAttention's 4) and recent 32,
    where DuoAttention deploys 64 + 256 on 1k-32k contexts (on a 256-token prompt those would mask
    nothing).  mean_token adds RazorAttention's compensation token (mean key and value of the
    dropped keys)."""
    group = meta.group_size
    if gates is not None:
        gates = np.asarray(gates, dtype=np.float64)
        if gates.shape != (meta.n_layers, meta.n_kv_heads):
            raise InterventionError(f"DuoAttention gates must be [layer, kv_head] = ({meta.n_layers}, {meta.n_kv_heads}).")
        kv = [(int(l), int(k)) for l, k in zip(*np.nonzero(gates < threshold))]
    elif heads:
        kv = sorted({(l, h // group) for l, h in checked_heads(meta, heads)})
    else:
        kv = [(l, k) for l in range(meta.n_layers) for k in range(meta.n_kv_heads)]
    if sink < 0 or recent < 1:
        raise InterventionError("DuoAttention needs sink >= 0 and a recent window >= 1.")
    edits: tuple[HeadEdit, ...] = ()
    for l, k in sorted(kv):
        edits += kv_group_edits(l, k, group, "window", value=int(recent), keys=f"0:{int(sink)}",
                                mode="mean" if mean_token else "")
    return Intervention(edits=edits, preset="duo-streaming")


def softpag(meta: ModelMeta, heads: Heads | None = None, *, u: float = 1.0) -> Intervention:
    """SoftPAG (Ahn et al. 2025, METHODS §7.1): A <- (1-u) A + u I on the chosen heads; u = 1 is PAG's
    identity map.  (PAG guides diffusion with the perturbed branch; on a language model this is
    the perturbation alone.)  Default u = 1, the only value the method fixes."""
    edits = tuple(HeadEdit(l, h, "mix", u, keys="all") for l, h in _need_heads(meta, heads, "softpag"))
    return Intervention(edits=edits, preset="softpag")


def iti(meta: ModelMeta, heads: Heads | None = None, *, directions=None, k: int = 48, alpha: float = 15.0
        ) -> Intervention:
    """ITI head steering (Li et al. 2023, METHODS §6.1): z <- z + alpha * sigma * theta on the top-k
    heads, at the last prompt token and every generated token (ITI's "last position of every
    forward").  `directions` is a probes.steering.SteeringDirections (theta = normalised
    mass-mean difference of the two prompt sets' head outputs, sigma = the std of their projections
    on theta).  Defaults alpha 15, k 48; heads=None ranks heads by the directions' separation
    (ITI ranks by probe accuracy, which a handful of prompts cannot estimate)."""
    if directions is None:
        raise InterventionError("ITI steering needs directions: compute them from two sets of prompts first.")
    theta = np.asarray(directions.directions, dtype=np.float32)  # [layer, head, head_dim]
    sigma = np.asarray(directions.sigma, dtype=np.float64)  # [layer, head]
    if theta.shape[:2] != (meta.n_layers, meta.n_heads):
        raise InterventionError("These steering directions were computed on another model.")
    if heads:
        chosen = checked_heads(meta, heads)
    else:
        order = np.argsort(-np.asarray(directions.separation), axis=None, kind="stable")
        chosen = sorted(divmod(int(i), meta.n_heads) for i in order[: int(max(1, min(k, order.size)))])
    edits = tuple(HeadEdit(l, h, "add", float(alpha * sigma[l, h]), queries="last",
                           direction=tuple(float(x) for x in theta[l, h])) for l, h in chosen)
    return Intervention(edits=edits, preset="iti")


def _p(name, default, low=0.0, high=1.0, step=0.05, help=""):
    return Param(name, default, low, high, step, help)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("prune", "Prune heads", "Scale the chosen heads' outputs (0 removes them: zero ablation).",
           "METHODS §5.1, P1", prune, (_p("factor", 0.0, 0.0, 2.0, 0.05, "output scale s; 0 ablates"),)),
    Preset("uniform", "Uniform attention", "Chosen heads attend uniformly to every visible token (mean ablation of "
           "attention, as retrieval-head masking).", "METHODS §1.1, §10.1, P5", uniform,
           (_p("u", 1.0, 0.0, 1.0, 0.05, "mix strength toward uniform"),)),
    Preset("retrieval-mask", "Retrieval-head masking", "Uniform attention on the top-K retrieval heads, or on K "
           "random non-retrieval heads (seeded).", "METHODS §1.1", retrieval_mask,
           (_p("k", 30, 1, 100, 1, "number of heads masked"), _p("random", False, help="random heads instead"),
            _p("seed", 0, 0, 100, 1, "seed of the random draw")), needs=("scores",),
           heads_default="top-K by retrieval score"),
    Preset("act", "ACT calibration", "Hidden sinks (ACT score > tau, first sink kept) keep beta of their "
           "attention; the rest goes to the other tokens.", "METHODS §2.1", act,
           (_p("tau", 0.1, 0.01, 0.5, 0.01, "sink threshold on s_j"), _p("beta", 0.4, 0.0, 1.0, 0.05,
            "share of sink mass kept"), _p("keep_first", True, help="leave the first sink (BOS) alone")),
           heads_default="every head of layers 2 .. L-2"),
    Preset("var", "Sink redistribution (VAR, text)", "Every sink column times p; the freed mass goes to the "
           "non-sink tokens in proportion.", "METHODS §2.2", var,
           (_p("p", 0.6, 0.0, 1.0, 0.05, "share of sink mass kept"), _p("tau", 0.1, 0.01, 0.5, 0.01,
            "sink threshold on s_j"), _p("include_first", True, help="the first sink (BOS) too")),
           heads_default="every head of layers 2 .. L-2"),
    Preset("duo-streaming", "DuoAttention streaming heads", "Streaming heads see only the first tokens and a "
           "recent window; retrieval heads see everything.", "METHODS §1.3", duo_streaming,
           (_p("sink", DUO_SINK, 0, 64, 1, "sink tokens kept (Duo deploys 64)"),
            _p("recent", DUO_RECENT, 1, 512, 1, "recent window (Duo deploys 256)"),
            _p("threshold", 0.5, 0.0, 1.0, 0.05, "gate threshold (with gates)"),
            _p("mean_token", False, help="RazorAttention compensation token")), needs=("gates",),
           heads_default="the KV groups of the chosen heads; every head if none"),
    Preset("softpag", "SoftPAG", "Chosen heads' maps pulled toward the identity (u = 1: each token attends "
           "only to itself).", "METHODS §7.1", softpag, (_p("u", 1.0, 0.0, 1.0, 0.05, "strength toward identity"),)),
    Preset("iti", "Head steering (ITI)", "Add alpha·sigma·theta to head outputs, theta the mean difference of two "
           "prompt sets' head outputs.", "METHODS §6.1", iti,
           (_p("alpha", 15.0, 0.0, 40.0, 0.5, "steering strength"), _p("k", 48, 1, 270, 1, "heads steered")),
           needs=("directions",), heads_default="top-K by separation"),
)}


def build(name: str, meta: ModelMeta, heads: Heads | None = None, **params) -> Intervention:
    """PRESETS[name].build(meta, heads, **params), with a clear error for an unknown name."""
    if name not in PRESETS:
        raise InterventionError(f"Unknown preset {name!r}; use one of {', '.join(PRESETS)}.")
    return PRESETS[name].build(meta, heads, **params)


__all__ = ["PRESETS", "Preset", "Param", "build", "prune", "uniform", "retrieval_mask", "act", "var",
           "duo_streaming", "softpag", "iti", "DUO_SINK", "DUO_RECENT"]
