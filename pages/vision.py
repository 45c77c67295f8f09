"""Vision view: attention over the picture (CLS or a clicked patch), spatial head metrics, rollout.

Thin: the current capture from pages.shared, layer/head/query patch bound to the shared ViewState
(so a link reproduces them), analytics.vision for the numbers, charts.image for the figures.
"""
import streamlit as st

from analytics import vision
from charts import image as charts
from charts.theme import plot_config
from pages import shared

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


def pick_patch() -> None:
    clicked = charts.patch_from_selection(st.session_state["vit_overlay"].selection)
    if clicked is not None:
        shared.set_fields(patch=f"{clicked[0]},{clicked[1]}")


left, right = st.columns([1, 2])
with left:
    layer = shared.bind("layer", st.slider, "Layer", 0, meta.n_layers - 1)
    head = shared.bind("head", st.selectbox, "Head", list(range(-1, meta.n_heads)),
                       format_func=lambda h: "mean of heads" if h == -1 else f"head {h}")
    opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.6, 0.05, key="vit_opacity")
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
    fig = charts.attention_overlay(picture, shown, opacity=opacity, grid_lines=grid_lines, selected=patch,
                                   title=f"Layer {layer}, {head_label}: click a patch to use it as the query")
    st.plotly_chart(fig, key="vit_overlay", on_select=pick_patch, selection_mode="points", config=plot_config())

st.plotly_chart(charts.head_overlays(picture, maps, opacity=opacity, title=f"Every head of layer {layer}"),
                key="vit_heads", config=plot_config())

tab_distance, tab_profile, tab_rollout = st.tabs(["Attention distance", "Distance profile", "Rollout"])
with tab_distance:
    distances = shared.memo("vit_distances", capture.key, lambda: vision.distance_per_head(capture))
    st.plotly_chart(charts.layer_head_chart(distances, "Mean attention distance (px) per head", "px"),
                    key="vit_distance", config=plot_config())
with tab_profile:
    profile = shared.memo("vit_profiles", (capture.key, layer), lambda: vision.distance_profile(attn, layout))
    st.plotly_chart(charts.distance_profile_chart(profile.distance_px, profile.strength,
                                                  f"Attention strength vs distance, layer {layer}"),
                    key="vit_profile", config=plot_config())
with tab_rollout:
    rollout = shared.memo("vit_rollout", capture.key, lambda: vision.cls_rollout(capture)) \
        if "cls" in capture.spans else None
    if rollout is None:
        st.info("This model has no CLS token to roll attention out to.")
    else:
        st.plotly_chart(charts.attention_overlay(picture, vision.grid_map(rollout, layout), opacity=opacity,
                                                 grid_lines=grid_lines, title="Attention rollout to CLS",
                                                 label="rollout"),
                        key="vit_rollout", config=plot_config())
