"""Figures for diffusion transformers (plotly; pure: no streamlit, no torch).

- Pictures are drawn crisp (a 32 px picture nearest-neighbour upscaled, a 1,024 px one shrunk to a 256 px
  PNG: the figure stays small whatever the model samples).  The word heatmaps are charts.dit_words.
- `sink_chart`: received attention per text token (mean over image positions) and its spatial
  flatness, with RefAM's global sinks marked.
- `words_read`: what one image patch reads of each text token (bars).
- `grounding_chart`: a [layer, head] grounding score heatmap (AUROC or IoU).
- `before_after`: two images side by side (the same seed without and with an intervention).
- `timestep_profile`: a per-step curve (e.g. how much of the image's attention goes to the text).
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from charts.image import layer_head_chart, png_source
from charts.theme import base_layout, plotly_text

DRAWN = 256  # pictures are drawn from a PNG about this many pixels a side: small ones upscaled by pixel
# repetition (a 32 x 32 shapes-dit picture from 256 x 256: no browser blur), large ones shrunk by block means
PANEL = 128  # the contact sheet draws each picture at most this many pixels a side


def _image_trace(image: np.ndarray, side: int = DRAWN) -> go.Image:
    """image  # [H, W, 3] uint8 as a PNG of about `side` pixels a side, on axes of the picture's own pixels."""
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    up = max(1, side // max(h, w))
    down = max(1, -(-max(h, w) // side))
    if down > 1:  # block means over down x down pixels
        hh, ww = h // down * down, w // down * down
        blocks = image[:hh, :ww].reshape(hh // down, down, ww // down, down, 3)
        image = blocks.mean(axis=(1, 3)).round().astype(np.uint8)
    big = np.repeat(np.repeat(image, up, axis=0), up, axis=1)
    step = down / up  # picture pixels per drawn pixel
    return go.Image(source=png_source(big), x0=-0.5 + step / 2, dx=step, y0=-0.5 + step / 2, dy=step,
                    hoverinfo="skip")


def _axes(fig: go.Figure, height: int, width: int) -> None:
    fig.update_xaxes(range=[-0.5, width - 0.5], showgrid=False, zeroline=False, showticklabels=False)
    fig.update_yaxes(range=[height - 0.5, -0.5], showgrid=False, zeroline=False, showticklabels=False)


def before_after(before: np.ndarray, after: np.ndarray, titles: tuple[str, str] = ("before", "after"),
                 title: str = "", height: int = 340) -> go.Figure:
    """Two images side by side (same size)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=list(titles), horizontal_spacing=0.03)
    for c, img in enumerate((before, after), start=1):
        fig.add_trace(_image_trace(img), row=1, col=c)
    h, w = before.shape[:2]
    _axes(fig, h, w)
    fig.update_yaxes(scaleanchor="x")
    fig.update_layout(**base_layout(title, height))
    return fig


def sink_chart(tokens: list[str], mean: np.ndarray, cv: np.ndarray, share: np.ndarray, flagged: np.ndarray,
               title: str = "", height: int = 320, columns: list[int] | None = None) -> go.Figure:
    """Per text token: received attention from the image (bars) and spatial CV (markers); sinks in red.
    Each bar is named "column:token", `columns` the tokens' text columns (default 0, 1, 2 ...)."""
    x = [plotly_text(f"{c}:{t}") for c, t in zip(range(len(tokens)) if columns is None else columns, tokens)]
    colours = ["#d62728" if f else "#1f77b4" for f in flagged]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=x, y=np.asarray(mean, dtype=float), marker_color=colours, name="mean received",
                         customdata=np.stack([np.asarray(share, float), np.asarray(cv, float)], -1),
                         hovertemplate="%{x}<br>mean %{y:.4f}<br>sink in %{customdata[0]:.0%} of maps"
                                       "<br>CV %{customdata[1]:.2f}<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=np.asarray(cv, dtype=float), mode="markers", name="spatial CV",
                             marker=dict(color="#7f7f7f", symbol="diamond")), secondary_y=True)
    fig.update_layout(**base_layout(title, height), legend=dict(orientation="h", y=1.12))
    fig.update_yaxes(title_text="mean attention from image", secondary_y=False)
    fig.update_yaxes(title_text="CV over image", secondary_y=True, showgrid=False)
    return fig


def words_read(labels: list[str], values: np.ndarray, title: str = "", label: str = "attention",
               height: int = 280) -> go.Figure:
    """One bar per text column: what one image position reads of it (`values`  # [text])."""
    fig = go.Figure(go.Bar(x=[plotly_text(t) for t in labels], y=np.asarray(values, dtype=float),
                           marker_color="#1f77b4", hovertemplate="%{x}<br>%{y:.4f}<extra></extra>"))
    fig.update_layout(**base_layout(title, height))
    fig.update_yaxes(title_text=label, rangemode="tozero")
    return fig


def grounding_chart(scores: np.ndarray, title: str = "", label: str = "AUROC", height: int = 300) -> go.Figure:
    """scores  # [layer, head] as a heatmap with the values written in, layer 0 at the top."""
    return layer_head_chart(scores, title, label, height, show_values=True)


def timestep_profile(timesteps: list[float], values: np.ndarray, names: list[str], title: str = "",
                     label: str = "", selected: int | None = None, height: int = 280) -> go.Figure:
    """values  # [series, step] against the scheduler timestep (noise on the left); the chosen step marked."""
    values = np.asarray(values, dtype=np.float32)
    fig = go.Figure()
    for name, series in zip(names, values):
        fig.add_trace(go.Scatter(x=list(timesteps), y=series, mode="lines+markers", name=plotly_text(name)))
    if selected is not None and 0 <= selected < len(timesteps):
        fig.add_vline(x=timesteps[selected], line=dict(color="#888", dash="dot"))
    fig.update_layout(**base_layout(title, height), legend=dict(orientation="h", y=1.15))
    fig.update_xaxes(title_text="timestep (1000 = noise)", autorange="reversed")
    fig.update_yaxes(title_text=label)
    return fig


def head_contact_sheet(images: list[np.ndarray], labels: list[str], title: str = "", per_row: int = 8,
                       panel: int = 110) -> go.Figure:
    """Images in a grid with a label each (HeadHunter's per-head perturbed samples, METHODS §7.1)."""
    n = len(images)
    rows = max(1, -(-n // per_row))
    fig = make_subplots(rows=rows, cols=min(per_row, max(1, n)), subplot_titles=labels, horizontal_spacing=0.01,
                        vertical_spacing=0.08 / rows)
    for i, img in enumerate(images):
        fig.add_trace(_image_trace(img, PANEL), row=i // per_row + 1, col=i % per_row + 1)
    if images:
        h, w = images[0].shape[:2]
        _axes(fig, h, w)
    fig.update_yaxes(scaleanchor="x")
    fig.update_annotations(font_size=10)
    fig.update_layout(**base_layout(title, 40 + panel * rows))
    return fig


__all__ = ["before_after", "sink_chart", "words_read", "grounding_chart",
           "timestep_profile", "head_contact_sheet"]
