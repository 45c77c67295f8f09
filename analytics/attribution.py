"""Which heads made this token: direct logit attribution and activation patching as head scores, their
rank agreement, and the head graph of one prediction.  Pure numpy; the measurements are probes.dla,
probes.patching and probes.path_patching, stored in the cache (core.probe_results).

- DLA (Elhage et al. 2021; Wang et al. 2022 §3.1): a component's term in the logit (difference) of the
  answer, through the final norm with its scale frozen from the run.  Direct effect only: a head that
  acts through later heads (an S-inhibition head in IOI) has a small DLA and a large patching effect.
- Patching effect (Wang et al. 2022; Heimersheim & Nanda 2024): the metric M with one head patched,
  normalised so 0 = nothing changed and 1 = the whole clean - corrupted gap:
      denoise  (M_patched - M_corrupted) / (M_clean - M_corrupted)   (clean output restores)
      noise    (M_clean - M_patched) / (M_clean - M_corrupted)       (corrupted output destroys)
- The head graph (after the LLM Transparency Tool's information-flow routes, Tufanov et al. 2024): the
  components carrying most of the attribution, each with its direct edge to the output, edges from the
  tokens a head reads at the answer position (attention weight x the head's |attribution|), and, where
  path patching measured them, edges from a sender head to the receivers it drives.

`ATTRIBUTION_METRICS` (dla, patching) go to analytics.METRICS beside the text metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.stats import rankdata

from analytics.metric import Metric
from analytics.text import _context, _probe_params
from core import probe_results as stored
from core.errors import InputError

# the causal LMs whose DLA probes.dla decomposes exactly (tests/models/test_attribution.py, a tiny model of each);
# not Granite (residual and logit multipliers) nor OLMo (a norm without weights)
TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "stablelm", "starcoder2", "phi3", "gemma", "gemma2",
                 "gemma3_text", "olmo2", "gpt2", "gptj", "phi", "gpt_neox",
                 "qwen2_vl_text", "qwen2_5_vl_text")  # the last two: Qwen2-VL's and Qwen2.5-VL's language models


def patching_effect(patched: np.ndarray, clean: float, corrupted: float, direction: str = "denoise") -> np.ndarray:
    """patched  # [layer, head] metric values -> the share of the clean - corrupted gap each head accounts
    for  # [layer, head] (NaN where not measured, or everywhere when the two prompts score the same)."""
    patched = np.asarray(patched, dtype=np.float64)
    gap = float(clean) - float(corrupted)
    if not np.isfinite(gap) or abs(gap) < 1e-12:
        return np.full(patched.shape, np.nan)
    if direction == "denoise":
        return (patched - corrupted) / gap
    if direction == "noise":
        return (clean - patched) / gap
    raise ValueError(f"direction must be denoise or noise, not {direction!r}")


def rank_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    """How far two head scores  # [layer, head] agree: Spearman's rho over heads where both are finite, and
    the share of the top k heads of `a` that are among the top k of `b` (highest values first)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    both = np.isfinite(a) & np.isfinite(b)
    n = int(both.sum())
    if n < 3:
        return {"spearman": float("nan"), "top_overlap": float("nan"), "k": k, "n": n}
    ra, rb = rankdata(a[both]), rankdata(b[both])
    rho = float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else float("nan")
    k = min(k, n)
    index = np.flatnonzero(both)
    top_a = set(index[np.argsort(-a[both], kind="stable")[:k]])
    top_b = set(index[np.argsort(-b[both], kind="stable")[:k]])
    return {"spearman": rho, "top_overlap": len(top_a & top_b) / k, "k": k, "n": n}


# ---- the head graph --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """A component or a token: `kind` head | mlp | embed | token | output; value = its attribution."""

    id: str
    kind: str
    layer: int  # -1: tokens and the embedding; n_layers: the output
    head: int  # -1 unless a head
    position: int  # the token (tokens) or the answer position
    value: float
    label: str


@dataclass(frozen=True)
class Edge:
    """source -> target; kind direct (to the output), attention (a token a head reads) or path (sender -> receiver)."""

    source: str
    target: str
    weight: float
    kind: str


@dataclass
class HeadGraph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def node(self, id_: str) -> Node | None:
        return next((n for n in self.nodes if n.id == id_), None)


def head_id(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def head_graph(heads: np.ndarray, position: int, tokens: list[str], rows: Callable[[int, int], np.ndarray],
               mlps: np.ndarray | None = None, k: int = 12, min_attention: float = 0.1, reads: int = 3,
               paths: dict[tuple[int, int], np.ndarray] | None = None, path_k: int = 3) -> HeadGraph:
    """The graph of one prediction.

    heads  # [layer, head] attribution at `position` (DLA or patching effect); mlps  # [layer] or None;
    rows(layer, head) -> that head's attention row at `position`  # [token]; the k components with the
    largest |attribution| become nodes (sized by it), each with a direct edge to the output; each head
    node gets edges from the (at most `reads`) tokens it reads with weight >= min_attention, weighted
    attention x |attribution|; `paths[(l, h)]`  # [layer, head] path-patching effects of sender (l, h)
    add edges to its path_k strongest receivers (receiver nodes added if missing)."""
    heads = np.nan_to_num(np.asarray(heads, dtype=np.float64))
    L, H = heads.shape
    graph = HeadGraph()
    graph.nodes.append(Node("out", "output", L, -1, position, float(heads.sum()), f"output @ {position}"))
    candidates = [(abs(heads[l, h]), "head", l, h) for l in range(L) for h in range(H)]
    if mlps is not None:
        candidates += [(abs(float(v)), "mlp", l, -1) for l, v in enumerate(np.nan_to_num(np.asarray(mlps, float)))]
    candidates.sort(key=lambda c: -c[0])
    for size, kind, l, h in candidates[:k]:
        if size <= 0:
            break
        if kind == "head":
            _add_head(graph, heads, l, h, position, tokens, rows, min_attention, reads)
        else:
            graph.nodes.append(Node(f"MLP{l}", "mlp", l, -1, position, float(mlps[l]), f"MLP {l}"))
            graph.edges.append(Edge(f"MLP{l}", "out", float(mlps[l]), "direct"))
    for (sl, sh), effect in (paths or {}).items():
        effect = np.nan_to_num(np.asarray(effect, dtype=np.float64))
        if graph.node(head_id(sl, sh)) is None:
            _add_head(graph, heads, sl, sh, position, tokens, rows, min_attention, reads)
        order = np.argsort(-np.abs(effect), axis=None, kind="stable")[:path_k]
        for i in order:
            rl, rh = int(i // H), int(i % H)
            if effect[rl, rh] == 0:
                continue
            if graph.node(head_id(rl, rh)) is None:
                _add_head(graph, heads, rl, rh, position, tokens, rows, min_attention, reads)
            graph.edges.append(Edge(head_id(sl, sh), head_id(rl, rh), float(effect[rl, rh]), "path"))
    return graph


def _add_head(graph: HeadGraph, heads: np.ndarray, l: int, h: int, position: int, tokens: list[str],
              rows: Callable[[int, int], np.ndarray], min_attention: float, reads: int) -> None:
    value = float(heads[l, h])
    graph.nodes.append(Node(head_id(l, h), "head", l, h, position, value, f"L{l} H{h}"))
    graph.edges.append(Edge(head_id(l, h), "out", value, "direct"))
    row = np.asarray(rows(l, h), dtype=np.float64)[: position + 1]  # [token]
    for j in np.argsort(-row, kind="stable")[:reads]:
        if row[j] < min_attention:
            break
        token = f"tok{int(j)}"
        if graph.node(token) is None:
            graph.nodes.append(Node(token, "token", -1, -1, int(j), 0.0, f"{int(j)} {tokens[int(j)]!r}"))
        graph.edges.append(Edge(token, head_id(l, h), float(row[j]) * abs(value), "attention"))


# ---- the stored results, read back ----------------------------------------------------------------

@dataclass
class DLA:
    """A stored dla probe result (probes.dla): every term at every position of one capture."""

    result: stored.ProbeResult

    @property
    def answer_position(self) -> int:
        return int(self.result.record["answer_position"])

    def position(self, position: int = -1) -> int:
        """-1 -> the answer position; InputError outside the capture."""
        n = int(self.result.record["n_tokens"])
        at = self.answer_position if position == -1 else position
        if not 0 <= at < n:
            raise InputError(f"Position {position} is outside the capture's {n} tokens (0..{n - 1}).")
        return at

    def heads(self, position: int = -1) -> np.ndarray:
        """DLA  # [layer, head] at `position`."""
        return np.asarray(self.result.array("heads")[:, :, self.position(position)], dtype=np.float32)

    def terms(self, position: int = -1) -> dict:
        """mlps  # [layer], embed, bias, logit (the model's own) and the answer's token id at `position`."""
        at = self.position(position)
        return {"mlps": np.asarray(self.result.array("mlps")[:, at]), "embed": float(self.result.array("embed")[at]),
                "bias": float(self.result.array("bias")[at]), "logit": float(self.result.array("logit")[at]),
                "target": int(self.result.array("targets")[at])}


@dataclass
class Patching:
    """A stored patching probe result (probes.patching / probes.path_patching)."""

    result: stored.ProbeResult

    @property
    def clean(self) -> float:
        return float(self.result.summary["clean"])

    @property
    def corrupted(self) -> float:
        return float(self.result.summary["corrupted"])

    @property
    def patched(self) -> np.ndarray:
        """The metric with each head patched  # [layer, head] (NaN where not measured)."""
        return np.asarray(self.result.array("patched"), dtype=np.float64)

    @property
    def effect(self) -> np.ndarray:
        """patching_effect  # [layer, head]."""
        return patching_effect(self.patched, self.clean, self.corrupted, self.result.summary["direction"])


def read_dla(capture, **params) -> DLA:
    """The stored DLA of `capture` (params: target, foil; store, revision, model as analytics.text reads
    probe results), or ProbeMissing with the command that makes it."""
    store, revision, model, _ = _context(capture, params)
    p = _probe_params("dla", dict(params, capture=getattr(capture, "key", "")))
    return DLA(stored.require(store, revision, model, "dla", p))


def read_patching(capture=None, **params) -> Patching:
    """The stored patching result of these PatchingParams fields (the defaults: the IOI prompt), or ProbeMissing."""
    store, revision, model, _ = _context(capture, params)
    return Patching(stored.require(store, revision, model, "patching", _probe_params("patching", params)))


def _dla(capture, position: int = -1, **params) -> np.ndarray:
    """DLA  # [layer, head] at `position` (-1: the answer position) from the stored dla probe of this capture."""
    return read_dla(capture, **params).heads(position)


def _patching(capture, **params) -> np.ndarray:
    return read_patching(capture, **params).effect.astype(np.float32)


ATTRIBUTION_METRICS = [
    Metric("dla", "Direct logit attribution", "Elhage et al. 2021, A Mathematical Framework for Transformer Circuits; "
           "Wang et al. 2022 (IOI)", "head", ("text", "vision", "vlm"),
           "Each head's direct push on the answer's logit (the next token, a VLM's answer, or a token / token "
           "difference), through the final norm with its scale frozen from the run: > 0 pushes the answer up.",
           _dla, probe="dla", params={"position": -1, "target": "", "foil": ""}),
    Metric("patching", "Activation patching (per head)", "Wang et al. 2022, Interpretability in the Wild (IOI); "
           "Heimersheim & Nanda 2024", "head", ("text",),
           "Share of the clean - corrupted gap in the metric that patching this head's output restores "
           "(denoise) or destroys (noise); default: the IOI prompt, logit(' Mary') - logit(' John').",
           _patching, probe="patching", params={"direction": "denoise", "metric": "logit_diff"}),
]

__all__ = ["ATTRIBUTION_METRICS", "DLA", "Edge", "HeadGraph", "Node", "Patching", "TEXT_FAMILIES", "head_graph",
           "head_id", "patching_effect", "rank_agreement", "read_dla", "read_patching"]
