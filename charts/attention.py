"""Figures of attention maps: one head (Plotly), the whole model at a glance (a coloured picture), one token's row.

Pure: numpy arrays and lists in, `go.Figure` (or an HTML string) out; no streamlit, no torch.
Colours follow charts.theme so the same quantity looks the same on every page.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from charts.image import png_source
from charts.theme import ATTENTION_SCALE, LOG_FLOOR, base_layout, colour_table

SCALE_TITLES = {"raw": "weight", "log": "log10 weight", "row": "weight / row max"}


def axis_labels(tokens: list[str], start: int = 0) -> list[str]:
    """Unique axis labels "12 ␣fox" (Plotly merges equal category names, so the index leads)."""
    return [f"{start + i} {t}" for i, t in enumerate(tokens)]


def scaled(attn: np.ndarray, scale: str) -> np.ndarray:
    """attn  # [query, key] -> the values the colour shows (raw, log10 clipped at LOG_FLOOR, per-row max)."""
    a = np.asarray(attn, dtype=np.float32)
    if scale == "log":
        return np.log10(np.maximum(a, 10.0**LOG_FLOOR))
    if scale == "row":
        peak = a.max(axis=-1, keepdims=True)
        return np.divide(a, peak, out=np.zeros_like(a), where=peak > 0)
    return a


def _range(scale: str) -> tuple[float, float]:
    return (LOG_FLOOR, 0.0) if scale == "log" else (0.0, 1.0)


def head_map(attn: np.ndarray, tokens_q: list[str], tokens_k: list[str], scale: str = "raw",
             title: str = "", q_start: int = 0, k_start: int = 0, mask_future: bool = True) -> go.Figure:
    """One head's map.  attn  # [query, key] (a window starting at q_start, k_start).

    Hover shows the query token, the key token and the weight; cells above the diagonal of a causal
    map are left blank rather than drawn as zero.
    """
    raw = np.asarray(attn, dtype=np.float32)
    z = scaled(raw, scale)
    if mask_future:
        q_pos = np.arange(q_start, q_start + raw.shape[0])[:, None]
        k_pos = np.arange(k_start, k_start + raw.shape[1])[None, :]
        z = np.where(k_pos > q_pos, np.nan, z)
    y = axis_labels(tokens_q, q_start)
    x = axis_labels(tokens_k, k_start)
    zmin, zmax = _range(scale)
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, customdata=raw, colorscale=ATTENTION_SCALE, zmin=zmin, zmax=zmax,
        colorbar=dict(title=dict(text=SCALE_TITLES[scale], side="right"), thickness=14),
        hovertemplate="query %{y}<br>key %{x}<br>weight %{customdata:.4f}<extra></extra>",
        hoverongaps=False,
    ))
    n = max(len(x), len(y))
    fig.update_layout(**base_layout(title=title, height=min(900, max(380, 22 * len(y) + 160))))
    fig.update_yaxes(autorange="reversed", title="query", tickfont=dict(size=11 if n <= 40 else 9),
                     showticklabels=len(y) <= 120, type="category")
    fig.update_xaxes(title="key", tickangle=-60, tickfont=dict(size=11 if n <= 40 else 9),
                     showticklabels=len(x) <= 120, type="category")
    return fig


def overview_map(pooled: np.ndarray, n_tokens: int, scale: str = "raw", title: str = "",
                 window: tuple[int, int, int, int] | None = None) -> go.Figure:
    """A block-pooled overview of a long map.  pooled  # [bins, bins] (max over each block).

    Axes are in token positions (bin centres); `window` = (q0, q1, k0, k1) outlines the detail window.
    """
    bins = pooled.shape[0]
    width = n_tokens / bins
    centres = (np.arange(bins) + 0.5) * width
    zmin, zmax = _range(scale)
    z = scaled(pooled, scale)
    fig = go.Figure(go.Heatmap(
        z=z, x=centres, y=centres, customdata=np.asarray(pooled, dtype=np.float32),
        colorscale=ATTENTION_SCALE, zmin=zmin, zmax=zmax,
        colorbar=dict(title=dict(text="max " + SCALE_TITLES[scale], side="right"), thickness=14),
        hovertemplate=f"queries ≈%{{y:.0f}}<br>keys ≈%{{x:.0f}}<br>max weight in a {width:.0f}×{width:.0f} block "
                      "%{customdata:.4f}<extra></extra>",
    ))
    step = max(1, bins // 32)
    fig.add_trace(click_targets(centres[::step], centres[::step], "queries ≈%{customdata[0]:.0f}, keys ≈%{customdata[1]:.0f}",
                                size=10))
    if window is not None:
        q0, q1, k0, k1 = window
        fig.add_shape(type="rect", x0=k0, x1=k1, y0=q0, y1=q1, line=dict(color="#ff4b4b", width=2))
    fig.update_layout(**base_layout(title=title, height=520))
    fig.update_yaxes(range=[n_tokens, 0], title="query position")
    fig.update_xaxes(range=[0, n_tokens], title="key position")
    return fig


def click_targets(xs: np.ndarray, ys: np.ndarray, hover: str, size: int) -> go.Scatter:
    """Invisible markers on a grid: Plotly selects points of scatter traces, not heatmap cells, so
    these make a heatmap clickable (Streamlit's on_select then reports the clicked x, y)."""
    gx, gy = np.meshgrid(np.asarray(xs), np.asarray(ys))
    return go.Scatter(x=gx.ravel(), y=gy.ravel(), customdata=np.stack([gy.ravel(), gx.ravel()], -1),
                      mode="markers", showlegend=False,
                      marker=dict(size=size, symbol="square", opacity=0.0, color="#ff4b4b"),
                      hovertemplate=hover + "<extra>click</extra>",
                      selected=dict(marker=dict(opacity=0.0)), unselected=dict(marker=dict(opacity=0.0)))


@dataclass(frozen=True)
class Mosaic:
    """Every head at a glance (BertViz's model view) as ONE server-coloured picture.

    `src` is a PNG data URI of n_layers x n_heads thumbnails (thumbnail (layer, head) at row layer,
    column head; each `cell` pixels square including a transparent `gap`), ~100 kB instead of a
    heatmap of ~350,000 numbers.  `ramp` holds CSS colours of the colour scale from `zmin` to `zmax`,
    for a colour bar drawn beside it (pages/mosaic.py draws all of it in the browser)."""

    src: str
    n_layers: int
    n_heads: int
    cell: int
    zmin: float
    zmax: float
    title: str
    ramp: tuple[str, ...]


def model_mosaic(thumbs: np.ndarray, scale: str = "raw") -> Mosaic:
    """thumbs  # [layer, head, bins, bins] block-pooled maps -> the model view's Mosaic."""
    n_layers, n_heads, bins, _ = thumbs.shape
    gap = max(1, bins // 8)
    cell = bins + gap
    zmin, zmax = _range(scale)
    values = scaled(thumbs.reshape(-1, bins, bins), scale).reshape(thumbs.shape)  # [layer, head, bins, bins]
    unit = np.clip((np.nan_to_num(values, nan=zmin, neginf=zmin) - zmin) / (zmax - zmin), 0.0, 1.0)
    lut = colour_table(ATTENTION_SCALE)
    rgba = np.zeros((n_layers, cell, n_heads, cell, 4), dtype=np.uint8)  # gaps stay transparent
    rgba[:, :bins, :, :bins, :3] = lut[np.rint(unit * 255).astype(np.intp)].transpose(0, 2, 1, 3, 4)
    rgba[:, :bins, :, :bins, 3] = 255
    mosaic = rgba.reshape(n_layers * cell, n_heads * cell, 4)
    ramp = tuple(f"rgb({r},{g},{b})" for r, g, b in lut[np.linspace(0, 255, 11).round().astype(int)])
    return Mosaic(src=png_source(mosaic), n_layers=n_layers, n_heads=n_heads, cell=cell, zmin=zmin, zmax=zmax,
                  title="max " + SCALE_TITLES[scale], ramp=ramp)


def token_highlight_html(tokens: list[str], weights: np.ndarray, query: int, label: str = "") -> str:
    """The text with each token's background showing the weight `query` gives it (escaped HTML).

    weights  # [key]; the query token is outlined; tokens after it (unseen in a causal map) are grey.
    """
    w = np.asarray(weights, dtype=np.float32)
    peak = float(w.max()) if w.size and w.max() > 0 else 1.0
    parts = [f'<div class="hs-tokens"><span class="hs-label">{html.escape(label)}</span>'] if label else \
        ['<div class="hs-tokens">']
    for i, token in enumerate(tokens):
        alpha = float(w[i]) / peak if i < len(w) else 0.0
        style = f"background: rgba(255, 75, 75, {alpha:.3f});"
        if i == query:
            style += " outline: 2px solid #1c83e1;"
        text = html.escape(token).replace(" ", "&nbsp;")
        title = f"{i}: {w[i]:.4f}" if i < len(w) else str(i)
        parts.append(f'<span class="hs-tok" style="{style}" title="{html.escape(title)}">{text}</span>')
    parts.append("</div>")
    return "".join(parts)
