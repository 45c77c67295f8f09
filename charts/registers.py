"""Figures of high-norm artifact tokens in vision transformers (Darcet et al. 2024, "Vision Transformers
Need Registers") and of visual sinks in vision-language models (Kang et al. 2025, VAR): what the outlier
tokens look like through the layers, and how much attention they take.  Pure plotly."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from charts.theme import base_layout

OUTLIER = "#d62728"
ORDINARY = "#4c78a8"


def norm_ratio_chart(ratio: np.ndarray, threshold: float, title: str = "", height: int = 300) -> go.Figure:
    """ratio  # [layer]: the largest patch-token norm / the median patch-token norm after each block, and the
    cut-off above which a token counts as an artifact."""
    layers = np.arange(len(ratio))
    fig = go.Figure(go.Scatter(x=layers, y=np.asarray(ratio, dtype=float), mode="lines+markers",
                               name="largest / median", line=dict(color=OUTLIER),
                               hovertemplate="hidden state %{x}: %{y:.2f}× the median<extra></extra>"))
    fig.add_hline(y=threshold, line=dict(color="#888", dash="dash", width=1),
                  annotation_text=f"artifact: > {threshold:g}× median", annotation_position="top left")
    fig.update_layout(**base_layout(title, height))
    fig.update_xaxes(title="hidden state (0 = embeddings, l = after block l)", dtick=1)
    fig.update_yaxes(title="largest patch norm / median", rangemode="tozero")
    return fig


def attention_share_chart(outliers: np.ndarray, ordinary: np.ndarray, title: str = "",
                          outlier_name: str = "artifact tokens", ordinary_name: str = "an average patch",
                          label: str = "attention from CLS", height: int = 300) -> go.Figure:
    """Per layer: the attention the outlier tokens take in total (red) against what one ordinary token gets
    (blue); NaN where a layer has no outlier."""
    layers = np.arange(len(outliers))
    fig = go.Figure([
        go.Bar(x=layers, y=np.asarray(outliers, dtype=float), name=outlier_name, marker_color=OUTLIER,
               hovertemplate="layer %{x}: %{y:.3f}<extra>" + outlier_name + "</extra>"),
        go.Scatter(x=layers, y=np.asarray(ordinary, dtype=float), mode="lines+markers", name=ordinary_name,
                   line=dict(color=ORDINARY), hovertemplate="layer %{x}: %{y:.4f}<extra>" + ordinary_name + "</extra>"),
    ])
    fig.update_layout(**base_layout(title, height), legend=dict(orientation="h", y=1.12))
    fig.update_xaxes(title="layer", dtick=1 if len(layers) <= 16 else 2)
    fig.update_yaxes(title=label, rangemode="tozero")
    return fig


__all__ = ["norm_ratio_chart", "attention_share_chart"]
