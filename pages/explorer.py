"""Attention explorer: model view (every head at a glance), head view (one map), token view (one row)."""
import base64

import numpy as np
import streamlit as st

from capture import HEAD_OVERVIEW_BINS
from charts import attention as charts
from pages import shared
from pages.dla_panel import dla_panel
from pages.widgets import picture

FULL_MAP_MAX = 160  # longer inputs get a pooled overview plus a full-resolution detail window
WINDOW = 96  # detail window size, tokens

state = shared.view_state()
st.title("Attention explorer")
capture = shared.current_capture()
shared.show_link_warnings()
shared.status_line(capture)
if capture is None:
    shared.stop()
meta = capture.meta
n = capture.n_tokens
for warning in state.clamp(meta.n_layers, meta.n_heads, n):
    st.warning(warning)
state.q0 = min(max(state.q0, 0), max(n - WINDOW, 0))
state.k0 = min(max(state.k0, 0), max(n - WINDOW, 0))


def open_head(layer: int, head: int) -> None:
    shared.set_fields(layer=layer, head=head, view="head")


def centre_window_on(row: int, col: int, size: int) -> None:
    """A click on block (row, col) of an overview of `size`-token blocks: centre the detail window there."""
    q, k = int((row + 0.5) * size), int((col + 0.5) * size)
    shared.set_fields(q0=min(max(q - WINDOW // 2, 0), max(n - WINDOW, 0)),
                      k0=min(max(k - WINDOW // 2, 0), max(n - WINDOW, 0)))


cols = st.columns([2.6, 1, 1, 2.4])
with cols[0]:
    shared.bind("view", st.segmented_control, "View", ["model", "head", "token"], required=True,
                format_func={"model": "Model view", "head": "Head view", "token": "Token view"}.get)
with cols[1]:
    layer = shared.bind("layer", st.number_input, "Layer", 0, meta.n_layers - 1, step=1,
                        help="Type a layer, or step with the ↑ / ↓ keys in the box; in the model view, click a "
                             "head.")
with cols[2]:
    head = shared.bind("head", st.number_input, "Head", 0, meta.n_heads - 1, step=1,
                       help=f"Query head; with GQA, heads {meta.group_size} at a time share a KV head. The token "
                            "view outlines this head's line.")
with cols[3]:
    scale = shared.bind("scale", st.segmented_control, "Colour", ["raw", "log", "row"], required=True,
                        format_func={"raw": "weight", "log": "log", "row": "row-norm"}.get,
                        help="weight: raw attention; log: log10 (shows small weights); row-norm: each row / its max "
                             "(in the token view: each line / its max).")


def downloads(drawn, name: str, csv) -> None:
    """The figure as PNG (the picture) and SVG (picture, labels, colour bar), its numbers as CSV; each
    built only when clicked, without a rerun (a rerun would retire the file before the browser fetches it)."""
    png, svg, numbers = st.columns([1, 1, 5])
    png.download_button("Picture (PNG)", lambda: base64.b64decode(drawn.src.split(",", 1)[1]),
                        file_name=f"{capture.key}_{name}.png", mime="image/png", on_click="ignore")
    svg.download_button("Picture (SVG)", lambda: charts.picture_svg(drawn), file_name=f"{capture.key}_{name}.svg",
                        mime="image/svg+xml", on_click="ignore")
    numbers.download_button("Numbers (CSV)", csv, file_name=f"{capture.key}_{name}.csv", mime="text/csv",
                            on_click="ignore")


n_prompt = len(capture.spans.get("prompt", range(n)))
generated = n_prompt < n and meta.modality == "text"  # the rows after n_prompt are generated tokens

if state.view == "model":
    thumbs = np.asarray(capture.overview(), dtype=np.float32)  # [layer, head, bins, bins]
    grid_col, side_col = st.columns([1.1, 1], gap="medium")
    with grid_col:
        st.caption(f"Every head of every layer, each map max-pooled to {thumbs.shape[-1]}×{thumbs.shape[-1]} blocks. "
                   "Click a head to open it.")
        mosaic = shared.memo("model_mosaic", (capture.key, scale), lambda: charts.model_mosaic(thumbs, scale))
        picture(mosaic, key="model_grid", on_pick=open_head, outline=(layer, layer + 1, head, head + 1),
                min_cell_px=14, max_cell_px=48, fit_height=True, zoom=True)
    with side_col:  # the outlined head, larger: its pooled map and what the last token reads
        last = n - 1
        st.markdown(f"**Layer {layer}, head {head}** (outlined in the grid)")
        thumb = charts.scaled(thumbs[layer, head], scale)  # [bins, bins]
        st.image(charts.thumbnail_png(thumb, scale, side=300), width=300,
                 caption=f"its map, max-pooled to {thumbs.shape[-1]}×{thumbs.shape[-1]} blocks (query ↓, key →)")
        row = np.asarray(capture.row(layer, last), dtype=np.float32)[head]  # [key]
        top = np.argsort(-row)[:5]
        st.markdown(f"What the last token, {capture.tokens[last]!r}, reads:")
        st.html(charts.token_highlight_html(capture.tokens, row, last, "", scale=scale))
        st.caption("Most weight on: " + ", ".join(f"{int(j)} {capture.tokens[j]!r} ({row[j]:.2f})" for j in top)
                   + ". The head view shows the whole map with its tokens.")

    def model_view_csv() -> str:  # built on click only: 276,480 rows for 30 x 9 heads of 32 x 32 blocks
        L, H, b, _ = thumbs.shape
        grid = np.stack(np.meshgrid(np.arange(L), np.arange(H), np.arange(b), np.arange(b), indexing="ij"), -1)
        rows = np.concatenate([grid.reshape(-1, 4), thumbs.reshape(-1, 1)], axis=1)
        return "layer,head,query_block,key_block,max_weight\n" + "\n".join(
            f"{int(r[0])},{int(r[1])},{int(r[2])},{int(r[3])},{r[4]:.5g}" for r in rows)

    downloads(mosaic, "model_view", model_view_csv)

elif state.view == "head":
    title = f"Layer {layer}, head {head} (KV head {meta.kv_head(head)})"
    causal = meta.causal
    if n <= FULL_MAP_MAX:
        shown, q0, k0 = capture.head(layer, head), 0, 0  # [query, key]
        drawn = charts.head_picture(shown, capture.tokens, capture.tokens, scale, title=title, mask_future=causal)
        picture(drawn, key="head_map", zoom=True, outline=(n_prompt, n, 0, n) if generated else None)
        if generated:
            st.caption(f"Red frame: the rows of the {n - n_prompt} generated tokens (from token {n_prompt}); the rows "
                       "above are the prompt.")
    else:
        left, right = st.columns([1, 1.25])
        with left:
            q0 = shared.bind("q0", st.slider, "Detail window: first query", 0, n - WINDOW)
            k0 = shared.bind("k0", st.slider, "Detail window: first key", 0, n - WINDOW)
            # stored thumbnails where the capture has them (long captures); never the whole map
            pooled = capture.head_overview(layer, head, HEAD_OVERVIEW_BINS)  # [bins, bins]
            size = -(-n // pooled.shape[0])  # tokens per block (core.types.max_pool)
            picture(charts.overview_picture(pooled, n, scale, title=f"{title}: overview (click to move the window)"),
                    key="head_overview", on_pick=lambda row, col: centre_window_on(row, col, size), zoom=True,
                    min_cell_px=1, outline=(q0 // size, -(-(q0 + WINDOW) // size), k0 // size, -(-(k0 + WINDOW) // size)))
        with right:
            shown = capture.window(layer, head, q0, q0 + WINDOW, k0, k0 + WINDOW)  # [WINDOW, WINDOW]
            drawn = charts.head_picture(shown, capture.tokens[q0 : q0 + WINDOW], capture.tokens[k0 : k0 + WINDOW],
                                        scale, title=f"Detail: queries {q0}–{q0 + WINDOW - 1}, keys {k0}–{k0 + WINDOW - 1}",
                                        q_start=q0, k_start=k0, mask_future=causal)
            picture(drawn, key="head_detail", zoom=True)

    def head_csv() -> str:  # built on click only
        header = ",".join(["query"] + [f'"{k0 + j}:{t}"'.replace("\n", " ") for j, t in
                                       enumerate(capture.tokens[k0 : k0 + shown.shape[1]])])
        body = "\n".join(",".join([f'"{q0 + i}:{capture.tokens[q0 + i]}"'] + [f"{v:.5g}" for v in row])
                         for i, row in enumerate(np.asarray(shown, dtype=np.float32)))
        return header + "\n" + body

    downloads(drawn, f"L{layer}_H{head}", head_csv)

else:  # token view
    query = shared.bind("token", st.select_slider, "Query token", options=list(range(-1, n)),
                        format_func=lambda i: "last token" if i == -1 else f"{i} {capture.tokens[i]}")
    q = n - 1 if query == -1 else query
    rows = np.asarray(capture.row(layer, q), dtype=np.float32)  # [head, key]
    how = {"raw": "the weight itself", "log": "log10 of the weight", "row": "each line scaled to its own maximum"}
    st.caption(f"What token {q} ({capture.tokens[q]!r}) attends to in layer {layer}: stronger red = more weight "
               f"({how[scale]}; hover a token for the exact weight). Head {head} is outlined"
               + (f"; generated tokens start after the | at token {n_prompt}." if generated else "."))
    split = n_prompt if generated else None
    st.html(charts.token_highlight_html(capture.tokens, rows.mean(0), q, "mean of heads", scale=scale, split=split))
    for h in range(meta.n_heads):
        st.html(charts.token_highlight_html(capture.tokens, rows[h], q, f"head {h}", scale=scale, split=split,
                                            selected=h == head))
    st.download_button("Numbers (CSV)", lambda: "head,key,token,weight\n" + "\n".join(
        f'{h},{j},"{capture.tokens[j]}",{rows[h, j]:.5g}' for h in range(meta.n_heads) for j in range(q + 1)),
        file_name=f"{capture.key}_L{layer}_q{q}.csv", mime="text/csv", on_click="ignore")
    st.subheader("Which heads wrote the next token (direct logit attribution)")
    dla_panel(capture, q, "ex_dla", (layer, head), lambda row, col: shared.set_fields(layer=row, head=col))

with st.expander("Text, output and top-k log-probabilities"):
    shared.show_text(capture)
    if capture.output.steps:
        st.dataframe(
            [{"step": i, "token": s.token, "logprob": round(s.logprob, 3),
              "top-5": "  ".join(f"{t!r} {p:.2f}" for t, p in s.top)} for i, s in enumerate(capture.output.steps)],
            hide_index=True,
        )
st.download_button("Download the whole capture (.npz + .json)", lambda: shared.capture_zip(capture),
                   file_name=f"headscope_{capture.key}.zip", mime="application/zip",
                   on_click="ignore")  # no rerun: it would retire the file before the browser fetches it
