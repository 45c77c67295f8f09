"""Figures drawn as one server-made picture (a charts.attention `Picture`, drawn by pages/widgets.picture):
a layer x head grid of any metric, a per-patch map over a picture, and a mosaic of small panels.

Why pictures: a page whose first figure is a Plotly chart waits for Plotly's 4.7 MB bundle before it
paints (~1.3 s in a fresh browser); a `Picture` is a PNG or JPEG plus a few kB of script, so a shared link
paints as soon as the page does (bench/app.py).  Clicks report the cell (row, col), the hover names the
cell and its value, and a colour bar says what the colour measures.

Pure: numpy arrays in, a `Picture` out; no streamlit, no torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from charts.attention import Picture
from charts.image import image_source, png_source
from charts.theme import ATTENTION_SCALE, DIVERGING_SCALE, METRIC_SCALE, colour_table

CHOSEN = (255, 75, 75)  # chosen cells: a red frame
MARK = (255, 75, 75)  # marked cells (e.g. the heads an intervention edits): a red dot
THRESHOLD_DOT = (255, 255, 255)  # cells past the paper's threshold: a white dot
NOT_MEASURED = (210, 210, 210)
SINK = (255, 77, 77)  # visual sinks: a dashed red frame
BOX = (255, 255, 255)  # the asked objects' boxes: a dotted white frame


def ramp(scale: str) -> tuple[str, ...]:
    """Eleven CSS colours along a colour scale, bottom to top of the colour bar."""
    lut = colour_table(scale)
    return tuple(f"rgb({r},{g},{b})" for r, g, b in lut[np.linspace(0, 255, 11).round().astype(int)])


def colour_range(values: np.ndarray, signed: bool | None = None) -> tuple[str, float, float]:
    """(colour scale, zmin, zmax) of a metric: a diverging scale centred on 0 when the values take both
    signs (or `signed`), else the metric scale from the smallest to the largest value."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if signed or (signed is None and lo < 0 < hi):
        bound = max(abs(lo), abs(hi), 1e-12)
        return DIVERGING_SCALE, -bound, bound
    return METRIC_SCALE, lo, hi if hi > lo else lo + 1e-9


def coloured(values: np.ndarray, scale: str, zmin: float, zmax: float) -> np.ndarray:
    """values  # [...] -> rgb  # [..., 3] uint8 on `scale` from zmin to zmax (NaN: light grey)."""
    lut = colour_table(scale)
    v = np.asarray(values, dtype=np.float64)
    unit = np.clip((np.nan_to_num(v, nan=zmin) - zmin) / (zmax - zmin), 0.0, 1.0)
    rgb = lut[np.rint(unit * 255).astype(np.intp)]
    rgb[~np.isfinite(v)] = NOT_MEASURED
    return rgb


def _frame(rgba: np.ndarray, y0: int, x0: int, y1: int, x1: int, colour: tuple[int, int, int], width: int = 2,
           dash: int = 0) -> None:
    """Draw a frame of `width` px inside [y0:y1, x0:x1] (dashed: `dash` px on, `dash` px off)."""
    keep = np.ones(max(y1 - y0, x1 - x0), dtype=bool)
    if dash:
        keep = (np.arange(keep.size) // dash) % 2 == 0
    for w in range(width):
        for y in (y0 + w, y1 - 1 - w):
            xs = np.arange(x0, x1)[keep[: x1 - x0]]
            rgba[y, xs, :3] = colour
            rgba[y, xs, 3] = 255
        for x in (x0 + w, x1 - 1 - w):
            ys = np.arange(y0, y1)[keep[: y1 - y0]]
            rgba[ys, x, :3] = colour
            rgba[ys, x, 3] = 255


def metric_grid(values: np.ndarray, title: str = "", value_name: str = "score", threshold: float | None = None,
                chosen: Sequence[tuple[int, int]] = (), marked: Sequence[tuple[int, int]] = (),
                signed: bool | None = None, row_name: str = "layer", col_name: str = "head",
                hover: str = "", aspect: float = 1.0) -> Picture:
    """values  # [layer, head] as a grid of coloured cells, layer 0 at the top.

    Signed values get a diverging scale centred on 0; `threshold` puts a white dot in every cell past the
    paper's cut-off; `chosen` cells get a red frame, `marked` cells a red dot.  NaN cells (not measured)
    are light grey.  `aspect`: a cell's width / its height as drawn (pages/widgets.picture's cell_ratio),
    so the dots stay round."""
    v = np.asarray(values, dtype=np.float64)
    rows, cols = v.shape
    scale, zmin, zmax = colour_range(v, signed)
    px, pw = 12, max(4, round(12 * aspect))  # pixels per cell in the picture, high and wide (the browser scales it)
    cells = coloured(v, scale, zmin, zmax)  # [row, col, 3]
    rgba = np.zeros((rows * px, cols * pw, 4), dtype=np.uint8)
    rgba[..., :3] = np.repeat(np.repeat(cells, px, 0), pw, 1)
    rgba[..., 3] = 255
    rgba[px - 1 :: px, :, 3] = 0  # a one-pixel gap between cells
    rgba[:, pw - 1 :: pw, 3] = 0

    def dot(r: int, c: int, half: int, colour: tuple[int, int, int]) -> None:
        y, x = r * px + px // 2, c * pw + pw // 2
        rgba[y - half : y + half, x - half : x + half, :3] = colour

    if threshold is not None:
        for r, c in zip(*np.nonzero(np.nan_to_num(v, nan=-np.inf) > threshold)):
            dot(r, c, 1, THRESHOLD_DOT)
    for r, c in marked:
        dot(r, c, 2, MARK)
    for r, c in chosen:
        _frame(rgba, r * px, c * pw, (r + 1) * px - 1, (c + 1) * pw - 1, CHOSEN)
    bar = value_name + (f" (dot: > {threshold:g})" if threshold is not None else "")
    return Picture(src=png_source(rgba), rows=rows, cols=cols, cell=px,
                   row_labels=tuple(f"L{r}" for r in range(rows)), col_labels=tuple(f"H{c}" for c in range(cols)),
                   row_hover=tuple(f"{row_name} {r}" for r in range(rows)),
                   col_hover=tuple(f"{col_name} {c}" for c in range(cols)),
                   hover="{row}, {col}: " + value_name + " {value}" + hover, row_title=row_name, col_title=col_name,
                   title=title, bar_title=bar, zmin=round(zmin, 6), zmax=round(zmax, 6), ramp=ramp(scale),
                   values=tuple(tuple(float(x) if np.isfinite(x) else None for x in row) for row in v))


def crisp(image: np.ndarray, side: int = 256) -> np.ndarray:
    """image  # [H, W, 3] uint8 at about `side` px a side, without blur: a small picture (32 px) upscaled by
    pixel repetition, a large one (1,024 px) shrunk by block means."""
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    down = max(1, -(-max(h, w) // side))
    if down > 1:
        hh, ww = h // down * down, w // down * down
        blocks = image[:hh, :ww].reshape(hh // down, down, ww // down, down, -1)
        image = blocks.mean(axis=(1, 3)).round().astype(np.uint8)
    up = max(1, side // max(image.shape[:2]))
    return np.repeat(np.repeat(image, up, axis=0), up, axis=1)


def photo(image: np.ndarray, title: str = "", side: int = 256) -> Picture:
    """A generated or given picture on its own (no axes, no colour bar), drawn crisp at about `side` px."""
    shown = crisp(image, side)
    return Picture(src=png_source(np.concatenate([shown, np.full(shown.shape[:2] + (1,), 255, np.uint8)], -1)),
                   rows=1, cols=1, cell=shown.shape[0], row_labels=("",), col_labels=("",), row_hover=("",),
                   col_hover=("",), hover=title, row_title="", col_title="", title=title, bar_title="", zmin=0.0,
                   zmax=1.0, ramp=(), bar=False)


def blend(image: np.ndarray, values: np.ndarray, opacity: float, scale: str = ATTENTION_SCALE,
          zmax: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """values  # [rows, cols] (per patch) coloured and laid over image  # [H, W, 3] uint8 as nearest-patch
    blocks (never blurred), each block as opaque as its value (from 0.2 x opacity at 0 to `opacity` at the
    top), so the picture shows where attention is low; returns rgb  # [h, w, 3] uint8 at `size` (h, w;
    default the picture's)."""
    h, w = size or image.shape[:2]
    rows, cols = values.shape
    top = float(np.nanmax(values)) if zmax is None else zmax
    top = top if top > 0 else 1.0
    heat = coloured(values, scale, 0.0, top).astype(np.float32)  # [rows, cols, 3]
    # a patch's colour covers the picture in proportion to its value: low attention lets the picture through
    alpha = opacity * (0.2 + 0.8 * np.clip(np.nan_to_num(values) / top, 0.0, 1.0))[..., None]  # [rows, cols, 1]
    ys = np.minimum((np.arange(h) * rows) // h, rows - 1)
    xs = np.minimum((np.arange(w) * cols) // w, cols - 1)
    photo = np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((w, h), Image.BILINEAR),
                       dtype=np.float32)
    a = alpha[ys][:, xs]
    out = (1 - a) * photo + a * heat[ys][:, xs]
    return np.clip(out, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, opacity: float = 0.45, title: str = "", label: str = "attention",
            grid_lines: bool = False, sinks: Sequence[tuple[int, int]] = (),
            boxes: Sequence[tuple[int, int, int, int]] = (), zmax: float | None = None, side: int = 448,
            hover: str = "") -> Picture:
    """values  # [rows, cols] over image  # [H, W, 3] uint8: one cell per patch (a click reports the patch),
    the colour bar from 0 to the largest value (or zmax).  `sinks` (patches) get a dashed red frame,
    `boxes` (x0, y0, x1, y1 in the picture's pixels) a dotted white one."""
    v = np.asarray(values, dtype=np.float32)
    rows, cols = v.shape
    k = max(4, -(-side // max(rows, cols)))  # pixels per patch in the picture sent
    top = float(np.nanmax(v)) if zmax is None else float(zmax)
    top = top if top > 0 else 1.0
    rgb = blend(image, v, opacity, zmax=top, size=(rows * k, cols * k))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    if grid_lines:
        rgba[k - 1 :: k, :, :3] = (0.6 * rgba[k - 1 :: k, :, :3] + 100).astype(np.uint8)
        rgba[:, k - 1 :: k, :3] = (0.6 * rgba[:, k - 1 :: k, :3] + 100).astype(np.uint8)
    for r, c in sinks:
        _frame(rgba, r * k, c * k, (r + 1) * k, (c + 1) * k, SINK, width=2, dash=3)
    sy, sx = rows * k / image.shape[0], cols * k / image.shape[1]
    for x0, y0, x1, y1 in boxes:
        _frame(rgba, int(y0 * sy), int(x0 * sx), min(int(np.ceil(y1 * sy)), rows * k),
               min(int(np.ceil(x1 * sx)), cols * k), BOX, width=2, dash=2)
    ticks_r = tuple(str(r) if r % max(1, rows // 8) == 0 else "" for r in range(rows))
    ticks_c = tuple(str(c) if c % max(1, cols // 8) == 0 else "" for c in range(cols))
    return Picture(src=image_source(rgba[..., :3]), rows=rows, cols=cols, cell=k, row_labels=ticks_r,
                   col_labels=ticks_c, row_hover=tuple(f"patch ({r}," for r in range(rows)),
                   col_hover=tuple(f"{c})" for c in range(cols)), hover="{row} {col} · " + label + " {value}" + hover,
                   row_title="patch row", col_title="patch column", title=title, bar_title=label, zmin=0.0,
                   zmax=round(top, 6), ramp=ramp(ATTENTION_SCALE),
                   values=tuple(tuple(round(float(x), 5) for x in row) for row in v), smooth=True)


def mosaic(tiles: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
           label: str = "", zmin: float = 0.0, zmax: float = 1.0, scale: str = ATTENTION_SCALE,
           values: np.ndarray | None = None, row_name: str = "", col_name: str = "") -> Picture:
    """tiles  # [row, col, h, w, 3] uint8: small panels in a grid with a gap, one cell per panel (a click
    reports the panel); the colour bar says what the colours mean (zmin..zmax on `scale`); `values`
    # [row, col] is what the hover shows for a panel."""
    R, C, h, w, _ = tiles.shape
    gap = max(1, h // 16)
    side = max(h, w) + gap
    rgba = np.zeros((R * side, C * side, 4), dtype=np.uint8)
    for r in range(R):
        for c in range(C):
            rgba[r * side : r * side + h, c * side : c * side + w, :3] = tiles[r, c]
            rgba[r * side : r * side + h, c * side : c * side + w, 3] = 255
    shown = None if values is None else tuple(tuple(round(float(x), 5) for x in row) for row in values)
    return Picture(src=png_source(rgba), rows=R, cols=C, cell=side, row_labels=tuple(row_labels),
                   col_labels=tuple(col_labels), row_hover=tuple(f"{row_name}{t}" for t in row_labels),
                   col_hover=tuple(f"{col_name}{t}" for t in col_labels),
                   hover="{row} · {col}" + (" · {value}" if values is not None else ""), row_title="", col_title="",
                   title=title, bar_title=label, zmin=round(zmin, 6), zmax=round(zmax, 6), ramp=ramp(scale),
                   values=shown)


__all__ = ["metric_grid", "overlay", "mosaic", "photo", "blend", "crisp", "colour_range", "coloured", "ramp"]
