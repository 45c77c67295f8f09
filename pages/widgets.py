"""Two small browser components (`st.components.v2`: inline HTML, CSS and JavaScript, no build step).

- `picture`: a heatmap made by charts.attention as one server-coloured PNG (a `Picture`: the model
  view's mosaic, one head's map, a long map's overview), drawn as an <img> with axis labels, a colour
  bar, a hover read-out of the cell, zoom buttons (the picture then scrolls: pan) and clicks
  (`on_pick(row, col)`).
- `share_link`: the link of the current view with a "Copy link" button.
- `paint_signal`: an invisible element that reports when the page's first figures are on screen.

Why not Plotly and `st.code`: a browser opening a shared link must first load the JavaScript of every
kind of element on the page.  Plotly's bundle is 4.7 MB (~1.3 s to load and draw even on a bare page)
and `st.code`'s syntax highlighter 1.5 MB; these components are a few kB, so a link to the explorer
paints as soon as the page does (bench/app.py).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Callable

import streamlit as st

from charts.attention import Picture
from charts.pictures import metric_grid

PICTURE_CSS = """
.hs-pic { font: 12px "Source Sans Pro", sans-serif; color: var(--st-text-color); }
.hs-pic .head { display: flex; align-items: center; gap: 8px; margin-bottom: 4px; }
.hs-pic .title { font-weight: 600; font-size: 14px; }
.hs-pic .head button { padding: 0 8px; border-radius: 4px; cursor: pointer; background: transparent;
                       border: 1px solid rgba(128,128,128,0.5); color: var(--st-text-color); }
.hs-pic .row { display: flex; align-items: flex-start; gap: 14px; }
.hs-pic .scroll { overflow: auto; max-height: 760px; }
.hs-pic .grid { display: grid; }
.hs-pic .lab { overflow: visible; white-space: nowrap; opacity: 0.85; }
.hs-pic .ylab { text-align: right; padding-right: 4px; }
.hs-pic .xlab { position: relative; }
.hs-pic .xlab span { position: absolute; bottom: 2px; left: 50%; transform-origin: 0 100%; white-space: nowrap; }
.hs-pic .axis { opacity: 0.7; text-align: center; }
.hs-pic .holder { position: relative; }
.hs-pic img { image-rendering: pixelated; display: block; }
.hs-pic .sel { position: absolute; border: 2px solid #ff4b4b; pointer-events: none; box-sizing: border-box; }
.hs-pic .tip { position: absolute; pointer-events: none; background: var(--st-secondary-background-color);
               border: 1px solid rgba(128,128,128,0.5); border-radius: 4px; padding: 2px 6px; white-space: nowrap;
               display: none; z-index: 2; }
.hs-pic .bar { display: flex; gap: 6px; align-items: stretch; }
.hs-pic .ramp { width: 12px; border-radius: 2px; }
.hs-pic .ticks { display: flex; flex-direction: column; justify-content: space-between; }
.hs-pic .bartitle { writing-mode: vertical-rl; transform: rotate(180deg); text-align: center; opacity: 0.8; }
"""

PICTURE_JS = """
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

export default function (component) {
  const { data, setTriggerValue, parentElement } = component;
  const d = data;
  parentElement.querySelector(".hs-pic")?.remove();  // the last render's (the injected <style> stays)
  const root = el("div", "hs-pic");
  const host = parentElement.host || parentElement;  // a shadow root has no width of its own
  const avail = Math.max(240, (host.clientWidth || 900) - 110);
  const labelW = d.row_labels.some((t) => t) ? Math.min(140, 8 + 7 * Math.max(...d.row_labels.map((t) => t.length))) : 0;
  const ratio = d.cell_ratio || 1;  // a cell's width / its height
  let fit = (avail - labelW) / (d.cols * ratio);  // fractional: the picture fills the column
  if (d.fit_height) {  // and, when asked, the window's height below the picture's top
    const spare = window.innerHeight - (host.getBoundingClientRect().top || 0) - 70;
    fit = Math.min(fit, spare / d.rows);
  }
  const base = Math.max(d.min_cell_px, Math.min(d.max_cell_px, fit));
  let zoom = 1;
  const head = el("div", "head");
  if (d.title) head.appendChild(el("span", "title", d.title));
  const body = el("div", "row");
  root.append(head, body);
  if (d.zoom) {
    for (const [label, f] of [["−", 0.5], ["+", 2], ["fit", 0]]) {
      const b = el("button", "", label);
      b.title = label === "fit" ? "fit the width" : (f > 1 ? "zoom in" : "zoom out");
      b.addEventListener("click", () => { zoom = f ? Math.max(0.25, Math.min(16, zoom * f)) : 1; draw(); });
      head.appendChild(b);
    }
  }
  const fmt = (v) => (v === null || v === undefined) ? "" :
    (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e4)) ? Number(v).toPrecision(3) : Number(v).toFixed(4);
  const draw = () => {
    body.innerHTML = "";
    const size = base * zoom, sx = size * ratio;  // px per row, px per column
    const font = Math.min(11, Math.max(8, size - 1));
    const thin = (labels, step) => {  // drop a label that would overlap the last one shown
      let last = -1e9;
      return labels.map((t, i) => { if (!t || (i - last) * step < font + 1) return ""; last = i; return t; });
    };
    const longest = Math.max(0, ...d.col_labels.map((t) => t.length));
    const rotate = d.cols > 12 && longest * 0.6 * font > sx;  // upright labels when they fit their column
    const rowLabels = thin(d.row_labels, size), colLabels = rotate ? thin(d.col_labels, sx)
      : d.col_labels.map((t, i) => (t && i % Math.ceil((t.length * 0.62 * font + 4) / sx) === 0) ? t : "");
    const xlabH = d.col_labels.some((t) => t) ? (rotate ? 12 + 6 * Math.max(...d.col_labels.map((t) => t.length)) : 18) : 0;
    const scroll = el("div", "scroll");
    scroll.style.maxWidth = `${avail + 40}px`;
    const grid = el("div", "grid");
    grid.style.gridTemplateColumns = `${d.row_title ? 16 : 0}px ${labelW}px ${sx * d.cols}px`;
    grid.style.gridTemplateRows = `${xlabH}px ${size * d.rows}px ${d.col_title ? 18 : 0}px`;
    grid.append(el("div"), el("div"));
    const top = el("div");
    top.style.display = "grid";
    top.style.gridTemplateColumns = `repeat(${d.cols}, ${sx}px)`;
    colLabels.forEach((t) => {
      const cell = el("div", "lab xlab");
      if (t) {
        const span = el("span", "", t);
        span.style.fontSize = `${font}px`;
        span.style.transform = rotate ? "rotate(-60deg)" : "translateX(-50%)";
        cell.appendChild(span);
      }
      top.appendChild(cell);
    });
    grid.appendChild(top);
    const ytitle = el("div", "axis", d.row_title);
    ytitle.style.writingMode = "vertical-rl";
    ytitle.style.transform = "rotate(180deg)";
    const left = el("div");
    left.style.display = "grid";
    left.style.gridTemplateRows = `repeat(${d.rows}, ${size}px)`;
    rowLabels.forEach((t) => {
      const cell = el("div", "lab ylab", t);
      cell.style.fontSize = `${font}px`;
      cell.style.lineHeight = `${size}px`;
      left.appendChild(cell);
    });
    const holder = el("div", "holder");
    const img = el("img");
    img.src = d.src;
    img.alt = d.title || "attention picture";
    if (d.smooth) img.style.imageRendering = "auto";  // a photo: scaled smoothly, not in blocks
    img.style.width = `${sx * d.cols}px`;
    img.style.height = `${size * d.rows}px`;
    if (d.clickable) img.style.cursor = "pointer";
    holder.appendChild(img);
    if (d.outline) {  // [row0, row1, col0, col1), in cells
      const [r0, r1, c0, c1] = d.outline;
      const sel = el("div", "sel");
      Object.assign(sel.style, { left: `${c0 * sx - 1}px`, top: `${r0 * size - 1}px`,
                                 width: `${(c1 - c0) * sx + 2}px`, height: `${(r1 - r0) * size + 2}px` });
      holder.appendChild(sel);
    }
    const tip = el("div", "tip");
    holder.appendChild(tip);
    const at = (e) => {
      const r = img.getBoundingClientRect();
      const c = Math.floor((e.clientX - r.left) / sx), w = Math.floor((e.clientY - r.top) / size);
      return (c >= 0 && c < d.cols && w >= 0 && w < d.rows) ? [w, c] : null;
    };
    img.addEventListener("mousemove", (e) => {
      const p = at(e);
      if (!p) { tip.style.display = "none"; return; }
      const value = d.values ? d.values[p[0]][p[1]] : null;
      tip.textContent = d.hover.replace("{row}", d.row_hover[p[0]]).replace("{col}", d.col_hover[p[1]])
                               .replace("{value}", fmt(value));
      tip.style.display = "block";
      tip.style.left = `${Math.min((p[1] + 1) * sx + 6, Math.max(0, sx * d.cols - 260))}px`;
      tip.style.top = `${(p[0] + 1) * size + 4}px`;
    });
    img.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    if (d.clickable) img.addEventListener("click", (e) => { const p = at(e); if (p) setTriggerValue("picked", p); });
    grid.append(ytitle, left, holder, el("div"), el("div"), el("div", "axis", d.col_title));
    scroll.appendChild(grid);
    const bar = el("div", "bar");
    bar.style.height = `${Math.min(size * d.rows, 360)}px`;
    bar.style.marginTop = `${xlabH}px`;
    const ramp = el("div", "ramp");
    ramp.style.background = `linear-gradient(to top, ${d.ramp.join(", ")})`;
    const ticks = el("div", "ticks");
    ticks.append(el("span", "", d.zmax), el("span", "", d.zmin));
    bar.append(ramp, ticks, el("div", "bartitle", d.bar_title));
    body.append(scroll);
    if (d.bar !== false) body.append(bar);
  };
  draw();
  parentElement.appendChild(root);
}
"""

_picture = st.components.v2.component("headscope_picture", css=PICTURE_CSS, js=PICTURE_JS)


def picture(p: Picture, key: str, on_pick: Callable[[int, int], None] | None = None,
            outline: tuple[int, int, int, int] | None = None, zoom: bool = False,
            min_cell_px: int = 3, max_cell_px: int = 36, cell_ratio: float = 1.0, fit_height: bool = False) -> None:
    """Draw a charts.attention.Picture; a click on cell (row, col) calls on_pick(row, col) when given.
    `outline` = (row0, row1, col0, col1) cells framed in red; `zoom` adds -, + and fit buttons (the
    picture then scrolls: zoom and pan).  Cells are `cell_ratio` times as wide as high, between
    min_cell_px and max_cell_px high, as large as the column's width allows and, with `fit_height`,
    small enough for every row to show in the window without scrolling."""

    def picked() -> None:
        value = st.session_state[key].get("picked") if key in st.session_state else None
        if value and on_pick is not None:
            on_pick(int(value[0]), int(value[1]))

    data = {**{f.name: getattr(p, f.name) for f in fields(p)}, "zmin": f"{p.zmin:.3g}", "zmax": f"{p.zmax:.3g}",
            "clickable": on_pick is not None, "outline": list(outline) if outline else None, "zoom": zoom,
            "min_cell_px": min_cell_px, "max_cell_px": max_cell_px, "cell_ratio": cell_ratio, "fit_height": fit_height}
    _picture(data=data, key=key, on_picked_change=picked, height="content")


SHARE_CSS = """
.hs-share { display: flex; flex-direction: column; gap: 6px; font-size: 13px; }
.hs-share code { display: block; word-break: break-all; padding: 6px 8px; border-radius: 6px;
                 background: var(--st-secondary-background-color); font-family: "Source Code Pro", monospace; }
.hs-share button { align-self: flex-start; padding: 3px 10px; border-radius: 6px; cursor: pointer;
                   border: 1px solid rgba(128,128,128,0.5); background: transparent; color: var(--st-text-color); }
"""

SHARE_JS = """
export default function (component) {
  const { data, parentElement } = component;
  parentElement.querySelector(".hs-share")?.remove();
  const box = document.createElement("div");
  box.className = "hs-share";
  const link = document.createElement("code");
  link.className = "hs-link";
  link.textContent = data.link;
  const button = document.createElement("button");
  button.textContent = "Copy link";
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(data.link);
    } catch (e) {  // no clipboard API (plain http on another host): select the text for Ctrl+C
      const range = document.createRange();
      range.selectNodeContents(link);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = "Press Ctrl+C";
      return;
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy link"; }, 1500);
  });
  box.append(link, button);
  parentElement.appendChild(box);
}
"""

# in the page's own DOM (no shadow root), so a script or test can read the link from ".hs-link"
_share = st.components.v2.component("headscope_share_link", css=SHARE_CSS, js=SHARE_JS, isolate_styles=False)


def share_link(link: str) -> None:
    """The view's link (class "hs-link") and a button that copies it."""
    _share(data={"link": link}, key="share_link", height="content")


PAINT_JS = """
export default function (component) {
  const { setTriggerValue } = component;
  // two frames after this (the page's last element) mounts, the figures above it have been painted
  requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(() => setTriggerValue("painted", true), 30)));
}
"""

_paint = st.components.v2.component("headscope_painted", js=PAINT_JS)


_early = st.components.v2.component("headscope_early", js="export default function () {}")


def early() -> None:
    """An empty component drawn first thing: the browser fetches the components' code while the sidebar and
    the page are still being worked out, so the page's first picture draws as soon as it arrives."""
    _early(key="early", height=0)


def paint_signal(on_painted: Callable[[], None]) -> None:
    """An invisible element that reports, once the page's first figures are on screen, by calling
    `on_painted` in a rerun (pages/shared.plotly_chart defers Plotly charts until then)."""
    _paint(key="paint_signal", on_painted_change=on_painted, height=0)


def signed_head_map(values, title: str, value_name: str, key: str, selected: tuple[int, int] | None,
                    on_pick: Callable[[int, int], None] | None = None, max_cell_px: int = 16) -> None:
    """values  # [layer, head], signed (DLA, patching effects), as a picture that paints before Plotly's bundle
    has loaded (issue 23): a diverging scale centred on 0 (red pushes the metric up), the `selected` head
    (layer, head) framed (None: no head is selected), a click on a cell calls on_pick(layer, head).
    `max_cell_px`: taller cells for a model of few layers (shapes-dit's 4), so the map and its colour bar stay
    legible."""
    ratio = 3.0 if values.shape[1] <= 16 else 1.5  # a cell's width / its height: wide cells for few heads
    grid = metric_grid(values, title=title, value_name=value_name, signed=True, chosen=[selected] if selected else [],
                       aspect=ratio)
    outline = None if selected is None else (selected[0], selected[0] + 1, selected[1], selected[1] + 1)
    picture(grid, key=key, on_pick=on_pick, outline=outline, min_cell_px=10, max_cell_px=max_cell_px,
            cell_ratio=ratio)
