"""Gaze view (vision-language models): a picture, a question and the model's answer; where the model's
gaze moves while it reads the question (GIFT filmstrip and saliency), its visual sinks (VAR), its
image-centric heads, and before | after answers under VAR / GIFT / head masking.

Thin: the current capture from pages.shared (picture and question in the sidebar), analytics.vlm for
the numbers, charts.gaze / charts.image for the figures, capture.vlm.presets for the interventions.
Widget keys start with "gaze_".
"""
import numpy as np
import streamlit as st

import probes
from analytics import vlm
from analytics.vlm_picture import PictureLayout
from capture import ProbeMissing, scenes
from charts import gaze as charts
from charts import registers as charts_sinks
from charts.image import head_overlays, layer_head_chart
from charts.pictures import overlay
from charts.theme import plot_config
from pages import shared
from pages.dla_panel import dla_panel
from pages.widgets import picture as draw

st.title("Gaze")
CHART_HEIGHT = 520  # the layer x head charts: 30 readable layer rows
state = shared.view_state()
capture = shared.current_capture()
shared.show_link_warnings()
shared.status_line(capture)
if capture is None or capture.meta.modality != "vlm" or capture.image() is None:
    st.info("Pick a vision-language model in the sidebar (shapes-vlm is embedded), a picture and a question.")
    shared.stop()
if "question" not in capture.spans or not len(capture.spans["question"]):
    st.warning("This capture has no question tokens to follow.")
    shared.stop()

meta = capture.meta
picture = capture.image()
layout = PictureLayout.of(capture)  # the image tokens' boxes on the picture
scene = scenes.make_scene(int(capture.spec.image[6:]), scenes.VLM) if capture.spec.image.startswith("scene-") else None
asked = next((qa for qa in scenes.questions(scene) if qa.question == capture.spec.prompt.strip()), None) \
    if scene is not None else None
if not -1 <= state.layer < meta.n_layers:
    shared.set_fields(layer=-1)
if not -1 <= state.head < meta.n_heads:
    shared.set_fields(head=-1)

# ---- picture, question, answer -------------------------------------------------------------------
sinks = shared.memo("gaze_sinks", capture.key, lambda: vlm.capture_sinks(capture))
col_text, col_ctl = st.columns([3, 2])
with col_text:
    st.markdown("**Question**")
    st.text(capture.spec.prompt)
    st.markdown("**Answer**")
    said = capture.output.text or "(nothing generated)"
    st.text(said + ("" if asked is None else f"   (expected: {asked.answer}; "
                    + ("right" if said.strip().lower() == asked.answer else "wrong") + ")"))
    if scene is not None:
        st.caption(f"Scene {scene.seed}: {scene.caption}.")
with col_ctl:
    layer = shared.bind("layer", st.selectbox, "Layers", list(range(-1, meta.n_layers)),
                        format_func=lambda l: f"mean of layers {vlm.layer_set(meta.n_layers)[0]}–{meta.n_layers - 1}"
                        if l == -1 else f"layer {l}",
                        help="GIFT averages the image attention over a set of layers (unverified in the paper); "
                             "the default here is VAR's layers 2..L-1.")
    head = shared.bind("head", st.selectbox, "Heads", list(range(-1, meta.n_heads)),
                       format_func=lambda h: "mean of heads" if h == -1 else f"head {h}")
    opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.7, 0.05, key="gaze_opacity",
                        help="At most this opaque where the map peaks; where it is low the picture shows through.")

found = shared.memo("gaze_gaze", (capture.key, layer, head), lambda: vlm.gaze(
    capture, layers=None if layer == -1 else [layer], heads=None if head == -1 else [head]))
boxes = [scene.objects[i].box for i in asked.objects] if asked is not None and scene is not None else []
sink_note = (f"{len(sinks.visual)} visual sink(s) outlined in dashed red (φ > {sinks.tau:g} on dims "
             f"{', '.join(map(str, sinks.dims))})" if sinks.dims else "no massive dimensions found (φ ≤ 20)")
left, right = st.columns(2)
with left:
    draw(overlay(picture, found.saliency, opacity, title="Gaze saliency S (GIFT): where the gaze moved",
                 label="saliency", sinks=sinks.patches, boxes=boxes), key="gaze_saliency", min_cell_px=4,
         max_cell_px=40)
with right:
    last = capture.spans["prompt"].stop - 1  # the row that predicts the first answer token
    answer_map = np.mean([layout.paint(layout.image_keys(capture.rows(l, last, last + 1)[found.heads, 0])).mean(0)
                          for l in found.layers], axis=0)  # [rows, cols]
    draw(overlay(picture, answer_map, opacity, title="Attention on the image when the answer starts",
                 label="attention", sinks=sinks.patches, boxes=boxes), key="gaze_answer_map", min_cell_px=4,
         max_cell_px=40)
st.caption(f"{sink_note}; " + ("the asked object's box in dotted white. " if boxes else "")
           + "Saliency: the sum over the question tokens of the positive change of image attention, "
             "g_t = max(0, a_t − a_{t−1}), normalised to a maximum of 1 (Qi et al. 2025, METHODS §2.3).")

st.subheader("Filmstrip")
strip = found.filmstrip()  # [word, rows, cols]: the gaze shift while reading each question word
words = [w for w, _ in found.words]
shared.plotly_chart(lambda: charts.filmstrip(picture, strip, words, opacity=opacity), key="gaze_filmstrip",
                    config=plot_config())
shared.plotly_chart(charts.token_bars(words, strip.sum(axis=(1, 2)) if len(strip) else np.zeros(0),
                                      "How far the gaze moves at each word (the sum of its shift map)", "gaze shift",
                                      height=240), key="gaze_shift_words", config=plot_config())

# a link that names an intervention opens on its before | after (decided once, on the page's first run)
st.session_state.setdefault("gaze_open_tab", "Intervene" if state.intervention != "none" else None)
tab_heads, tab_sinks, tab_vhd, tab_dla, tab_tower, tab_intervene = st.tabs(
    ["Image-centric heads", "Visual sinks", "VHD", "Which heads wrote it", "Vision tower", "Intervene"],
    default=st.session_state["gaze_open_tab"])
with tab_heads:
    hv = shared.memo("gaze_heads", capture.key, lambda: vlm.head_vision(capture, sinks.visual))
    shifts = shared.memo("gaze_shift_heads", capture.key, lambda: vlm.gaze_per_head(capture))
    c1, c2 = st.columns(2)
    with c1:
        shared.plotly_chart(layer_head_chart(hv.centric, "Share of answer rows that are image-centric (VAR)", "share",
                                             height=CHART_HEIGHT),
                            key="gaze_centric", config=plot_config())
    with c2:
        shared.plotly_chart(charts.centric_per_layer(hv.per_layer(), hv.mass.mean(-1), meta.n_heads,
                                                     "Image-centric heads per layer", height=CHART_HEIGHT),
                            key="gaze_per_layer", config=plot_config())
    order = np.lexsort((-hv.mass.ravel(), -hv.centric.ravel()))[:20]  # by share, then visual mass
    top = [divmod(int(i), meta.n_heads) for i in order]
    st.dataframe({"layer": [l for l, _ in top], "head": [h for _, h in top],
                  "image-centric share": [round(float(hv.centric[l, h]), 3) for l, h in top],
                  "visual mass": [round(float(hv.mass[l, h]), 3) for l, h in top],
                  "gaze shift": [round(float(shifts[l, h]), 3) for l, h in top]}, hide_index=True, key="gaze_table")
    st.caption(f"A row is image-centric when its attention on the image is ≥ {vlm.VAR_SUMM:g} and at most "
               f"{vlm.VAR_RHO:.0%} of that is on visual sinks (Kang et al. 2025, METHODS §2.2); rows: the last "
               f"prompt token and the answer tokens. Heads with share ≥ {vlm.CENTRIC_SHARE:g}: "
               f"{int(hv.centric_heads().sum())} of {hv.centric.size}.")
with tab_sinks:
    phi = sinks.phi
    st.write(f"Massive dimensions: {', '.join(map(str, sinks.dims)) or 'none'}. Sink tokens (φ > {sinks.tau:g}): "
             + (", ".join(f"{j}:{capture.tokens[j]} (φ {phi[j]:.0f})" for j in sinks.tokens) or "none") + ".")
    grid_phi = layout.peak(phi[layout.keys])
    phi_col, share_col = st.columns(2)
    with phi_col:
        shared.plotly_chart(charts.saliency_overlay(picture, grid_phi, sinks.patches, label="φ", opacity=opacity,
                                                    title="Peak φ of each image token on the massive dimensions"),
                            key="gaze_phi", config=plot_config())

    def sink_share():
        """Per layer, from the rows that answer (the last prompt token on): the attention the visual sinks take
        in total, and what an ordinary image token gets (heads and rows averaged; VAR, Kang et al. 2025)."""
        image = np.asarray(layout.positions)
        sink_set = [t for t in sinks.visual]
        ordinary = [t for t in image if t not in set(sink_set)]
        start = capture.spans["prompt"].stop - 1
        taken, each = np.full(meta.n_layers, np.nan), np.zeros(meta.n_layers)
        for l in range(meta.n_layers):
            reads = capture.rows(l, start, capture.n_tokens).mean(axis=(0, 1))  # [key]
            taken[l] = reads[sink_set].sum() if sink_set else np.nan
            each[l] = reads[ordinary].mean() if ordinary else np.nan
        return taken, each

    taken, each = shared.memo("gaze_sink_share", capture.key, sink_share)
    with share_col:
        shared.plotly_chart(charts_sinks.attention_share_chart(
            taken, each, title="What the answer reads: the visual sinks in total, and an ordinary image token",
            outlier_name="visual sinks", ordinary_name="an ordinary image token", label="attention from the answer"),
            key="gaze_sink_share", config=plot_config())
with tab_vhd:
    try:
        divergence = vlm.stored_vhd(capture)  # [layer, head, answer token]
    except ProbeMissing:
        divergence = None
        st.caption("Vision-aware head divergence (He et al. 2025, METHODS §3.1): how far each head's output on the "
                   "answer moves when the picture is removed. Two extra forward passes.")
        if len(capture.spans.get("answer", range(0))) and st.button("Compute VHD", key="gaze_vhd"):
            divergence = shared.run_with_progress("VHD: two passes, with and without the picture",
                                                  lambda progress: probes.vhd(capture))
    if divergence is not None:
        answer_tokens = [capture.tokens[i] for i in capture.spans["answer"]]
        c1, c2 = st.columns(2)
        with c1:
            shared.plotly_chart(layer_head_chart(divergence.mean(-1), "VHD per head (L2, mean over the answer)", "VHD",
                                                 height=CHART_HEIGHT),
                                key="gaze_vhd_heads", config=plot_config())
        with c2:
            shared.plotly_chart(charts.token_bars(answer_tokens, vlm.t_vhd(divergence),
                                                  f"T-VHD per answer token (top-{vlm.T_VHD_K} heads)", "T-VHD"),
                                key="gaze_vhd_tokens", config=plot_config())
with tab_dla:  # direct logit attribution where the answer's first token is predicted (the last token if none)
    dla_panel(capture, -1, "gaze_dla",
              (layer, head) if layer >= 0 and head >= 0 else None,  # nothing framed for a mean
              lambda row, col: shared.set_fields(layer=row, head=col))
with tab_tower:

    try:
        tower = vlm.stored_vision_maps(capture)  # [layer, head, token, token]
    except ProbeMissing as exc:
        st.info(str(exc))
    else:
        tower_layer = st.slider("Vision-tower layer", 0, tower.shape[0] - 1, tower.shape[0] - 1, key="gaze_tower_layer")
        tower_grid = vlm.tower_grid(capture)
        cls_maps = vlm.vision_cls_maps(tower[tower_layer], tower_grid)  # [head, rows, cols]
        titles = [f"head {h}" for h in range(len(cls_maps))] + ["mean of heads"]
        shared.plotly_chart(head_overlays(picture, np.concatenate([cls_maps, cls_maps.mean(0, keepdims=True)]),
                                          opacity=opacity, titles=titles, per_row=4,
                                          title=f"Vision tower layer {tower_layer}: " + (
                                              "the CLS token's attention over the patches"
                                              if tower.shape[-1] > tower_grid[0] * tower_grid[1]
                                              else "the mean attention each patch receives (no CLS token)")),
                            key="gaze_tower", config=plot_config())
        st.caption("The vision tower's own self-attention (before the projector), from its eager "
                   "`output_attentions`; interventions act on the language model only, so these maps do not change "
                   "with them.")
with tab_intervene:
    from pages import gaze_intervene

    gaze_intervene.render(capture, found, hv, sinks)
