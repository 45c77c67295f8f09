"""The Diffusion page's word heatmaps as one compact figure: one column per word, one row per head set
(the mean of heads, or every head), each panel the word's received attention over the generated picture
scaled to its own maximum, with a colour bar that says so.

One picture (the panels blended on the server, charts.pictures) under a transparent heatmap that carries
the hover (the word, the row and the panel's largest weight) and the colour bar: a few kB of figure
instead of one Plotly subplot per panel.  Pure: numpy in, `go.Figure` out.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from charts.image import png_source
from charts.pictures import blend
from charts.theme import ATTENTION_SCALE, base_layout, plotly_text

TILE = 96  # pixels a side of each panel
MIN_PLOT_PX = 150  # the plot area's least height: the colour bar's title and ramp fit beside a single row


def word_maps(image: np.ndarray, heat: np.ndarray, words: list[str], rows: list[str], title: str = "",
              opacity: float = 0.75) -> go.Figure:
    """heat  # [row, word, grid_rows, grid_cols]: word w's received attention in head set `rows[r]`."""
    heat = np.asarray(heat, dtype=np.float32)
    R, W = heat.shape[:2]
    labels = [plotly_text(w) for w in words]
    gap = 4
    side = TILE + gap
    canvas = np.zeros((R * side, W * side, 4), dtype=np.uint8)
    peaks = heat.max(axis=(2, 3))  # [row, word]
    for r in range(R):
        for w in range(W):
            unit = heat[r, w] / max(float(peaks[r, w]), 1e-12)
            canvas[r * side : r * side + TILE, w * side : w * side + TILE, :3] = blend(image, unit, opacity, zmax=1.0,
                                                                                      size=(TILE, TILE))
            canvas[r * side : r * side + TILE, w * side : w * side + TILE, 3] = 255
    fig = go.Figure(go.Image(source=png_source(canvas), x0=0, dx=1, y0=0, dy=1, hoverinfo="skip"))
    centres_x = (np.arange(W) * side + TILE / 2).tolist()
    centres_y = (np.arange(R) * side + TILE / 2).tolist()
    fig.add_trace(go.Heatmap(
        x=centres_x, y=centres_y, z=np.zeros((R, W)), zmin=0, zmax=1, colorscale=ATTENTION_SCALE, opacity=0.0,
        customdata=np.stack([np.broadcast_to(np.asarray(labels, dtype=object)[None, :], (R, W)),
                             np.broadcast_to(np.asarray(rows, dtype=object)[:, None], (R, W)),
                             np.round(peaks, 4).astype(object)], axis=-1),
        hovertemplate="“%{customdata[0]}” · %{customdata[1]}<br>largest weight %{customdata[2]}<extra></extra>",
        colorbar=dict(title=dict(text="attention<br>÷ panel<br>max", side="top"), thickness=12, len=1.0,
                      tickvals=[0, 1], ticktext=["0", "max"]),
        showscale=True,
    ))
    fig.update_xaxes(range=[-0.5, W * side - gap - 0.5], showgrid=False, zeroline=False, side="top",
                     tickvals=centres_x, ticktext=labels, tickangle=-35 if W > 6 else 0)
    # the panels keep their shape by narrowing the y axis' domain from the top down: in a plot area made tall
    # enough for the colour bar (MIN_PLOT_PX) one row of panels stays under its word labels
    fig.update_yaxes(range=[R * side - gap - 0.5, -0.5], showgrid=False, zeroline=False, tickvals=centres_y,
                     ticktext=rows, scaleanchor="x", constrain="domain", constraintoward="top")
    # room above the panels for the word labels (slanted at 35 degrees, a label rises ~4 px per character)
    # and the title over them
    rise = 14 + 4 * max((len(w) for w in words), default=0) if W > 6 else 20
    top = rise + (50 if title else 20)
    panels_px = int(R * side * min(1.0, 900 / max(W * side, 1)))
    layout = base_layout(title, height=top + max(panels_px, MIN_PLOT_PX) + 10)
    layout["margin"] = dict(l=10, r=10, t=top, b=10)
    fig.update_layout(**layout)
    return fig


__all__ = ["word_maps"]
