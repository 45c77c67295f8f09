"""Vision view: attention over the picture (CLS or a clicked patch), spatial head metrics, rollout.

Thin: reads the current capture from `st.session_state["capture"]`, calls analytics.vision and
charts.image.  Widget keys start with "vit_".
"""
import streamlit as st

from analytics import vision
from charts import image as charts
from charts.theme import plot_config

st.title("Vision")
capture = st.session_state.get("capture")
if capture is None or capture.meta.modality != "vision" or capture.image() is None:
    st.info("Run a vision model (for example dinov2-s on the sample image 'cat') to see attention over the picture.")
    st.stop()

meta = capture.meta
layout = vision.Layout.of(capture)
picture = capture.image()
if capture.output.classes:
    st.caption("Top classes: " + ", ".join(f"{label} ({p:.1%})" for label, p in capture.output.classes))

left, right = st.columns([1, 2])
with left:
    layer = st.slider("Layer", 0, meta.n_layers - 1, meta.n_layers - 1, key="vit_layer")
    head_choice = st.selectbox("Head", ["mean of heads"] + [f"head {h}" for h in range(meta.n_heads)], key="vit_head")
    opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.6, 0.05, key="vit_opacity")
    grid_lines = st.checkbox("Patch grid", value=True, key="vit_grid")
    query_patch = st.session_state.get("vit_patch")  # (row, col) or None = CLS
    st.write("Query: " + ("CLS token" if query_patch is None else f"patch {tuple(query_patch)}"))
    if query_patch is not None and st.button("Back to CLS", key="vit_cls"):
        st.session_state["vit_patch"] = None
        st.rerun()

attn = capture.attention(layer)  # [head, query, key]
if query_patch is None and "cls" in capture.spans:
    maps = vision.cls_attention(attn, layout)
else:
    row, col = query_patch if query_patch is not None else (layout.grid[0] // 2, layout.grid[1] // 2)
    maps = vision.patch_attention(attn, layout, row, col)
shown = maps.mean(0) if head_choice == "mean of heads" else maps[int(head_choice.split()[1])]

with right:
    fig = charts.attention_overlay(picture, shown, opacity=opacity, grid_lines=grid_lines,
                                   selected=tuple(query_patch) if query_patch is not None else None,
                                   title=f"Layer {layer}, {head_choice}: click a patch to use it as the query")
    event = st.plotly_chart(fig, key="vit_overlay", on_select="rerun", selection_mode="points",
                            config=plot_config())
    clicked = charts.patch_from_selection(event.get("selection") if event else None)
    if clicked is not None and clicked != st.session_state.get("vit_patch"):
        st.session_state["vit_patch"] = clicked
        st.rerun()

st.plotly_chart(charts.head_overlays(picture, maps, opacity=opacity, title=f"Every head of layer {layer}"),
                key="vit_heads", config=plot_config())

tab_distance, tab_profile, tab_rollout = st.tabs(["Attention distance", "Distance profile", "Rollout"])
with tab_distance:
    distances = vision.distance_per_head(capture)
    st.plotly_chart(charts.layer_head_chart(distances, "Mean attention distance (px) per head", "px"),
                    key="vit_distance", config=plot_config())
with tab_profile:
    profile = vision.distance_profile(attn, layout)
    st.plotly_chart(charts.distance_profile_chart(profile.distance_px, profile.strength,
                                                  f"Attention strength vs distance, layer {layer}"),
                    key="vit_profile", config=plot_config())
with tab_rollout:
    rollout = vision.cls_rollout(capture) if "cls" in capture.spans else None
    if rollout is None:
        st.info("This model has no CLS token to roll attention out to.")
    else:
        st.plotly_chart(charts.attention_overlay(picture, vision.grid_map(rollout, layout), opacity=opacity,
                                                 grid_lines=grid_lines, title="Attention rollout to CLS",
                                                 label="rollout"),
                        key="vit_rollout", config=plot_config())
