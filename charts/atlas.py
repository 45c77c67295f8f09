"""Figures of the head atlas: a layer x head heatmap of any metric, and a token strip for per-token metrics.

Pure: numpy arrays and lists in, `go.Figure` out; no streamlit, no torch.
"""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from charts.attention import click_targets
from charts.theme import METRIC_SCALE, base_layout, plotly_text

SELECTED = "#ff4b4b"


def head_heatmap(values: np.ndarray, title: str = "", value_name: str = "score", threshold: float | None = None,
                 selected: tuple[int, int] | None = None, column: str = "head", height: int | None = None) -> go.Figure:
    """values  # [layer, head] (or [layer, kv_head] with column="KV head") as a heatmap, layer 0 at the top.

    Hover shows the exact value; cells are clickable (invisible scatter markers: Streamlit reports the
    clicked point's customdata = [layer, head]); `threshold` draws the paper's cut-off as a contour;
    `selected` outlines one cell.  NaN cells (not measured) stay blank."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"head_heatmap takes [layer, head] values, not shape {v.shape}")
    n_layers, n_cols = v.shape
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    text = np.vectorize(lambda x: "not measured" if not np.isfinite(x) else f"{x:.6g}")(v)
    fig = go.Figure(go.Heatmap(
        z=v, x=list(range(n_cols)), y=list(range(n_layers)), text=text, colorscale=METRIC_SCALE,
        zmin=lo, zmax=hi if hi > lo else lo + 1e-9, colorbar=dict(title=value_name, thickness=12),
        hovertemplate=f"layer %{{y}}, {column} %{{x}}<br>{value_name} %{{text}}<extra></extra>", xgap=1, ygap=1,
    ))
    if threshold is not None and finite.size and lo < threshold < hi:
        fig.add_trace(go.Contour(
            z=v, x=list(range(n_cols)), y=list(range(n_layers)), showscale=False, hoverinfo="skip",
            contours=dict(start=threshold, end=threshold, size=1.0, coloring="none", showlabels=False),
            line=dict(color="white", width=2, dash="dot"), name=f"{value_name} = {threshold:g}",
        ))
    targets = click_targets(np.arange(n_cols), np.arange(n_layers),
                            f"layer %{{customdata[0]}}, {column} %{{customdata[1]}}", size=max(6, 280 // max(n_cols, 1)))
    fig.add_trace(targets)
    if selected is not None:
        layer, col = selected
        fig.add_shape(type="rect", x0=col - 0.5, x1=col + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color=SELECTED, width=3))
    fig.update_layout(**base_layout(title, height or max(360, 18 * n_layers + 90)))
    fig.update_yaxes(autorange="reversed", title="layer", dtick=max(1, n_layers // 15))
    fig.update_xaxes(title=column, dtick=1 if n_cols <= 16 else max(1, n_cols // 16))
    fig.update_layout(clickmode="event+select", dragmode=False)
    return fig


def layer_profile(values: np.ndarray, title: str = "", value_name: str = "score", threshold: float | None = None,
                  column: str = "head", height: int = 300) -> go.Figure:
    """values  # [layer, head] summarised per layer: the mean over heads (line), the spread from the lowest
    to the highest head (band), and the paper's threshold (dashed): how a metric moves through depth."""
    v = np.asarray(values, dtype=np.float64)
    layers = np.arange(v.shape[0])
    with np.errstate(all="ignore"):
        mean, lo, hi = np.nanmean(v, 1), np.nanmin(v, 1), np.nanmax(v, 1)
    fig = go.Figure([
        go.Scatter(x=layers, y=hi, mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip"),
        go.Scatter(x=layers, y=lo, mode="lines", line=dict(width=0), fill="tonexty", fillcolor="rgba(76,120,168,0.2)",
                   name=f"lowest – highest {column}", hoverinfo="skip"),
        go.Scatter(x=layers, y=mean, mode="lines+markers", name=f"mean over {column}s", line=dict(color="#4c78a8"),
                   customdata=np.stack([lo, hi], -1),
                   hovertemplate="layer %{x}: mean %{y:.4g} (from %{customdata[0]:.4g} to %{customdata[1]:.4g})"
                                 "<extra></extra>"),
    ])
    if threshold is not None:
        fig.add_hline(y=threshold, line=dict(color=SELECTED, dash="dash", width=1))
    fig.update_layout(**base_layout(title, height), legend=dict(orientation="h", y=-0.3))
    fig.update_xaxes(title="layer", range=[-0.5, v.shape[0] - 0.5])
    fig.update_yaxes(title=value_name)
    return fig


def token_strip(tokens: list[str], values: np.ndarray, title: str = "", value_name: str = "score",
                threshold: float | None = None, selected: int | None = None, height: int = 260) -> go.Figure:
    """values  # [token] as bars over the text (token labels on hover, and on the axis when they fit).

    NaN tokens (outside the rows a metric uses) are left out; `threshold` draws a dashed line."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    labels = [plotly_text(f"{i} {t}") for i, t in enumerate(tokens[:n])]
    shown = np.where(np.isfinite(v), v, 0.0)
    colours = np.where(np.isfinite(v), shown, np.nan)
    fig = go.Figure(go.Bar(
        x=list(range(n)), y=shown, customdata=[[lab, "n/a" if not np.isfinite(x) else f"{x:.6g}"] for lab, x in zip(labels, v)],
        marker=dict(color=colours, colorscale=METRIC_SCALE, line=dict(width=0)),
        hovertemplate=f"%{{customdata[0]}}<br>{value_name} %{{customdata[1]}}<extra></extra>",
    ))
    if threshold is not None:
        fig.add_hline(y=threshold, line=dict(color=SELECTED, dash="dash", width=1),
                      annotation_text=f"{threshold:g}", annotation_position="top left")
    if selected is not None and 0 <= selected < n:
        fig.add_vrect(x0=selected - 0.5, x1=selected + 0.5, line_width=0, fillcolor=SELECTED, opacity=0.2)
    fig.update_layout(**base_layout(title, height), bargap=0.05)
    if n <= 80:
        fig.update_xaxes(tickmode="array", tickvals=list(range(n)), ticktext=[plotly_text(t) for t in tokens[:n]],
                         tickangle=-60)
    else:
        fig.update_xaxes(title="token position")
    fig.update_yaxes(title=value_name)
    return fig


def token_text(tokens: list[str], values: np.ndarray) -> str:
    """The text with each token's background shaded by its value (an HTML string for st.html / markdown)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    parts = []
    for tok, x in zip(tokens, v):
        label = html.escape(tok.replace("␣", " ").replace("↵", "↵\n"))
        if not np.isfinite(x):
            parts.append(f'<span title="n/a">{label}</span>')
            continue
        alpha = 0.08 + 0.8 * (x - lo) / span
        parts.append(f'<span title="{x:.6g}" style="background: rgba(255,75,75,{alpha:.2f}); '
                     f'border-radius: 3px">{label}</span>')
    return '<div style="line-height: 1.9; white-space: pre-wrap; font-family: monospace">' + "".join(parts) + "</div>"


__all__ = ["head_heatmap", "layer_profile", "token_strip", "token_text"]
