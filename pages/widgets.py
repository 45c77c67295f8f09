"""Two small browser components (`st.components.v2`: inline HTML, CSS and JavaScript, no build step).

- `mosaic`: the model view.  Every head's thumbnail in one server-coloured PNG (charts.attention.Mosaic),
  drawn as an <img> with layer / head labels, a colour bar, a hover read-out and a click that opens
  the head (`on_pick(layer, head)`).
- `share_link`: the link of the current view with a "Copy link" button.

Why not Plotly and `st.code`: a browser opening a shared link must first load the JavaScript of every
kind of element on the page.  Plotly's bundle is 4.7 MB (~1.3 s to load and draw even on a bare page)
and `st.code`'s syntax highlighter 1.5 MB; these components are a few kB, so a link to the model view
paints as soon as the page does (bench/app.py).
"""
from __future__ import annotations

from typing import Callable

import streamlit as st

from charts.attention import Mosaic

MOSAIC_CSS = """
.hs-mosaic { font: 12px "Source Sans Pro", sans-serif; color: var(--st-text-color); }
.hs-mosaic .row { display: flex; align-items: flex-start; gap: 14px; }
.hs-mosaic .grid { display: grid; position: relative; }
.hs-mosaic .lab { display: flex; align-items: center; justify-content: center; opacity: 0.8; }
.hs-mosaic .ylab { justify-content: flex-end; padding-right: 4px; }
.hs-mosaic img { image-rendering: pixelated; cursor: pointer; display: block; }
.hs-mosaic .sel { position: absolute; border: 2px solid #ff4b4b; pointer-events: none; box-sizing: border-box; }
.hs-mosaic .tip { position: absolute; pointer-events: none; background: var(--st-secondary-background-color);
                  border: 1px solid rgba(128,128,128,0.5); border-radius: 4px; padding: 2px 6px; white-space: nowrap;
                  display: none; z-index: 2; }
.hs-mosaic .bar { display: flex; gap: 6px; align-items: stretch; }
.hs-mosaic .ramp { width: 12px; border-radius: 2px; }
.hs-mosaic .ticks { display: flex; flex-direction: column; justify-content: space-between; }
.hs-mosaic .bartitle { writing-mode: vertical-rl; transform: rotate(180deg); text-align: center; opacity: 0.8; }
"""

MOSAIC_JS = """
export default function (component) {
  const { data, setTriggerValue, parentElement } = component;
  const d = data;
  parentElement.querySelector(".hs-mosaic")?.remove();  // the last render's (the injected <style> stays)
  const root = document.createElement("div");
  root.className = "hs-mosaic";
  const row = document.createElement("div");
  row.className = "row";
  root.appendChild(row);
  const width = Math.max(200, (parentElement.clientWidth || 900) - 150);
  const size = Math.max(8, Math.min(d.max_cell_px, Math.floor(width / d.n_heads)));  // px per thumbnail
  const grid = document.createElement("div");
  grid.className = "grid";
  grid.style.gridTemplateColumns = `34px ${size * d.n_heads}px`;
  grid.style.gridTemplateRows = `18px ${size * d.n_layers}px`;
  grid.appendChild(document.createElement("div"));
  const top = document.createElement("div");
  top.style.display = "grid";
  top.style.gridTemplateColumns = `repeat(${d.n_heads}, ${size}px)`;
  for (let h = 0; h < d.n_heads; h++) {
    const t = document.createElement("div"); t.className = "lab"; t.textContent = "H" + h; top.appendChild(t);
  }
  grid.appendChild(top);
  const left = document.createElement("div");
  left.style.display = "grid";
  left.style.gridTemplateRows = `repeat(${d.n_layers}, ${size}px)`;
  const every = Math.max(1, Math.ceil(12 / size));
  for (let l = 0; l < d.n_layers; l++) {
    const t = document.createElement("div"); t.className = "lab ylab"; t.textContent = l % every ? "" : "L" + l;
    left.appendChild(t);
  }
  grid.appendChild(left);
  const holder = document.createElement("div");
  holder.style.position = "relative";
  const img = document.createElement("img");
  img.src = d.src;
  img.alt = d.title;
  img.style.width = `${size * d.n_heads}px`;
  img.style.height = `${size * d.n_layers}px`;
  holder.appendChild(img);
  if (d.selected) {
    const sel = document.createElement("div");
    sel.className = "sel";
    Object.assign(sel.style, { left: `${d.selected[1] * size - 1}px`, top: `${d.selected[0] * size - 1}px`,
                               width: `${size + 2}px`, height: `${size + 2}px` });
    holder.appendChild(sel);
  }
  const tip = document.createElement("div");
  tip.className = "tip";
  holder.appendChild(tip);
  const at = (e) => {
    const r = img.getBoundingClientRect();
    const head = Math.floor((e.clientX - r.left) / size), layer = Math.floor((e.clientY - r.top) / size);
    return (head >= 0 && head < d.n_heads && layer >= 0 && layer < d.n_layers) ? [layer, head] : null;
  };
  img.addEventListener("mousemove", (e) => {
    const p = at(e);
    if (!p) { tip.style.display = "none"; return; }
    tip.textContent = `layer ${p[0]}, head ${p[1]}`;
    tip.style.display = "block";
    tip.style.left = `${(p[1] + 1) * size + 4}px`;
    tip.style.top = `${p[0] * size}px`;
  });
  img.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  img.addEventListener("click", (e) => { const p = at(e); if (p) setTriggerValue("picked", p); });
  grid.appendChild(holder);
  row.appendChild(grid);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.style.height = `${Math.min(size * d.n_layers, 360)}px`;
  bar.style.marginTop = "18px";
  const ramp = document.createElement("div");
  ramp.className = "ramp";
  ramp.style.background = `linear-gradient(to top, ${d.ramp.join(", ")})`;
  const ticks = document.createElement("div");
  ticks.className = "ticks";
  const hi = document.createElement("span"), lo = document.createElement("span");
  hi.textContent = d.zmax; lo.textContent = d.zmin;
  ticks.append(hi, lo);
  const title = document.createElement("div");
  title.className = "bartitle";
  title.textContent = d.bar_title;
  bar.append(ramp, ticks, title);
  row.appendChild(bar);
  parentElement.appendChild(root);
}
"""

_mosaic = st.components.v2.component("headscope_mosaic", css=MOSAIC_CSS, js=MOSAIC_JS)


def mosaic(m: Mosaic, selected: tuple[int, int] | None, on_pick: Callable[[int, int], None],
           key: str = "model_grid", max_cell_px: int = 36) -> None:
    """Draw the model view's mosaic; a click on a thumbnail calls on_pick(layer, head)."""

    def picked() -> None:
        value = st.session_state[key].get("picked") if key in st.session_state else None
        if value:
            on_pick(int(value[0]), int(value[1]))

    _mosaic(data={"src": m.src, "n_layers": m.n_layers, "n_heads": m.n_heads, "ramp": list(m.ramp),
                     "zmin": f"{m.zmin:g}", "zmax": f"{m.zmax:g}", "bar_title": m.title,
                     "title": f"{m.n_layers} x {m.n_heads} attention thumbnails",
                     "selected": list(selected) if selected is not None else None, "max_cell_px": max_cell_px},
               key=key, on_picked_change=picked, height="content")


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
