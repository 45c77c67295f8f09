"""Figures of attention maps: one head, a long map's overview, the whole model at a glance (each a
coloured `Picture`, drawn by pages/widgets.py), one token's row (HTML), and Plotly click targets.

Pure: numpy arrays and lists in, a `Picture`, an SVG / HTML string or a Plotly trace out; no streamlit, no torch.
Colours follow charts.theme so the same quantity looks the same on every page.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from charts.image import png_source
from charts.theme import ATTENTION_SCALE, LOG_FLOOR, colour_table

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
class Picture:
    """A heatmap as ONE server-coloured picture plus what the browser needs around it (pages/widgets.py
    draws it: labels, hover, colour bar, zoom, clicks).  Sent as a PNG instead of Plotly's heatmap JSON,
    and drawn without Plotly's 4.7 MB bundle, so a shared link paints as soon as the page does.

    The picture covers rows x cols logical cells (each `cell` pixels of `src`, a PNG data URI; cells may
    carry a transparent gap, or be transparent where masked).  `row_labels` / `col_labels` label the
    axes ("" for no tick); `row_hover` / `col_hover` name each row / column in the hover text, and
    `values` (rows x cols, or None) give the number it shows.  `ramp` holds CSS colours of the colour
    scale from `zmin` to `zmax`."""

    src: str
    rows: int
    cols: int
    cell: int
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    row_hover: tuple[str, ...]
    col_hover: tuple[str, ...]
    hover: str  # "{row}", "{col}" and "{value}" are replaced
    row_title: str
    col_title: str
    title: str
    bar_title: str
    zmin: float
    zmax: float
    ramp: tuple[str, ...]
    values: tuple[tuple[float, ...], ...] | None = None
    smooth: bool = False  # a photo underneath: scaled smoothly rather than in blocks
    bar: bool = True  # draw the colour bar (a plain picture has none)


def _coloured(unit: np.ndarray) -> np.ndarray:
    """unit  # [..., ] values in [0, 1] (NaN: transparent) -> rgba  # [..., 4] uint8 on the attention scale."""
    lut = colour_table(ATTENTION_SCALE)
    rgba = np.zeros(unit.shape + (4,), dtype=np.uint8)
    seen = ~np.isnan(unit)
    rgba[seen, :3] = lut[np.rint(np.clip(unit[seen], 0.0, 1.0) * 255).astype(np.intp)]
    rgba[seen, 3] = 255
    return rgba


def _ramp() -> tuple[str, ...]:
    lut = colour_table(ATTENTION_SCALE)
    return tuple(f"rgb({r},{g},{b})" for r, g, b in lut[np.linspace(0, 255, 11).round().astype(int)])


def model_mosaic(thumbs: np.ndarray, scale: str = "raw") -> Picture:
    """thumbs  # [layer, head, bins, bins] block-pooled maps -> every head at a glance (BertViz's model
    view) as one picture of n_layers x n_heads thumbnails (~100 kB instead of a heatmap of ~350,000 numbers)."""
    n_layers, n_heads, bins, _ = thumbs.shape
    gap = max(1, bins // 8)
    cell = bins + gap
    zmin, zmax = _range(scale)
    values = scaled(thumbs.reshape(-1, bins, bins), scale).reshape(thumbs.shape)  # [layer, head, bins, bins]
    unit = (np.nan_to_num(values, nan=zmin, neginf=zmin) - zmin) / (zmax - zmin)
    padded = np.full((n_layers, n_heads, cell, cell), np.nan, dtype=np.float32)  # gaps stay transparent
    padded[:, :, :bins, :bins] = unit
    mosaic = _coloured(padded.transpose(0, 2, 1, 3).reshape(n_layers * cell, n_heads * cell))
    layers, heads = tuple(f"L{i}" for i in range(n_layers)), tuple(f"H{h}" for h in range(n_heads))
    return Picture(src=png_source(mosaic), rows=n_layers, cols=n_heads, cell=cell, row_labels=layers,
                   col_labels=heads, row_hover=tuple(f"layer {i}" for i in range(n_layers)),
                   col_hover=tuple(f"head {h}" for h in range(n_heads)), hover="{row}, {col}: click to open it",
                   row_title="", col_title="", title="", bar_title="max " + SCALE_TITLES[scale],
                   zmin=zmin, zmax=zmax, ramp=_ramp())


def thumbnail_png(values: np.ndarray, scale: str = "raw", side: int = 300) -> bytes:
    """values  # [bins, bins] already scaled (`scaled`) -> PNG bytes about `side` px a side, each block a sharp
    square (pixel repetition), on the attention colour scale: a head's thumbnail drawn large."""
    import io

    from PIL import Image

    zmin, zmax = _range(scale)
    unit = (np.nan_to_num(np.asarray(values, dtype=np.float32), nan=zmin) - zmin) / (zmax - zmin)
    k = max(1, side // max(unit.shape))
    rgba = _coloured(np.repeat(np.repeat(unit, k, 0), k, 1))
    out = io.BytesIO()
    Image.fromarray(rgba).save(out, format="PNG")
    return out.getvalue()


def head_picture(attn: np.ndarray, tokens_q: list[str], tokens_k: list[str], scale: str = "raw",
                 title: str = "", q_start: int = 0, k_start: int = 0, mask_future: bool = True) -> Picture:
    """One head's map (or a window of it starting at q_start, k_start) with token labels; the hover shows
    the query token, the key token and the weight; cells above a causal map's diagonal are left blank."""
    raw = np.asarray(attn, dtype=np.float32)
    zmin, zmax = _range(scale)
    unit = (scaled(raw, scale) - zmin) / (zmax - zmin)
    if mask_future:
        q_pos = np.arange(q_start, q_start + raw.shape[0])[:, None]
        k_pos = np.arange(k_start, k_start + raw.shape[1])[None, :]
        unit = np.where(k_pos > q_pos, np.nan, unit)
    rows, cols = axis_labels(tokens_q, q_start), axis_labels(tokens_k, k_start)
    return Picture(src=png_source(_coloured(unit)), rows=raw.shape[0], cols=raw.shape[1], cell=1,
                   row_labels=tuple(rows), col_labels=tuple(cols), row_hover=tuple(rows), col_hover=tuple(cols),
                   hover="query {row} · key {col} · weight {value}", row_title="query", col_title="key",
                   title=title, bar_title=SCALE_TITLES[scale], zmin=zmin, zmax=zmax, ramp=_ramp(),
                   values=tuple(tuple(round(float(v), 4) for v in row) for row in raw))


def overview_picture(pooled: np.ndarray, n_tokens: int, scale: str = "raw", title: str = "") -> Picture:
    """A block-pooled overview of a long map.  pooled  # [bins, bins], the max over blocks of
    ceil(n / bins) tokens (core.types.max_pool); the picture keeps the blocks that hold tokens, axes
    in token positions, a tick every 16 blocks."""
    size = -(-n_tokens // pooled.shape[0])
    used = -(-n_tokens // size)
    pooled = np.asarray(pooled, dtype=np.float32)[:used, :used]
    zmin, zmax = _range(scale)
    unit = (scaled(pooled, scale) - zmin) / (zmax - zmin)
    spans = tuple(f"{i * size}–{min(n_tokens, (i + 1) * size) - 1}" for i in range(used))
    ticks = tuple(str(i * size) if i % 16 == 0 else "" for i in range(used))
    return Picture(src=png_source(_coloured(unit)), rows=used, cols=used, cell=1, row_labels=ticks, col_labels=ticks,
                   row_hover=spans, col_hover=spans,
                   hover="queries {row} · keys {col} · max weight {value} · click to move the window",
                   row_title="query position", col_title="key position", title=title,
                   bar_title="max " + SCALE_TITLES[scale], zmin=zmin, zmax=zmax, ramp=_ramp(),
                   values=tuple(tuple(round(float(v), 4) for v in row) for row in pooled))


def picture_svg(p: Picture, cell_px: int = 24) -> str:
    """A Picture as a standalone SVG (the picture, axis labels and a colour bar), for "Picture (SVG)"."""
    cell_px = max(4, min(cell_px, 1200 // max(p.rows, p.cols)))
    label_w = max([len(t) for t in p.row_labels] + [2]) * 7 + 8
    left, top, bar = label_w, 30 + (max([len(t) for t in p.col_labels] + [2]) * 5 if p.cols > 12 else 0), 80
    width, height = p.cols * cell_px, p.rows * cell_px
    font = min(11, cell_px - 1)
    stops = "".join(f'<stop offset="{i / (len(p.ramp) - 1):.2f}" stop-color="{c}"/>' for i, c in enumerate(p.ramp))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + bar}" height="{top + height + 8}" '
             f'font-family="sans-serif" font-size="{font}">',
             f'<defs><linearGradient id="ramp" x1="0" y1="1" x2="0" y2="0">{stops}</linearGradient></defs>',
             f'<text x="{left}" y="14" font-size="13" font-weight="bold">{html.escape(p.title)}</text>',
             f'<image x="{left}" y="{top}" width="{width}" height="{height}" preserveAspectRatio="none" '
             f'style="image-rendering:pixelated" href="{p.src}"/>']
    rotate = p.cols > 12
    for c, label in enumerate(p.col_labels):
        if label and font >= 6:
            x = left + (c + 0.5) * cell_px
            parts.append(f'<text transform="translate({x:.1f},{top - 4}) rotate(-60)">{html.escape(label)}</text>'
                         if rotate else f'<text x="{x:.1f}" y="{top - 6}" text-anchor="middle">{html.escape(label)}</text>')
    parts += [f'<text x="{left - 4}" y="{top + (r + 0.5) * cell_px + font / 3:.1f}" text-anchor="end">{html.escape(label)}</text>'
              for r, label in enumerate(p.row_labels) if label and font >= 6]
    x = left + width + 12
    bar_height = min(height, 240)
    parts += [f'<rect x="{x}" y="{top}" width="12" height="{bar_height}" fill="url(#ramp)"/>',
              f'<text x="{x + 16}" y="{top + 9}" font-size="11">{p.zmax:g}</text>',
              f'<text x="{x + 16}" y="{top + bar_height}" font-size="11">{p.zmin:g}</text>',
              f'<text transform="translate({x + 56},{top + bar_height / 2:.0f}) rotate(-90)" text-anchor="middle" '
              f'font-size="11">{html.escape(p.bar_title)}</text>', "</svg>"]
    return "".join(parts)


def token_highlight_html(tokens: list[str], weights: np.ndarray, query: int, label: str = "", scale: str = "row",
                         split: int | None = None, selected: bool = False) -> str:
    """The text with each token's background showing the weight `query` gives it (escaped HTML).

    weights  # [key]; the query token is outlined; tokens after it (unseen in a causal map) are grey.
    `scale` as the maps' colour: "raw" the weight itself, "log" log10 from LOG_FLOOR, "row" the line's
    maximum = full colour.  `split`: a bar before that token (where generated tokens start); `selected`
    outlines the line."""
    w = np.asarray(weights, dtype=np.float32)
    if scale == "raw":
        shade = np.clip(w, 0.0, 1.0)
    elif scale == "log":
        shade = np.clip((np.log10(np.maximum(w, 10.0**LOG_FLOOR)) - LOG_FLOOR) / -LOG_FLOOR, 0.0, 1.0)
    else:
        peak = float(w.max()) if w.size and w.max() > 0 else 1.0
        shade = w / peak
    box = ' style="outline: 2px solid #ff4b4b; border-radius: 4px"' if selected else ""
    parts = [f'<div class="hs-tokens"{box}><span class="hs-label">{html.escape(label)}</span>'] if label else \
        [f'<div class="hs-tokens"{box}>']
    for i, token in enumerate(tokens):
        if i == split:
            parts.append('<span class="hs-split" title="generated tokens start here"> | </span>')
        alpha = float(shade[i]) if i < len(w) else 0.0
        style = f"background: rgba(255, 75, 75, {alpha:.3f});"
        if i == query:
            style += " outline: 2px solid #1c83e1;"
        text = html.escape(token).replace(" ", "&nbsp;")
        title = f"{i}: {w[i]:.4f}" if i < len(w) else str(i)
        parts.append(f'<span class="hs-tok" style="{style}" title="{html.escape(title)}">{text}</span>')
    parts.append("</div>")
    return "".join(parts)
