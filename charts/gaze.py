"""Figures of the Gaze page (vision-language models): the gaze filmstrip, the saliency overlay with
visual sinks and ground-truth boxes outlined, image-centric heads per layer.  Pure plotly."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from charts.image import attention_overlay, head_overlays
from charts.theme import base_layout, plotly_text

SINK_COLOUR = "#ff4d4d"  # visual sinks: red dashed outlines
BOX_COLOUR = "#ffffff"  # ground-truth boxes of the asked objects


def filmstrip(image: np.ndarray, maps: np.ndarray, words: Sequence[str], opacity: float = 0.65,
              per_row: int = 6) -> go.Figure:
    """maps  # [word, rows, cols]: one overlay per question word (GIFT's gaze shift while reading it),
    on one colour scale so the words compare."""
    maps = np.asarray(maps, dtype=np.float32)
    fig = head_overlays(image, maps, opacity=opacity, titles=[f"“{w}”" for w in words], per_row=per_row,
                        shared_scale=True, label="gaze shift",
                        title="Gaze shift while reading each word of the question (one colour scale)")
    heat = [t for t in fig.data if t.type == "heatmap"]
    if heat:  # the panels share one scale: say what it measures, once
        heat[-1].update(showscale=True, colorbar=dict(title=dict(text="gaze shift", side="right"), thickness=12))
    return fig


def _outline(fig: go.Figure, x0: float, y0: float, x1: float, y1: float, colour: str, dash: str, name: str) -> None:
    fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color=colour, width=2, dash=dash), name=name)


def saliency_overlay(image: np.ndarray, values: np.ndarray, sink_patches: Sequence[tuple[int, int]] = (),
                     boxes: Sequence[tuple[int, int, int, int]] = (), title: str = "", label: str = "saliency",
                     opacity: float = 0.6, height: int = 460) -> go.Figure:
    """values  # [rows, cols] over the picture; visual sinks (patches) outlined in dashed red, the asked
    objects' boxes (x0, y0, x1, y1 pixels) in white."""
    fig = attention_overlay(image, values, opacity=opacity, title=title, label=label, height=height)
    rows, cols = np.asarray(values).shape
    ph, pw = image.shape[0] / rows, image.shape[1] / cols
    for r, c in sink_patches:
        _outline(fig, c * pw - 0.5, r * ph - 0.5, (c + 1) * pw - 0.5, (r + 1) * ph - 0.5, SINK_COLOUR, "dash",
                 "visual sink")
    for x0, y0, x1, y1 in boxes:
        _outline(fig, x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5, BOX_COLOUR, "dot", "asked object")
    return fig


def centric_per_layer(counts: np.ndarray, mass: np.ndarray, n_heads: int, title: str = "",
                      height: int = 300) -> go.Figure:
    """counts  # [layer]: image-centric heads per layer (bars); mass  # [layer]: mean visual mass (line)."""
    layers = np.arange(len(counts))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=counts, name="image-centric heads", marker_color="#4c78a8",
                         hovertemplate="layer %{x}: %{y} heads<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=np.asarray(mass) * n_heads, mode="lines+markers", name="visual mass × heads",
                             line=dict(color="#f58518"), customdata=np.asarray(mass),
                             hovertemplate="layer %{x}: mean visual mass %{customdata:.3f}<extra></extra>"))
    fig.update_layout(**base_layout(title, height), legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title_text="layer", dtick=2, range=[-0.5, len(counts) - 0.5])
    fig.update_yaxes(title_text="heads", range=[0, n_heads])
    return fig


def token_bars(tokens: Sequence[str], values: np.ndarray, title: str = "", label: str = "",
               height: int = 320) -> go.Figure:
    """One bar per token (answer tokens' T-VHD), labelled with the token."""
    positions = list(range(len(tokens)))
    tokens = [plotly_text(t) for t in tokens]
    fig = go.Figure(go.Bar(x=positions, y=np.asarray(values, dtype=np.float32), marker_color="#4c78a8",
                           customdata=list(tokens), hovertemplate="%{customdata}: %{y:.3g}<extra></extra>"))
    fig.update_layout(**base_layout(title, height))
    fig.update_xaxes(tickmode="array", tickvals=positions, ticktext=list(tokens))
    fig.update_yaxes(title_text=label)
    return fig


def answers_chart(labels: Sequence[str], before: Sequence[float], after: Sequence[float], title: str = "",
                  height: int = 320) -> go.Figure:
    """Accuracy per question kind, before and after an intervention (grouped bars)."""
    fig = go.Figure([go.Bar(x=list(labels), y=list(before), name="before", marker_color="#9e9e9e"),
                     go.Bar(x=list(labels), y=list(after), name="after", marker_color="#4c78a8")])
    fig.update_layout(**base_layout(title, height), barmode="group", legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(title_text="exact answers", range=[0, 1], tickformat=".0%")
    return fig
