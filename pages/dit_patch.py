"""The Diffusion page's "Where a patch looks" tab: what one image patch reads of the picture and of the prompt at
the page's step (or the mean over the steps), layer and head (core.dit_capture.patch_reads).  Its own row where
the capture holds it: every step of a capture of full maps, the kept steps of a capture of real size (that one
row recomputed from the stored queries and keys); else the row of its region, from the pooled maps.  The query
patch is the link's `patch` ("row,col"), picked by a click on the picture.  At a step whose full maps a capture
of real size did not keep, a button samples the picture again keeping them too (the link's `keep`).  Widget keys
start with "dit_patch_".
"""
from __future__ import annotations

import dataclasses

import numpy as np
import streamlit as st

from capture import dit_capture
from charts import dit as charts
from charts.pictures import overlay
from charts.theme import plot_config
from core.types import MAX_KEPT, Capture
from pages import shared
from pages.widgets import picture

TAB = "Where a patch looks"  # the tab's label on the Diffusion page


def query_patch(grid: tuple[int, int]) -> tuple[int, int]:
    """The link's query patch, or the centre one when it names none on this grid."""
    try:
        row, col = (int(v) for v in shared.view_state().patch.split(","))
    except ValueError:
        return grid[0] // 2, grid[1] // 2
    return (row, col) if 0 <= row < grid[0] and 0 <= col < grid[1] else (grid[0] // 2, grid[1] // 2)


def render(capture: Capture, image: np.ndarray, a: np.ndarray, labels: list[str], words: list[int],
           index: int | None, layer: int, head: int) -> None:
    """a  # [1, layer, head, image, text]: the word maps the page shows (its step, or the mean over the steps);
    `words`: the text columns shown, named by `labels`; `index` None: the mean over the steps."""
    grid, n_layers = capture.meta.grid, capture.meta.n_layers
    row, col = query_patch(grid)
    layers = list(range(n_layers)) if layer == -1 else [layer]
    reads = [dit_capture.patch_reads(capture, index, l, (row, col)) for l in layers]
    maps = np.mean([m for m, _side in reads], axis=0)  # [head, rows, cols]
    side = max(s for _m, s in reads)  # 1: the patch's own row; else regions of side x side patches
    own = 0 <= head < len(maps)
    shown = maps[head] if own else maps.mean(0)  # [rows, cols]
    text = a[0, layers][:, :, row * grid[1] + col].mean(0)  # [head, text]
    text = text[head] if 0 <= head < len(text) else text.mean(0)
    when = "the mean over the steps" if index is None else f"step {index}"
    which = f"layer {layer}" if layer != -1 else "the mean of layers"
    heads = f"head {head}" if own else "the mean of heads"
    query = f"patch ({row}, {col})" if side == 1 else f"the {side} x {side} region of patch ({row}, {col})"
    left, right = st.columns([1, 1])
    with left:
        r0, c0 = row // side * side, col // side * side
        drawn = overlay(image, shown, opacity=0.75, grid_lines=grid[0] <= 32, label="attention",
                        title=f"Where {query} looks: {when}, {which}, {heads} (click a patch to ask from it)")
        picture(drawn, key="dit_patch_overlay", on_pick=lambda r, c: shared.set_fields(patch=f"{r},{c}"),
                min_cell_px=4, max_cell_px=34, outline=(r0, r0 + side, c0, c0 + side))
    with right:
        shared.plotly_chart(charts.words_read([labels[i] for i in words], text[words],
                                              title=f"What {query} reads of the prompt"),
                            key="dit_patch_words", config=plot_config())
    info = dit_capture.layout(capture)
    if side > 1:
        kept = dit_capture.full_steps(capture)
        st.caption(f"This capture keeps full maps at sampling steps {', '.join(map(str, kept)) or 'none'} only: at "
                   f"other steps (and over the steps) a patch's reading comes from the maps pooled into {side} x "
                   f"{side}-patch regions, its region's rows averaged and each region's attention spread evenly over "
                   "its patches.")
        if index is not None:
            _keep_button(capture, kept, capture.output.recorded_steps[index])
    if info.cross:
        st.caption("This model reads the prompt by cross-attention: the picture is its self-attention row (summing to "
                   "1 over the image), the prompt its cross-attention row (another softmax, its own heads).")
    else:
        st.caption(f"One softmax row over image and text: {float(shown.sum()):.0%} of it on the image, "
                   f"{float(text.sum()):.0%} on the prompt (padding included), for the heads and layers shown."
                   + (" Here it reads no prompt token: a layer that attends to the image only (SD3.5's extra "
                      "self-attention)." if not text.any() else ""))


def _keep(steps: str) -> None:
    """The button's click: the new capture opens on this tab (the page's tabs are drawn anew after a capture)."""
    shared.set_fields(keep=steps)
    st.session_state["dit_open_tab"] = TAB


def _keep_button(capture: Capture, kept: list[int], step: int) -> None:
    """A button that samples the same picture again keeping `step`'s full maps too (RunSpec.keep, in the link)."""
    wanted = sorted({*kept, step})
    meta = capture.meta
    n = len(dit_capture.layout(capture).labels)
    extra = meta.n_layers * 2 * meta.n_heads * n * meta.head_dim * 4 / 2**20  # MB: one step's queries and keys
    size = f"{extra / 1024:.1f} GB" if extra >= 1024 else f"{extra:.1f} MB"
    spec = dataclasses.replace(capture.spec, keep=tuple(wanted))
    full = len(wanted) > MAX_KEPT
    st.button(f"Keep step {step}'s full maps", key="dit_patch_keep", disabled=full, on_click=_keep,
              args=(",".join(map(str, wanted)),),
              help=f"A capture keeps the full maps of at most {MAX_KEPT} steps." if full else
              f"Samples the same picture again (same seed) and keeps the queries and keys of steps "
              f"{', '.join(map(str, wanted))}, about {size} of cache each: "
              f"{shared.capture_estimate(spec).text()}.")


__all__ = ["query_patch", "render"]
