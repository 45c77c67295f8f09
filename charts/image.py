"""Image overlays for vision transformers (plotly figures; pure: no streamlit, no torch).

- `attention_overlay`: a per-patch map drawn over the picture as nearest-patch blocks (never
  blurred), with adjustable opacity, patch grid lines, the selected patch outlined, and one
  invisible marker per patch whose customdata is (row, col), so a click selects a patch
  (`patch_from_selection` reads it back from a Streamlit plotly selection).
- `head_overlays`: the same for every head of a layer, as small multiples.
- `distance_profile_chart`: attention strength against distance, one line per head (Li et al.).
- `layer_head_chart`: a [layer, head] metric as a heatmap.
"""
from __future__ import annotations

import base64
import io
from functools import lru_cache

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from charts.theme import ATTENTION_SCALE, METRIC_SCALE, base_layout, fading


def image_source(image: np.ndarray) -> str:
    """image  # [H, W, 3] uint8 -> a JPEG data URI (a few tens of kB instead of a JSON pixel array).
    The same picture is drawn in many panels and reruns: encoded once (keyed by its bytes)."""
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    return _data_uri(pixels.tobytes(), pixels.shape, "JPEG")


def png_source(rgba: np.ndarray) -> str:
    """rgba  # [H, W, 4] uint8 -> a lossless PNG data URI (sharp pixel blocks, transparent where alpha is 0)."""
    pixels = np.ascontiguousarray(rgba, dtype=np.uint8)
    return _data_uri(pixels.tobytes(), pixels.shape, "PNG")


@lru_cache(maxsize=16)
def _data_uri(data: bytes, shape: tuple[int, ...], fmt: str) -> str:
    picture = Image.fromarray(np.frombuffer(data, np.uint8).reshape(shape))
    buffer = io.BytesIO()
    if fmt == "JPEG":
        picture.convert("RGB").save(buffer, format="JPEG", quality=90)
    else:
        picture.save(buffer, format="PNG", compress_level=1)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _patch_geometry(image: np.ndarray, grid: tuple[int, int]) -> tuple[float, float]:
    height, width = image.shape[:2]
    return height / grid[0], width / grid[1]


def _add_overlay(fig: go.Figure, image: np.ndarray, values: np.ndarray, opacity: float, colorscale: str,
                 grid_lines: bool, selected: tuple[int, int] | None, row: int | None, col: int | None,
                 zmax: float | None, showscale: bool, label: str) -> None:
    """Add picture, block heatmap, click targets and grid lines of one panel."""
    rows, cols = values.shape
    ph, pw = _patch_geometry(image, (rows, cols))
    height, width = image.shape[:2]
    where = dict(row=row, col=col) if row is not None else {}
    fig.add_trace(go.Image(source=image_source(image), x0=0, dx=1, y0=0, dy=1, hoverinfo="skip"), **where)
    r, c = np.mgrid[0:rows, 0:cols]
    patch_ids = np.stack([r, c], axis=-1)  # [rows, cols, 2]
    fig.add_trace(go.Heatmap(
        z=values, x0=pw / 2 - 0.5, dx=pw, y0=ph / 2 - 0.5, dy=ph, zsmooth=False, opacity=opacity,
        # opaque with the value: low values let the picture through
        colorscale=fading(colorscale) if isinstance(colorscale, str) else colorscale,
        zmin=0, zmax=zmax if zmax is not None else float(np.nanmax(values) or 1.0),
        showscale=showscale, hoverinfo="skip",
        colorbar=dict(title=dict(text=label), thickness=12) if showscale else None,
    ), **where)
    if grid_lines:  # one trace of None-separated segments (a layout shape per line costs ~3 ms each)
        xs, ys = [], []
        for i in range(1, cols):
            xs += [i * pw - 0.5, i * pw - 0.5, None]
            ys += [-0.5, height - 0.5, None]
        for i in range(1, rows):
            xs += [-0.5, width - 0.5, None]
            ys += [i * ph - 0.5, i * ph - 0.5, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="rgba(255,255,255,0.35)", width=0.6),
                                 hoverinfo="skip", showlegend=False, name="grid"), **where)
    # one transparent marker per patch centre: selectable points carrying (row, col), and the hover text
    # (a trace with hoverinfo "skip" would not be clickable either)
    fig.add_trace(go.Scatter(
        x=(c.ravel() + 0.5) * pw - 0.5, y=(r.ravel() + 0.5) * ph - 0.5, mode="markers",
        marker=dict(size=max(4.0, min(pw, ph) * 0.9), symbol="square", color="#00e5ff", opacity=0.0),
        customdata=np.concatenate([patch_ids.reshape(-1, 2), values.reshape(-1, 1)], axis=1),
        hovertemplate="patch (%{customdata[0]:.0f}, %{customdata[1]:.0f})<br>" + label
                      + " %{customdata[2]:.4f}<extra></extra>",
        showlegend=False, name="patches",
        selected=dict(marker=dict(opacity=0.0)), unselected=dict(marker=dict(opacity=0.0)),
    ), **where)
    xref = "x" if row is None else fig.get_subplot(row, col).xaxis.plotly_name.replace("axis", "")
    yref = "y" if row is None else fig.get_subplot(row, col).yaxis.plotly_name.replace("axis", "")
    if selected is not None:
        sr, sc = selected
        fig.add_shape(type="rect", x0=sc * pw - 0.5, x1=(sc + 1) * pw - 0.5, y0=sr * ph - 0.5,
                      y1=(sr + 1) * ph - 0.5, xref=xref, yref=yref, line=dict(color="#00e5ff", width=2))


def _image_axes(fig: go.Figure, height: int, width: int) -> None:
    fig.update_xaxes(range=[-0.5, width - 0.5], showgrid=False, zeroline=False, showticklabels=False)
    fig.update_yaxes(range=[height - 0.5, -0.5], showgrid=False, zeroline=False, showticklabels=False)


def attention_overlay(image: np.ndarray, values: np.ndarray, opacity: float = 0.6, colorscale: str = ATTENTION_SCALE,
                      grid_lines: bool = True, selected: tuple[int, int] | None = None, title: str = "",
                      label: str = "attention", zmax: float | None = None, height: int = 520) -> go.Figure:
    """values  # [rows, cols] over image  # [H, W, 3] uint8, one colour block per patch.

    Click targets: the "patches" scatter trace's points carry customdata (row, col).
    """
    values = np.asarray(values, dtype=np.float32)
    fig = go.Figure()
    _add_overlay(fig, image, values, opacity, colorscale, grid_lines, selected, None, None, zmax, True, label)
    h, w = image.shape[:2]
    _image_axes(fig, h, w)
    fig.update_layout(**base_layout(title, height))
    fig.update_yaxes(scaleanchor="x", scaleratio=1)
    return fig


def head_overlays(image: np.ndarray, values: np.ndarray, opacity: float = 0.6, colorscale: str = ATTENTION_SCALE,
                  grid_lines: bool = False, selected: tuple[int, int] | None = None, title: str = "",
                  per_row: int = 6, shared_scale: bool = False, label: str = "attention",
                  titles: list[str] | None = None) -> go.Figure:
    """values  # [head, rows, cols]: one overlay panel per head (each its own colour range unless shared);
    `titles` names the panels (default "head h")."""
    values = np.asarray(values, dtype=np.float32)
    n = values.shape[0]
    n_rows = -(-n // per_row)
    fig = make_subplots(rows=n_rows, cols=min(per_row, n), subplot_titles=titles or [f"head {h}" for h in range(n)],
                        horizontal_spacing=0.01, vertical_spacing=0.06)
    top = float(values.max()) if shared_scale else None
    for h in range(n):
        r, c = h // per_row + 1, h % per_row + 1
        _add_overlay(fig, image, values[h], opacity, colorscale, grid_lines, selected, r, c, top, False, label)
        fig.update_yaxes(scaleanchor=fig.get_subplot(r, c).xaxis.plotly_name.replace("axis", ""), row=r, col=c)
    hh, ww = image.shape[:2]
    _image_axes(fig, hh, ww)
    fig.update_layout(**base_layout(title, 40 + 190 * n_rows))
    return fig


def patch_from_selection(selection) -> tuple[int, int] | None:
    """(row, col) of the first clicked patch in a Streamlit plotly selection (dict-like), else None."""
    if not selection:
        return None
    points = selection.get("points") if hasattr(selection, "get") else getattr(selection, "points", None)
    for point in points or []:
        data = point.get("customdata") if hasattr(point, "get") else None
        if isinstance(data, dict):  # the browser sends arrays as {"0": row, "1": col, ...}
            data = [data[k] for k in sorted(data, key=int)]
        if data is not None and len(data) >= 2:
            return int(data[0]), int(data[1])
    return None


def distance_profile_chart(distance_px: np.ndarray, strength: np.ndarray, title: str = "",
                           log_y: bool = True, height: int = 360) -> go.Figure:
    """strength  # [head, bin] against distance_px  # [bin]: one line per head (Li et al. 2023)."""
    fig = go.Figure()
    for h, series in enumerate(np.asarray(strength)):
        fig.add_trace(go.Scatter(x=distance_px, y=series, mode="lines+markers", name=f"head {h}",
                                 hovertemplate=f"head {h}<br>%{{x:.0f}} px: %{{y:.2e}}<extra></extra>"))
    fig.update_layout(**base_layout(title, height))
    fig.update_xaxes(title_text="distance between patches (px)")
    fig.update_yaxes(title_text="mean attention per key", type="log" if log_y else "linear",
                     exponentformat="power")  # 10^-4, not the SI "100µ"
    return fig


def layer_head_chart(values: np.ndarray, title: str = "", label: str = "", height: int = 420,
                     show_values: bool = False) -> go.Figure:
    """values  # [layer, head] as a heatmap (layer 0 at the top); points carry (layer, head);
    `show_values` writes each value in its cell (small grids)."""
    values = np.asarray(values, dtype=np.float32)
    layers, heads = values.shape
    ids = np.stack(np.mgrid[0:layers, 0:heads], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=values, colorscale=METRIC_SCALE, customdata=ids, colorbar=dict(title=dict(text=label), thickness=12),
        texttemplate="%{z:.2f}" if show_values else None,
        hovertemplate="layer %{customdata[0]}, head %{customdata[1]}<br>" + (f"{label} " if label else "")
                      + "%{z:.4g}<extra></extra>",
    ))
    fig.update_layout(**base_layout(title, height))
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", dtick=1)
    return fig
