"""The Gaze page's Intervene tab: VAR / GIFT / image masking built from this capture's analytics
(capture.vlm.presets), the answer before | after, and a batch over held-out scenes (probes.vlm_accuracy).
Widget keys start with "gaze_iv_"."""
import dataclasses

import numpy as np
import streamlit as st

import probes
from capture import InterventionError, ProbeMissing, recall, remember, vlm_presets
from charts import gaze as charts
from charts.theme import plot_config
from pages import shared


def _restore_from_link(labels: list[str]) -> None:
    """First render: the method and settings of the link's intervention, if it names one of ours."""
    if "gaze_iv_method" in st.session_state:
        return
    state = shared.view_state()
    linked = recall(state.intervention)
    found = vlm_presets.settings_of(linked) if linked is not None else None
    method, settings = found if found else ("none", {})
    st.session_state["gaze_iv_method"] = method
    if method == "var":
        st.session_state["gaze_iv_p"] = float(settings["p"])
    elif method == "gift":
        st.session_state.update(gaze_iv_gamma=float(settings["gamma"]), gaze_iv_gamma_q=float(settings["gamma_q"]),
                                gaze_iv_top_k=int(settings["top_k"]))
    elif method == "vhr":
        st.session_state["gaze_iv_alpha"] = float(settings["alpha"])
    elif method == "mask":
        st.session_state["gaze_iv_heads"] = [f"L{l}H{h}" for l, h in settings["heads"] if f"L{l}H{h}" in labels]


def render(capture, found, hv, sinks) -> None:
    meta = capture.meta
    labels = [f"L{l}H{h}" for l in range(meta.n_layers) for h in range(meta.n_heads)]
    _restore_from_link(labels)
    centric = vlm_presets.centric_heads(hv.centric)
    # each widget gets its value right before it is drawn (shared.held): a default set for another method's
    # slider would reach the server but not the browser
    shared.held("gaze_iv_method", "none")
    method = st.segmented_control("Intervention", ["none", *vlm_presets.METHODS], key="gaze_iv_method",
                                  format_func={"none": "None", **vlm_presets.METHODS}.get) or "none"
    params: dict = {}
    heads = None
    if method == "var":
        shared.held("gaze_iv_p", vlm_presets.VAR_P)
        params["p"] = st.slider("p: sinks keep this share of their attention", 0.0, 1.0, step=0.05, key="gaze_iv_p",
                                help="VAR's default is 0.6; the freed attention goes to the image tokens.")
        st.caption(f"On the {len(centric)} image-centric heads (share ≥ 0.5, last layer left out), the rows "
                   f"after the picture (from token {capture.spans['image'].stop}); sinks: "
                   + (", ".join(f"{j}:{capture.tokens[j]}" for j in sinks.tokens) if sinks.tokens
                      else "none with φ > 20, so ACT's detected sinks") + " (Kang et al. 2025, METHODS §2.2).")
    elif method == "gift":
        c1, c2, c3 = st.columns(3)
        shared.held("gaze_iv_gamma", vlm_presets.GIFT_GAMMA)
        shared.held("gaze_iv_gamma_q", vlm_presets.GIFT_GAMMA_Q)
        shared.held("gaze_iv_top_k", vlm_presets.GIFT_TOP_K)
        params["gamma"] = c1.slider("γ: image amplification", 0.0, 4.0, step=0.25, key="gaze_iv_gamma")
        params["gamma_q"] = c2.slider("γ_q: question amplification", 0.0, 2.0, step=0.25, key="gaze_iv_gamma_q")
        params["top_k"] = c3.slider("Most salient patches", 1, 64, step=1, key="gaze_iv_top_k")
        st.caption("At every decoding step, attention to image token j × (1 + γ S_j) and to the question × (1 + γ_q), "
                   "renormalised, on the image-centric heads (Qi et al. 2025, METHODS §2.3; coefficients unverified).")
    elif method == "vhr":
        shared.held("gaze_iv_alpha", vlm_presets.VHR_ALPHA)
        params["alpha"] = st.slider("α: output scale of the vision-aware heads", 0.0, 3.0, step=0.1, key="gaze_iv_alpha")
        st.caption("Per layer, the heads above the median VHD of this answer (surges > mean + std left out), their "
                   "outputs × α (He et al. 2025, METHODS §3.1; selected once from this capture, α unverified). "
                   "Needs VHD (the VHD tab).")
    elif method == "mask":
        shared.held("gaze_iv_heads", [f"L{l}H{h}" for l, h in centric[:4]])
        chosen = st.multiselect("Heads that lose the picture", labels, key="gaze_iv_heads")
        heads = [(int(x[1:].split("H")[0]), int(x.split("H")[1])) for x in chosen]
    state = shared.view_state()
    intervention = None
    if method != "none":
        try:
            intervention = probes.for_capture(method, capture, heads=heads, **params)
        except (InterventionError, ProbeMissing) as exc:
            st.info(str(exc))
    state.intervention = remember(intervention) if intervention is not None else "none"  # the link carries it
    if intervention is not None:
        after = shared.run_capture(dataclasses.replace(capture.spec, intervention=intervention),
                                   "Answering again with the intervention")
        if after is not None:
            left, right = st.columns(2)
            left.markdown("**Before**")
            left.text(capture.output.text or "(nothing)")
            right.markdown(f"**After ({vlm_presets.METHODS[method]})**")
            right.text(after.output.text or "(nothing)")
            st.caption(f"{len(intervention.edits)} edits on {len(intervention.heads())} heads; key "
                       f"`{intervention.key()}`.")
    _batch(method, params, heads)


def _batch(method: str, params: dict, heads) -> None:
    st.markdown("**Held-out scenes**")
    shared.held("gaze_iv_scenes", 5)
    n = st.slider("Scenes", 1, 50, key="gaze_iv_scenes",
                  help=f"{probes.QUESTIONS_PER_SCENE} questions per scene, the absent-object one always among them.")
    if st.button("Measure the accuracy change", key="gaze_iv_batch", disabled=method == "none"):
        model = shared.view_state().model
        found = shared.run_with_progress(
            "Held-out scenes", probes.accuracy_change, model, method, {**params, **({"heads": heads} if heads else {})},
            n_scenes=int(n), estimate=shared.Estimate(
                f"gaze-batch {model} {method}", int(n),
                f"scenes × {probes.QUESTIONS_PER_SCENE} questions, before and after", 16.0, fixed_s=2.0))
        if found is not None:
            st.session_state["gaze_iv_result"] = found
    result = st.session_state.get("gaze_iv_result")
    if result is None:
        return
    kinds = result.kinds()
    acc = [result.accuracy(k) for k in kinds]
    total = result.accuracy()
    shared.plotly_chart(charts.answers_chart(
        kinds, [a[0] for a in acc], [a[1] for a in acc],
        title=f"{vlm_presets.METHODS[result.method]}: exact answers by question kind "
              f"(all: {total[0]:.0%} → {total[1]:.0%}, n = {total[2]})"), key="gaze_iv_chart", config=plot_config())
    st.dataframe({"scene": [r.seed for r in result.rows], "question": [r.question for r in result.rows],
                  "expected": [r.expected for r in result.rows], "before": [r.before for r in result.rows],
                  "after": [r.after for r in result.rows]}, hide_index=True, key="gaze_iv_rows")
    changed = int(np.sum([r.right_before != r.right_after for r in result.rows]))
    st.caption(f"{changed} of {len(result.rows)} answers changed correctness. “absent”: is-there questions about an "
               "object the scene does not have (answer “no”): hallucination.")
