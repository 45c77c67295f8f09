"""Vision view: attention over the picture (CLS or a clicked patch), spatial head metrics, rollout.

Thin: the current capture from pages.shared, layer/head/query patch bound to the shared ViewState
(so a link reproduces them), analytics.vision for the numbers, charts.image for the figures.
"""
import numpy as np
import streamlit as st

import probes
from analytics import vision
from charts import image as charts
from charts import registers
from charts.pictures import blend, mosaic, overlay
from charts.theme import plot_config
from pages import shared
from pages.widgets import picture as draw

TILE = 112  # pixels a side of each head's panel
ARTIFACT_RATIO = 2.0  # a patch token is an artifact when its norm exceeds this x the layer's median (analytics.vision)

state = shared.view_state()
st.title("Vision")
capture = shared.current_capture()
shared.show_link_warnings()
shared.status_line(capture)
if capture is None or capture.meta.modality != "vision" or capture.image() is None:
    st.info("Pick a vision model in the sidebar (for example DINOv2-small on the sample image 'cat') to see "
            "attention over the picture.")
    shared.stop()

meta = capture.meta
layout = vision.Layout.of(capture)
picture = capture.image()
if state.layer == -1:  # the page switched to a vision model: the last layer, where CLS attention is sharpest
    shared.set_fields(layer=meta.n_layers - 1)
for warning in state.clamp(meta.n_layers, meta.n_heads, capture.n_tokens, mean_head=True):
    st.warning(warning)
if capture.output.classes:
    st.caption("Top classes: " + ", ".join(f"{label} ({p:.1%})" for label, p in capture.output.classes))


def query_patch() -> tuple[int, int] | None:
    """The query patch of the link ("row,col"), None for the CLS token or one outside this grid."""
    if not state.patch:
        return None
    row, col = (int(v) for v in state.patch.split(","))
    return (row, col) if row < layout.grid[0] and col < layout.grid[1] else None


def pick_patch(row: int, col: int) -> None:
    shared.set_fields(patch=f"{row},{col}")


def pick_head(_row: int, col: int) -> None:
    shared.set_fields(head=-1 if col == meta.n_heads else col)


left, right = st.columns([1, 2])
with left:
    layer = shared.bind("layer", st.slider, "Layer", 0, meta.n_layers - 1)
    head = shared.bind("head", st.selectbox, "Head", list(range(-1, meta.n_heads)),
                       format_func=lambda h: "mean of heads" if h == -1 else f"head {h}")
    opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.7, 0.05, key="vit_opacity",
                        help="At most this opaque where attention peaks; low attention lets the picture through.")
    grid_lines = st.checkbox("Patch grid", value=True, key="vit_grid")
    patch = query_patch()
    st.write("Query: " + ("CLS token" if patch is None else f"patch {patch}"))
    if patch is not None:
        st.button("Back to CLS", key="vit_cls", on_click=shared.set_fields, kwargs={"patch": ""})

attn = capture.attention(layer)  # [head, query, key]
if patch is None and "cls" in capture.spans:
    maps = vision.cls_attention(attn, layout)
else:
    row, col = patch if patch is not None else (layout.grid[0] // 2, layout.grid[1] // 2)
    maps = vision.patch_attention(attn, layout, row, col)
shown = maps.mean(0) if head == -1 else maps[head]
head_label = "mean of heads" if head == -1 else f"head {head}"

with right:
    query = "CLS" if patch is None else f"patch {patch}"
    drawn = overlay(picture, shown, opacity=opacity, grid_lines=grid_lines, label=f"attention from {query}",
                    title=f"Layer {layer}, {head_label}: where {query} looks (click a patch to ask from it)")
    draw(drawn, key="vit_overlay", on_pick=pick_patch, min_cell_px=8, max_cell_px=34,
         outline=(patch[0], patch[0] + 1, patch[1], patch[1] + 1) if patch is not None else None)

panels = np.concatenate([maps, maps.mean(0, keepdims=True)])  # [head + 1, rows, cols]
tiles = np.stack([blend(picture, m / max(float(m.max()), 1e-12), opacity, zmax=1.0, size=(TILE, TILE))
                  for m in panels])[None]  # [1, head + 1, TILE, TILE, 3]
draw(mosaic(tiles, [f"L{layer}"], [f"head {h}" for h in range(meta.n_heads)] + ["mean"],
            title=f"Every head of layer {layer} (click one to show it above)",
            label="attention / panel max", values=panels.max(axis=(1, 2))[None]),
     key="vit_heads", on_pick=pick_head, min_cell_px=40, max_cell_px=140)

def artifacts():
    """Per layer: the largest patch norm / the median, the CLS attention the artifact tokens take in total,
    and what an ordinary patch gets (Darcet et al. 2024); artifacts = patches whose norm entering that block
    exceeds ARTIFACT_RATIO x the median."""
    norms = probes.vit_token_norms(capture)  # [layer + 1, token]: one forward pass, kept with the capture
    found = vision.high_norm_tokens(norms, layout, ratio=ARTIFACT_RATIO)
    patch = norms[:, layout.patches]
    ratio = patch.max(1) / np.median(patch, 1)
    taken, ordinary = np.full(meta.n_layers, np.nan), np.zeros(meta.n_layers)
    for l in range(meta.n_layers):
        cls_row = capture.attention(l)[:, 0, :].astype(np.float64).mean(0)  # [token]: CLS's attention, heads averaged
        marked = [t.token for t in found[l]]
        rest = [t for t in range(layout.patches.start, layout.patches.stop) if t not in marked]
        taken[l] = cls_row[marked].sum() if marked else np.nan
        ordinary[l] = cls_row[rest].mean()
    return ratio, taken, ordinary, found


tab_distance, tab_profile, tab_rollout, tab_registers = st.tabs(["Attention distance", "Distance profile", "Rollout",
                                                                 "High-norm tokens (registers)"])
with tab_distance:
    distances = shared.memo("vit_distances", capture.key, lambda: vision.distance_per_head(capture))
    shared.plotly_chart(charts.layer_head_chart(distances, "Mean attention distance (px) per head", "px"),
                        key="vit_distance", config=plot_config())
with tab_profile:
    profile = shared.memo("vit_profiles", (capture.key, layer), lambda: vision.distance_profile(attn, layout))
    shared.plotly_chart(charts.distance_profile_chart(profile.distance_px, profile.strength,
                                                      f"Attention strength vs distance, layer {layer}"),
                        key="vit_profile", config=plot_config())
with tab_rollout:
    rollout = shared.memo("vit_rollout", capture.key, lambda: vision.cls_rollout(capture)) \
        if "cls" in capture.spans else None
    if rollout is None:
        st.info("This model has no CLS token to roll attention out to.")
    else:
        shared.plotly_chart(charts.attention_overlay(picture, vision.grid_map(rollout, layout), opacity=opacity,
                                                     grid_lines=grid_lines, title="Attention rollout to CLS",
                                                     label="rollout"),
                            key="vit_rollout", config=plot_config())
with tab_registers:
    if "cls" not in capture.spans:
        st.info("This model has no CLS token: the artifact tokens' share of CLS attention needs one.")
    else:
        found_norms = shared.run_with_progress("Token norms: one forward pass", lambda progress: shared.memo(
            "vit_artifacts", capture.key, artifacts))
        if found_norms is not None:
            ratio, taken, ordinary, found = found_norms
            left_chart, right_chart = st.columns(2)
            with left_chart:
                shared.plotly_chart(registers.norm_ratio_chart(
                    ratio, ARTIFACT_RATIO, title="Patch-token norms: the largest against the median"),
                    key="vit_norms", config=plot_config())
            with right_chart:
                shared.plotly_chart(registers.attention_share_chart(
                    taken, ordinary, title="What CLS reads: the artifact tokens in total, and an average patch"),
                    key="vit_artifact_share", config=plot_config())
            last = [t for t in found[-2]] if len(found) > 1 else []
            where = ", ".join(f"patch ({(t.token - layout.n_prefix) // layout.grid[1]}, "
                              f"{(t.token - layout.n_prefix) % layout.grid[1]}) at {t.ratio:.1f}×" for t in last[:4])
            st.caption("Darcet et al. 2024: large ViTs (DINOv2 ViT-L and ViT-g among them) recycle a few "
                       "low-information patch tokens as global scratch space; their norms stand out and CLS attends to "
                       "them, which is what registers (extra tokens) absorb. Here, entering the last block: "
                       f"{len(last)} artifact token(s) with a norm over {ARTIFACT_RATIO:g}× the median"
                       + (f" ({where})" if last else "") + ".")
