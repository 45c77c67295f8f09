"""Attribution on the other kinds of model (issue 24, items 4 and 5): activation patching of every head between
a clean and a corrupted input (Wang et al. 2022, IOI; Heimersheim & Nanda 2024, "How to use and interpret
activation patching"), for
- a VLM (probes.vlm_patching): the language model's heads between two pictures of one question, the metric the
  logit difference of two answer tokens (or the answer's probability) at the answer position;
- shapes-dit (probes.dit_patching): the heads between two prompts at every sampling step, the metric the
  distance of the final picture to the clean prompt's picture;
- a ViT classifier (probes.vit_patching): the heads between two pictures, on the class logit.

pages/attribution.py hands over here when the model is not a text model.  The controls live in ViewState, so a
link reproduces the view: the question is `prompt`, the clean picture `image` (the sidebar's input of a VLM or
a vision model), the corrupted one `corrupted_image`; `clean` / `corrupted` are the DiT prompts, `seed` /
`steps` its sampling; `target`, `foil`, `measure`, `direction`, `positions` as named.  A field still at the
text page's default (the IOI prompts, ' Mary' / ' John', the fox prompt) stands for the probe's own default
(core.probe_results), so a bare link to the page on shapes-vlm or shapes-dit opens on a sensible example.
The result is read from the cache (analytics.patching_kinds) and drawn at once; otherwise one button runs it.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import streamlit as st

import capture
import probes
from analytics import ProbeMissing
from analytics.patching_kinds import read_dit_patching, read_vit_patching, read_vlm_patching
from capture import scenes
from capture.images import SCENE_RE, load_image
from core.probe_results import DitPatchingParams, VitPatchingParams, VlmPatchingParams
from pages import shared
from pages.widgets import signed_head_map
from state import MAX_LINK_PROMPT, MAX_LINK_TOKEN, ViewState

PROBE = {"vlm": "vlm_patching", "dit": "dit_patching", "vision": "vit_patching"}
READ = {"vlm_patching": read_vlm_patching, "dit_patching": read_dit_patching, "vit_patching": read_vit_patching}
TEXT = ViewState()  # the text page's defaults: a field still at one of them means "this probe's default"
# seconds per unit on the reference machine (2 CPU cores): a VLM head patched (a batched forward of ~100
# tokens shared by ~9 heads), a DiT head at one sampling step, a ViT head
EACH_S = {"vlm_patching": 0.1, "dit_patching": 0.005, "vit_patching": 0.05}
HEADS = {"shapes-vlm": 270, "shapes-dit": 16}  # layers x heads of the embedded models (the others: from config)
SCENES = [f"scene-{seed}" for seed in range(1, 13)]
VIT_FAMILIES = ("vit", "deit")  # probes.vit_patching.FAMILIES: classifiers that read the CLS token alone


def _given(value, text_default, default):
    """The view's value, or the probe's default while the field still holds the text page's default."""
    return default if value == text_default else value


def params_of(state: ViewState, kind: str):
    """The probe's parameters (a VlmPatchingParams, DitPatchingParams or VitPatchingParams) this view names."""
    if kind == "dit":
        d = DitPatchingParams()
        return DitPatchingParams(clean=_given(state.clean, TEXT.clean, d.clean),
                                 corrupted=_given(state.corrupted, TEXT.corrupted, d.corrupted),
                                 seed=state.seed, steps=state.steps, direction=state.direction,
                                 guidance=state.guidance_scale())
    d = VlmPatchingParams() if kind == "vlm" else VitPatchingParams()
    prob = state.measure == "prob"
    common = dict(clean_image=state.image or d.clean_image, corrupted_image=state.corrupted_image or d.corrupted_image,
                  target=_given(state.target, TEXT.target, d.target),
                  foil="" if prob else _given(state.foil, TEXT.foil, d.foil),
                  metric=state.measure, direction=state.direction)
    if kind == "vlm":
        return VlmPatchingParams(question=_given(state.prompt, TEXT.prompt, d.question), positions=state.positions,
                                 **common)
    return VitPatchingParams(**common)


def not_a_classifier(model: str) -> str | None:
    """The sentence that says why ViT patching cannot run on this vision model (None: it may), checked from
    its config.json before anything loads; the probe says the same if a model passes this and still is not one."""
    if model in capture.EMBEDDED:  # the embedded vision model is DINOv2: an image encoder, no classifier
        config = {}
    else:
        from capture.registry import local_config

        config = local_config(model)
        if not config:
            return None  # nothing known yet: the probe decides
    if config.get("model_type") in VIT_FAMILIES and any("ImageClassification" in a
                                                        for a in config.get("architectures", [])):
        return None
    why = " (DINOv2 is an image encoder: it has no classification head)" if model in capture.EMBEDDED else ""
    return f"ViT patching needs a ViT or DeiT image classifier that reads its CLS token; {model} is not one{why}."


def n_heads_of(model: str) -> int:
    """Layers x heads, for the estimate before anything loads (a guess of 144 when the config is unknown)."""
    if model in HEADS:
        return HEADS[model]
    from capture.registry import local_config

    config = local_config(model)
    config = config.get("text_config", config)
    return int(config.get("num_hidden_layers", 12)) * int(config.get("num_attention_heads", 12))


# ---- controls: widgets with keys of their own, drawn from the view each run, written back on change ----------

def _set(field: str, key: str, also: dict | None = None) -> None:
    value = st.session_state[key]
    setattr(shared.view_state(), field, value)
    for other, copy in (also or {}).items():  # keep the sidebar's drafts of the same input in step
        st.session_state[other] = copy(value) if callable(copy) else value


def control(field: str, value, widget, *args, also: dict | None = None, **kwargs):
    """`widget` showing `value` (the view's, resolved), writing ViewState.<field> when changed."""
    key = f"ap_{field}"
    st.session_state[key] = value
    return widget(*args, key=key, on_change=_set, args=(field, key, also), **kwargs)


def _vlm_picture_changed(field: str, key: str, also=None) -> None:
    """The clean picture of a VLM is the sidebar's picture: its drafts start again from the view's."""
    _set(field, key)
    for key in ("f_image_kind", "f_scene_seed", "f_sample", "f_upload_ref"):
        st.session_state.pop(key, None)


def picture_choice(column, label: str, field: str, value: str, options: list[str], help: str, on_change=_set,
                   also: dict | None = None) -> None:
    """A picture menu (scenes, samples, and the view's own picture if it is none of them: an upload)."""
    options = options + ([value] if value not in options else [])
    key = f"ap_{field}"
    st.session_state[key] = value
    column.selectbox(label, options, key=key, help=help, on_change=on_change, args=(field, key, also),
                     format_func=lambda ref: f"upload {ref[7:19]}…" if ref.startswith("sha256:") else
                     ref.replace("-", " "))


def picture_of(ref: str) -> tuple[np.ndarray | None, str]:
    """The picture a reference names and its caption (a scene's description); (None, sentence) if there is none."""
    try:
        image = np.asarray(load_image(ref))
    except capture.USER_ERRORS as exc:
        return None, str(exc)
    match = SCENE_RE.match(ref)
    return image, scenes.make_scene(int(match.group(1)), scenes.VLM).caption if match else ref


def controls(kind: str, p) -> None:
    """The inputs of each kind but the pictures (written to the view), the metric and the direction."""
    if kind == "dit":
        left, right = st.columns(2)
        control("clean", p.clean, left.text_input, "Clean prompt", max_chars=MAX_LINK_PROMPT,
                help="The prompt whose picture is the reference (distance 0).")
        control("corrupted", p.corrupted, right.text_input, "Corrupted prompt", max_chars=MAX_LINK_PROMPT,
                help="As many tokens as the clean prompt, a word changed: 'blue' for 'red'.")
        cols = st.columns([1, 1, 2.4])
        control("seed", p.seed, cols[0].number_input, "Seed", 0, 2**31 - 1, also={"f_seed": None},
                help="The starting noise, the same in every run.")
        control("steps", p.steps, cols[1].number_input, "Steps", 1, capture.MAX_STEPS, also={"f_steps": None},
                help="Sampling steps; each head is patched at every step.")
        direction(cols[2])
        return
    if kind == "vlm":
        cols = st.columns([2, 1, 1])
        control("prompt", p.question, cols[0].text_input, "Question", max_chars=300, also={"f_prompt": None},
                help="Asked about both pictures; the answer's first token is predicted at its last token.")
        cols = cols[1:] + st.columns([1.3, 2, 1.5, 0.5])
    else:
        cols = st.columns([1, 1, 1.3, 2])
    what = "token, without a leading space: 'red'" if kind == "vlm" else "class: a label or a number; blank = " \
        "the clean picture's top class"
    control("target", p.target, cols[0].text_input, "Answer", max_chars=MAX_LINK_TOKEN, help=f"One {what}.")
    control("foil", p.foil, cols[1].text_input, "Foil", max_chars=MAX_LINK_TOKEN, disabled=p.metric == "prob",
            help="The metric is logit(answer) − logit(foil)" + ("" if kind == "vlm" else "; blank = the corrupted "
                                                                "picture's top class") + ".")
    shared.bind("measure", cols[2].segmented_control, "Metric", ["logit_diff", "prob"], required=True,
                format_func={"logit_diff": "logit diff", "prob": "probability"}.get)
    direction(cols[3])
    if kind == "vlm":
        shared.bind("positions", cols[4].segmented_control, "Patched positions", ["all", "image", "text"],
                    required=True, help="Where each head's output is copied: every token, the picture's "
                                        "tokens only, or the text tokens only.")


def direction(column) -> None:
    shared.bind("direction", column.segmented_control, "Patching", ["denoise", "noise"], required=True,
                format_func={"denoise": "clean → corrupted", "noise": "corrupted → clean"}.get,
                help="denoise: clean head outputs into the corrupted run (what restores the answer); noise: "
                     "corrupted outputs into the clean run (what breaks it).")


def pick_cell(row: int, col: int) -> None:
    """A click on the map's cell (layer, head) selects that head."""
    shared.set_fields(layer=row, head=col)


def render(state: ViewState) -> None:
    """The whole page for a VLM, a DiT or a vision model."""
    model, kind = state.model, shared.modality_of(state.model)
    probe = PROBE[kind]
    what = {"vlm": "a VLM's language-model heads between two pictures of one question",
            "dit": "the heads between two prompts, at every sampling step",
            "vision": "the heads between two pictures, on the class logit"}[kind]
    st.caption(f"Activation patching of {what}: a head's output copied from the clean run into the corrupted one "
               "(denoise) or back (noise), and how much of the metric it moves (Wang et al. 2022; Heimersheim & "
               "Nanda 2024).")
    if kind == "vision" and (reason := not_a_classifier(model)):
        st.info(reason)
        shared.stop()
    p = params_of(state, kind)
    controls(kind, p)
    where = {"store": capture.default_store(), "revision": capture.revision(model), "model": model}
    try:
        patching = READ[probe](**where, **asdict(p))
    except ProbeMissing:
        patching = None
    if patching is None:
        _, _, right = pictures(kind, p, None)
        heads = n_heads_of(model)
        units, unit = (heads * p.steps, "head-steps") if kind == "dit" else (heads, "heads patched")
        estimate = shared.Estimate(f"{probe} {model}", units, unit, EACH_S[probe], fixed_s=3.0)
        with right:
            st.caption(f"Not computed yet: each of the {heads} heads patched alone ({p.direction}), batched, then "
                       f"cached; {estimate.text()}.")
            if st.button("Run activation patching", type="primary", key="ap_run"):
                if shared.run_with_progress("Activation patching", probes.run_probe, probe, model, asdict(p),
                                            estimate=estimate):
                    st.rerun()
        shared.stop()
    effect = patching.effect  # [layer, head]
    n_layers, n_heads = effect.shape
    for warning in state.clamp(n_layers, n_heads, 10**6):
        st.warning(warning)
    layer, head = state.layer, state.head
    st.subheader(f"Layer {layer}, head {head}")
    _, _, right = pictures(kind, p, patching)
    before_after(right, p, patching, layer, head)
    verb, done = ("restores", "restored") if p.direction == "denoise" else ("destroys", "destroyed")
    signed_head_map(effect, f"Share of the gap each head {verb}: click a head", f"share of the gap {done}",
                    "ap_map", (layer, head), pick_cell, max_cell_px=16 if n_layers > 8 else 40)
    measured = int(np.isfinite(patching.patched).sum())
    st.caption(f"{measured} heads, each patched alone at every {'step and position' if kind == 'dit' else 'position'}"
               f"{'' if kind != 'vlm' or p.positions == 'all' else ' of the ' + p.positions + ' tokens'}; 1 = the "
               f"whole clean − corrupted gap {done}, 0 = nothing moved. The selected head is framed.")


def pictures(kind: str, p, patching) -> list:
    """Clean | corrupted | the numbers' column: the two input pictures with their menus (VLM, ViT) or the two
    prompts' final pictures (DiT, once sampled), with captions.  Returns the three columns."""
    columns = st.columns([1, 1, 2.2])
    if kind == "dit":
        if patching is not None:
            columns[0].image(patching.result.array("clean_image"), caption=f"clean: {p.clean}", width=150)
            columns[1].image(patching.result.array("corrupted_image"), caption=f"corrupted: {p.corrupted}",
                             width=150)
        return columns
    samples = capture.sample_names()
    options = SCENES + samples if kind == "vlm" else samples
    on_clean = _vlm_picture_changed if kind == "vlm" else _set  # a vision model's picture: the sidebar's menu
    picture_choice(columns[0], "Clean picture", "image", p.clean_image, options, on_change=on_clean,
                   also=None if kind == "vlm" else {"w_image": None},
                   help="The picture whose answer you want to explain (the sidebar's picture).")
    picture_choice(columns[1], "Corrupted picture", "corrupted_image", p.corrupted_image, options,
                   help="The same size, something changed so the answer changes.")
    for column, name, ref in zip(columns, ("clean", "corrupted"), (p.clean_image, p.corrupted_image)):
        image, caption = picture_of(ref)
        if image is None:
            column.error(caption)
        else:
            column.image(image, caption=f"{name}: {caption}", width=150)
    return columns


def before_after(column, p, patching, layer: int, head: int) -> None:
    """Before | after: both runs' metric, the selected head's patched metric and its share of the gap."""
    unit = {"logit_diff": "logit difference", "prob": "probability",
            "mse": "mean squared distance of the picture to the clean prompt's"}[p.metric]
    base = patching.corrupted if p.direction == "denoise" else patching.clean
    value = patching.patched[layer, head]
    with column:
        clean, corrupted = st.columns(2)
        after, moved = st.columns(2)
    clean.metric("clean run", f"{patching.clean:.4g}", help=f"The {unit}.")
    corrupted.metric("corrupted run", f"{patching.corrupted:.4g}", help=f"The {unit}.")
    if np.isfinite(value):
        after.metric(f"L{layer} H{head} patched", f"{value:.4g}", delta=f"{value - base:+.4g}",
                     delta_color="off" if p.metric == "mse" else "normal",
                     help=f"The {unit} of the {'corrupted' if p.direction == 'denoise' else 'clean'} run with "
                          "this head patched; the change from that run.")
        moved.metric("share of the gap", f"{patching.effect[layer, head]:.1%}",
                     help="Of the clean − corrupted gap: denoise, restored; noise, destroyed (Wang et al. 2022).")
    else:
        after.metric(f"L{layer} H{head} patched", "—", help="Not measured in this sweep.")
