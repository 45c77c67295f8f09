"""The sidebar's input: the model menu, the input widgets of each modality (drafts until Run), and the
embedded model a one-modality page switches to.

The input widgets are drafts (`f_*` keys): the view's input changes only when Run is pressed.  A draft
widget that a page does not draw (the chat box on the Diffusion page, the seed on the explorer) loses its
session-state key when Streamlit cleans up undrawn widgets, so Run reads every draft with the view's
current value as its fallback (`_draft`), and `keep_drafts` copies them into keys Streamlit never cleans.
"""
from __future__ import annotations

import streamlit as st

import capture
from pages.resend import RESEND, resend
from pages.shared import (
    DIT_PROMPT,
    VLM_IMAGE,
    VLM_QUESTION,
    bind,
    clear_stopped,
    modality_of,
    model_title,
    set_fields,
    view_state,
)
from state import MAX_GUIDANCE, MAX_NEW_TOKENS, MAX_SIDE, ViewState, allowed_models

# pages about one modality, and the embedded model they switch to when another kind is loaded
PAGE_MODELS = {"dit": ("dit", "shapes-dit"), "gaze": ("vlm", "shapes-vlm"), "vision": ("vision", "dinov2-s")}
# text and diffusion drafts: widget key -> ViewState field
DRAFTS = {"f_prompt": "prompt", "f_chat": "chat", "f_max_new": "max_new_tokens", "f_seed": "seed",
          "f_steps": "steps", "f_width": "width", "f_height": "height", "f_guidance": "guidance"}
KEPT = "kept_drafts"  # the drafts' last values, in a key that is no widget's (never cleaned up)


def page_model() -> None:
    """On a page about one modality (PAGE_MODELS), load its embedded model if another kind is selected."""
    state = view_state()
    wanted = PAGE_MODELS.get(state.page)
    if wanted is None or modality_of(state.model) == wanted[0] or wanted[1] not in allowed_models():
        return
    prompt = {"dit": DIT_PROMPT, "vlm": VLM_QUESTION}.get(wanted[0], state.prompt)
    set_fields(model=wanted[1], layer=-1, head=-1)  # start from the mean of layers (the last, on Vision) and heads
    state.prompt, state.key, state.width, state.height, state.guidance = prompt, "", 0, 0, ""
    st.session_state.update(f_prompt=prompt, f_width=0, f_height=0, f_guidance=None)
    st.session_state[RESEND] = True  # until a run completes, the sidebar sends these values (pages.resend)
    st.session_state.pop(KEPT, None)
    if wanted[0] == "vlm" and not state.image.startswith("scene-"):
        state.image = VLM_IMAGE
        for key in ("f_image_kind", "f_scene_seed", "f_sample"):
            st.session_state.pop(key, None)
    if wanted[0] == "vision" and (not state.image or state.image.startswith("scene-")):
        state.image = "cat" if "cat" in capture.sample_names() else capture.sample_names()[0]
    st.toast(f"Switched the model to {model_title(wanted[1])} for this page.")


def render() -> None:
    """Model, input and generation settings, and the Run button: the same on every page."""
    state = view_state()
    with st.sidebar:
        st.markdown("### Input")
        models = list(allowed_models())
        if state.model not in models:
            state.model = models[0]
        bind("model", st.selectbox, "Model", models, format_func=model_title,
             help="Embedded models need no download. Operators can allow more with HEADSCOPE_ALLOWED_MODELS.")
        modality = modality_of(state.model)
        if modality == "vision":
            image_inputs(state)
        elif modality == "vlm":
            vlm_inputs(state)
        else:
            text_inputs(state, modality)


def _draft(key: str):
    """A draft's value: its widget's, else the last one kept, else the view's (a widget not drawn on this
    page has lost its key)."""
    if key in st.session_state:
        return st.session_state[key]
    return st.session_state.get(KEPT, {}).get(key, getattr(view_state(), DRAFTS[key]))


def text_inputs(state: ViewState, modality: str = "text") -> None:
    """A prompt, and what the model does with it: generation settings, or (diffusion) seed and steps.
    The widgets are drafts: the Run button makes them the view's input."""
    kept = st.session_state.setdefault(KEPT, {})
    # each draft's value, also given as its widget's default: what a browser shows a widget it was never sent a
    # value for (pages.resend), so it shows and sends back this, not an empty prompt and 1 step
    v = {key: kept.get(key, getattr(state, field)) for key, field in DRAFTS.items()}
    v["f_guidance"] = _scale(v["f_guidance"])  # the view's "4.5" or "" as the widget's number or None
    for key, value in v.items():
        resend(key, value)
    if modality == "dit":
        st.text_area("Prompt", v["f_prompt"], height=90, key="f_prompt",
                     help="What to draw, e.g. “a green triangle at the center and a red square at the top right”.")
        left, right = st.columns(2)
        left.number_input("Seed", 0, 2**31 - 1, v["f_seed"], key="f_seed",
                          help="The starting noise: same seed, same picture.")
        right.number_input("Steps", 1, capture.MAX_STEPS, v["f_steps"], key="f_steps",
                           help="Sampling steps (every step's attention is recorded).")
        left.number_input("Width (px)", 0, MAX_SIDE, v["f_width"], step=16, key="f_width",
                          help="0: the model's default size.")
        right.number_input("Height (px)", 0, MAX_SIDE, v["f_height"], step=16, key="f_height",
                           help="0: the model's default size.")
        st.number_input("Guidance scale", 0.0, MAX_GUIDANCE, v["f_guidance"], step=0.5, key="f_guidance",
                        placeholder="the model's default",
                        help="Classifier-free guidance: how far each step moves from the unconditional prediction "
                             "toward the prompt's. Empty: the model's default; 0 or 1 (by family): none, as "
                             "guidance-distilled models sample.")
    else:
        st.text_area("Prompt", v["f_prompt"], height=140, key="f_prompt",
                     help="Any length: an input longer than the model's context is refused with its length in tokens.")
        st.checkbox("Wrap in the chat template", v["f_chat"], key="f_chat",
                    help="Formats the prompt as a user turn, as the instruct model was trained.")
        st.number_input("Max new tokens", 0, MAX_NEW_TOKENS, v["f_max_new"], key="f_max_new",
                        help="0 runs the prompt only (prefill). Greedy decoding.")
    kept.update({key: st.session_state[key] for key in DRAFTS if key in st.session_state})
    st.button("Run", type="primary", width="stretch", on_click=_apply_drafts)


def image_inputs(state: ViewState) -> None:
    """A sample photo or an upload (checked by content, stored by hash: links carry only the hash)."""
    problem = None
    upload = st.session_state.get("f_upload")  # handled before the widgets so the new image shows at once
    if upload is not None and st.session_state.get("f_uploaded") != upload.file_id:
        try:
            ref = capture.store_upload(upload.getvalue())
        except capture.InputError as exc:
            problem = str(exc)
        else:
            set_fields(image=ref)
        st.session_state["f_uploaded"] = upload.file_id
    samples = capture.sample_names()
    if not state.image or state.image.startswith("scene-"):
        set_fields(image="cat" if "cat" in samples else samples[0])
    options = samples + ([state.image] if state.image not in samples else [])
    bind("image", st.selectbox, "Image", options,
         format_func=lambda name: f"upload {name[7:19]}…" if name.startswith("sha256:") else f"sample: {name}")
    st.file_uploader("…or upload a picture", type=["png", "jpg", "jpeg", "webp", "gif", "bmp"], key="f_upload",
                     help="PNG/JPEG/WebP/GIF/BMP, up to 20 MB; checked by content, stored by its hash.")
    if problem:
        st.error(problem)


def _image_kind(ref: str) -> str:
    return "scene" if ref.startswith("scene-") else "upload" if ref.startswith("sha256:") else "sample"


def vlm_inputs(state: ViewState) -> None:
    """A picture (a procedural scene by seed, a sample photo or an upload) and a question about it.
    Drafts until Run, like the prompt; an upload is checked and stored by hash at once."""
    if not state.image:
        state.image = VLM_IMAGE
    kind = _image_kind(state.image)
    st.session_state.setdefault("f_image_kind", kind)
    st.session_state.setdefault("f_scene_seed", int(state.image[6:]) if kind == "scene" else 3)
    samples = capture.sample_names()
    st.session_state.setdefault("f_sample", state.image if kind == "sample" and state.image in samples else samples[0])
    st.session_state.setdefault("f_upload_ref", state.image if kind == "upload" else "")
    resend("f_prompt", state.prompt)
    choice = st.segmented_control("Picture", ["scene", "sample", "upload"], key="f_image_kind",
                                  format_func={"scene": "Scene", "sample": "Sample photo", "upload": "Upload"}.get
                                  ) or "scene"
    if choice == "scene":
        st.number_input("Scene seed", 0, 10**9 - 1, key="f_scene_seed",
                        help="A procedural picture of 2-4 coloured shapes (core.scenes); shapes-vlm was "
                             "trained on scenes with seeds from 1,000,000, so small seeds are new to it.")
        scene = capture.scenes.make_scene(int(st.session_state["f_scene_seed"]), capture.scenes.VLM)
        st.image(scene.image, caption=scene.caption, width=160)
        suggestions = [qa.question for qa in capture.scenes.questions(scene)]
        st.selectbox("Suggested questions", ["—"] + suggestions, key="f_suggest", on_change=_use_suggestion)
    elif choice == "sample":
        st.selectbox("Sample photo", samples, key="f_sample")
    else:
        upload = st.file_uploader("Picture", type=["png", "jpg", "jpeg", "webp", "gif", "bmp"], key="f_vlm_upload",
                                  help="PNG/JPEG/WebP/GIF/BMP, up to 20 MB; checked by content, stored by its hash.")
        if upload is not None and st.session_state.get("f_vlm_uploaded") != upload.file_id:
            try:
                st.session_state["f_upload_ref"] = capture.store_upload(upload.getvalue())
            except capture.InputError as exc:
                st.error(str(exc))
            st.session_state["f_vlm_uploaded"] = upload.file_id
    st.text_input("Question", state.prompt, max_chars=300, key="f_prompt",
                  help="Asked in the model's chat template, e.g. "
                  "“what colour is the circle?”, “where is the red square?”, “how many shapes are there?”.")
    st.button("Run", type="primary", width="stretch", on_click=_apply_vlm_drafts)


def _use_suggestion() -> None:
    picked = st.session_state.get("f_suggest")
    if picked and picked != "—":
        st.session_state["f_prompt"] = picked


def _drafted_image() -> str:
    kind = st.session_state.get("f_image_kind") or "scene"
    if kind == "scene":
        return f"scene-{int(st.session_state.get('f_scene_seed', 3))}"
    if kind == "sample":
        return st.session_state.get("f_sample") or capture.sample_names()[0]
    return st.session_state.get("f_upload_ref") or view_state().image


def _apply_vlm_drafts() -> None:
    """The Run button of a VLM: the drafted picture and question become the view's input."""
    state = view_state()
    state.image, state.prompt, state.key = _drafted_image(), st.session_state.get("f_prompt", state.prompt), ""
    clear_stopped()


def _scale(value) -> float | None:
    """A guidance scale draft (the widget's number or None, or the view's text) as the widget's value."""
    return None if value is None or value == "" else float(value)


def _apply_drafts() -> None:
    """The Run button: the drafted input becomes the view's input."""
    state = view_state()
    state.prompt = str(_draft("f_prompt"))
    state.chat = bool(_draft("f_chat"))
    state.max_new_tokens = int(_draft("f_max_new"))
    state.seed, state.steps = int(_draft("f_seed")), int(_draft("f_steps"))
    state.width, state.height = int(_draft("f_width")), int(_draft("f_height"))
    scale = _scale(_draft("f_guidance"))
    state.guidance = "" if scale is None else f"{scale:g}"
    state.key = ""
    clear_stopped()


def resolve_link_key() -> None:
    """A link that names its input by capture key: load that capture's spec (before widgets render)."""
    state = view_state()
    held = st.session_state.get("capture")
    if not state.key or (held is not None and held.key == state.key):
        return
    found = capture.load_capture(state.key)
    if found is not None and found.spec.model in allowed_models():
        state.model, state.prompt = found.spec.model, found.spec.prompt
        state.chat, state.max_new_tokens = found.spec.chat, found.spec.max_new_tokens
        state.seed, state.steps = found.spec.seed, found.spec.steps or state.steps
        state.width, state.height = found.spec.width, found.spec.height
        state.guidance = "" if found.spec.guidance is None else f"{found.spec.guidance:g}"
        st.session_state.update(f_prompt=state.prompt, f_chat=state.chat, f_max_new=state.max_new_tokens,
                                f_seed=state.seed, f_steps=state.steps, f_width=state.width, f_height=state.height,
                                f_guidance=found.spec.guidance)
        st.session_state.pop(KEPT, None)
        st.session_state["capture"] = found
    else:
        st.session_state.setdefault("link_warnings", []).append(
            "The linked capture is not in this server's cache; showing the prompt from the link instead.")
        state.key = ""
