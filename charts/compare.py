"""Before | after figures of the Intervene page: the head picker grid, token diffs, log-probs, maps.

Pure: lists and numpy arrays in, `go.Figure` or escaped HTML out; no streamlit, no torch.
"""
from __future__ import annotations

import difflib
import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from charts.attention import axis_labels, click_targets
from charts.theme import DIVERGING_SCALE, METRIC_SCALE, base_layout, plotly_text

INSERT_BG = "rgba(46, 160, 67, 0.30)"
DELETE_BG = "rgba(248, 81, 73, 0.30)"
FIRST_DIFF = "#ff4b4b"


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_head_label(label: str) -> tuple[int, int]:
    """"L3H2" -> (3, 2)."""
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def head_grid(n_layers: int, n_heads: int, selected: set[tuple[int, int]] | list[tuple[int, int]],
              values: np.ndarray | None = None, value_name: str = "", title: str = "") -> go.Figure:
    """A layer x head grid; chosen heads are outlined.  values  # [layer, head] colours the cells
    (e.g. a head metric), else chosen cells are filled.  Clicks report (x = head, y = layer)."""
    chosen = set(selected)
    if values is None:
        z = np.zeros((n_layers, n_heads), dtype=np.float32)
        for layer, head in chosen:
            z[layer, head] = 1.0
        heat = go.Heatmap(z=z, x=list(range(n_heads)), y=list(range(n_layers)), zmin=0, zmax=1, showscale=False,
                          colorscale=[[0, "rgba(127,127,127,0.12)"], [1, FIRST_DIFF]], xgap=2, ygap=2,
                          hoverinfo="skip")
    else:
        heat = go.Heatmap(z=np.asarray(values, dtype=np.float32), x=list(range(n_heads)), y=list(range(n_layers)),
                          colorscale=METRIC_SCALE, xgap=2, ygap=2, hoverinfo="skip",
                          colorbar=dict(title=dict(text=value_name, side="right"), thickness=12))
    fig = go.Figure(heat)
    fig.add_trace(click_targets(np.arange(n_heads), np.arange(n_layers),
                                "L%{customdata[0]}H%{customdata[1]}", size=max(8, min(24, 600 // max(n_heads, 1)))))
    for layer, head in sorted(chosen):
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color=FIRST_DIFF, width=2))
    fig.update_layout(**base_layout(title=title, height=min(900, 120 + n_layers * 22)))
    fig.update_xaxes(tickvals=list(range(n_heads)), ticktext=[f"H{h}" for h in range(n_heads)], side="top",
                     showgrid=False, zeroline=False, range=[-0.5, n_heads - 0.5])
    fig.update_yaxes(tickvals=list(range(n_layers)), ticktext=[f"L{l}" for l in range(n_layers)],
                     showgrid=False, zeroline=False, range=[n_layers - 0.5, -0.5])
    return fig


@dataclass
class TokenDiff:
    first: int | None  # index of the first token that differs (None: identical)
    opcodes: list[tuple[str, int, int, int, int]]  # difflib opcodes over the two token lists


def token_diff(before: list[str], after: list[str]) -> TokenDiff:
    """Where two generations part, and a token-level alignment (difflib, no junk heuristics)."""
    first = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), None)
    if first is None and len(before) != len(after):
        first = min(len(before), len(after))
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    return TokenDiff(first=first, opcodes=matcher.get_opcodes())


def token_diff_html(before: list[str], after: list[str]) -> tuple[str, str]:
    """Escaped HTML of both texts: deleted tokens struck through in red on the left, inserted tokens
    green on the right, and the first differing token of each side outlined (∅ where a side ended)."""
    diff = token_diff(before, after)
    wrap = '<div style="white-space:pre-wrap;font-family:ui-monospace,monospace;line-height:1.8">{}</div>'
    return wrap.format(_mark_first(before, diff, "before")), wrap.format(_mark_first(after, diff, "after"))


def _mark_first(tokens: list[str], diff: TokenDiff, side: str) -> str:
    """One side, token by token: changed tokens shaded, the first differing token outlined."""
    changed = np.zeros(len(tokens), dtype=bool)
    for tag, i0, i1, j0, j1 in diff.opcodes:
        if tag != "equal":
            lo, hi = (i0, i1) if side == "before" else (j0, j1)
            changed[lo:hi] = True
    parts = []
    for k, tok in enumerate(tokens):
        style = []
        if changed[k]:
            style.append(f"background:{DELETE_BG if side == 'before' else INSERT_BG}")
            if side == "before":
                style.append("text-decoration:line-through")
        if k == diff.first:
            style.append(f"outline:2px solid {FIRST_DIFF};border-radius:3px")
        text = html.escape(tok)
        parts.append(f'<span style="{";".join(style)}">{text}</span>' if style else text)
    if diff.first is not None and diff.first >= len(tokens):
        parts.append(f'<span style="outline:2px solid {FIRST_DIFF};border-radius:3px">∅</span>')
    return "".join(parts)


def logprob_figure(tokens: list[str], before: np.ndarray, after: np.ndarray, title: str = "",
                   first_diff: int | None = None) -> go.Figure:
    """Per-token log-prob of the baseline continuation (teacher-forced) under both runs, and the change."""
    x = [plotly_text(label) for label in axis_labels(tokens)]
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.06)
    fig.add_trace(go.Scatter(x=x, y=before, mode="lines+markers", name="before",
                             hovertemplate="%{x}<br>log p %{y:.3f}<extra>before</extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=after, mode="lines+markers", name="after",
                             hovertemplate="%{x}<br>log p %{y:.3f}<extra>after</extra>"), row=1, col=1)
    delta = after - before
    fig.add_trace(go.Bar(x=x, y=delta, name="after − before", marker_color=np.where(delta >= 0, "#2ea043", "#f85149"),
                         hovertemplate="%{x}<br>Δ log p %{y:.3f}<extra></extra>"), row=2, col=1)
    if first_diff is not None and first_diff < len(x):
        for row in (1, 2):
            fig.add_vline(x=first_diff, line=dict(color=FIRST_DIFF, dash="dot"), row=row, col=1)
    fig.update_layout(**base_layout(title=title, height=460))
    fig.update_layout(legend=dict(orientation="h", y=1.08, x=1, xanchor="right"))
    fig.update_yaxes(title="log p", row=1, col=1)
    fig.update_yaxes(title="Δ", row=2, col=1)
    fig.update_xaxes(type="category", tickangle=-60, showticklabels=len(x) <= 80, row=2, col=1)
    return fig


def map_comparison(before: np.ndarray, after: np.ndarray, tokens: list[str], title: str = "",
                   causal: bool = True) -> go.Figure:
    """One head's map before, after and after − before, on ONE diverging colour scale (±max |value|),
    so a weight of 0.3 and a change of +0.3 look the same.  before, after  # [query, key], same size."""
    before = np.asarray(before, dtype=np.float32)
    after = np.asarray(after, dtype=np.float32)
    diff = after - before
    bound = float(max(np.abs(before).max(initial=0), np.abs(after).max(initial=0), np.abs(diff).max(initial=0), 1e-6))
    n = before.shape[0]
    labels = [plotly_text(label) for label in axis_labels(tokens[:n])]
    future = np.triu(np.ones((n, n), dtype=bool), 1) if causal else np.zeros((n, n), dtype=bool)
    fig = make_subplots(rows=1, cols=3, subplot_titles=("before", "after", "after − before"),
                        horizontal_spacing=0.04, shared_yaxes=True)
    for col, (name, z) in enumerate((("before", before), ("after", after), ("change", diff)), start=1):
        fig.add_trace(go.Heatmap(
            z=np.where(future, np.nan, z), x=labels, y=labels, zmin=-bound, zmax=bound, colorscale=DIVERGING_SCALE,
            showscale=col == 3, hoverongaps=False, colorbar=dict(title=dict(text="weight / change", side="right"),
                                                                 thickness=12),
            hovertemplate=f"query %{{y}}<br>key %{{x}}<br>{name} %{{z:.4f}}<extra></extra>",
        ), row=1, col=col)
    fig.update_layout(**base_layout(title=title, height=min(700, max(360, 10 * n + 160))))
    fig.update_yaxes(autorange="reversed", type="category", showticklabels=n <= 60)
    fig.update_xaxes(type="category", showticklabels=n <= 40, tickangle=-60)
    return fig


__all__ = ["head_grid", "head_label", "parse_head_label", "token_diff", "token_diff_html", "TokenDiff",
           "logprob_figure", "map_comparison"]
