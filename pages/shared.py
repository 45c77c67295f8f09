"""What every page shares: the view state, the sidebar run controls, the current capture, the status line,
and one way to run long work (`run_with_progress`).

The `ViewState` in `st.session_state["view"]` is the single source of truth.  Widgets are bound
to its fields (`bind`); app.py writes it to `st.query_params` at the end of every run, which also
puts back the parameters Streamlit drops when the sidebar switches pages.
"""
from __future__ import annotations

import io
import json
import zipfile
from typing import Callable, TypeVar

import numpy as np
import streamlit as st

import capture
from capture import Capture, RunSpec
from state import MAX_LINK_PROMPT, MAX_NEW_TOKENS, MAX_SIDE, ViewState, allowed_models

# pages about one modality, and the embedded model they switch to when another kind is loaded
PAGE_MODELS = {"dit": ("dit", "shapes-dit"), "gaze": ("vlm", "shapes-vlm")}
DIT_PROMPT = "a red circle at the top left and a blue square at the bottom right"
VLM_IMAGE, VLM_QUESTION = "scene-3", "what colour is the circle?"  # scene 3 has one circle, a red one


def view_state() -> ViewState:
    """The session's ViewState, parsed from the link on the first run of a session."""
    if "view" not in st.session_state:
        state, warnings = ViewState.from_params(st.query_params.to_dict())
        st.session_state["view"] = state
        st.session_state["link_warnings"] = warnings
        st.session_state["link_opened"] = bool(st.query_params.to_dict())
    return st.session_state["view"]


def bind(field: str, widget, *args, **kwargs):
    """Render `widget` bound to ViewState.<field>: initialised from it, written back to it."""
    state = view_state()
    key = f"w_{field}"
    if key not in st.session_state:
        st.session_state[key] = getattr(state, field)
    value = widget(*args, key=key, **kwargs)
    setattr(state, field, value)
    return value


def set_fields(**values) -> None:
    """Change ViewState fields and the widgets bound to them (use from callbacks, before widgets render)."""
    state = view_state()
    for field, value in values.items():
        setattr(state, field, value)
        st.session_state[f"w_{field}"] = value


def memo(name: str, key, compute, size: int = 16):
    """compute() once per session and key (e.g. a capture key), kept in st.session_state[name]: the
    per-capture numbers a page draws on every rerun (the newest `size` keys are kept)."""
    held = st.session_state.setdefault(name, {})
    if key not in held:
        held[key] = compute()
        while len(held) > size:
            held.pop(next(iter(held)))
    return held[key]


def model_title(model: str) -> str:
    """What the model menu shows: an embedded model's short label, else the name itself."""
    return capture.EMBEDDED[model].label if model in capture.EMBEDDED else model


def modality_of(model: str) -> str:
    """"text", "vision", "vlm" or "dit": what the sidebar asks for."""
    return capture.modality(model)


def page_model() -> None:
    """On a page about one modality (PAGE_MODELS), load its embedded model if another kind is selected."""
    state = view_state()
    wanted = PAGE_MODELS.get(state.page)
    if wanted is None or modality_of(state.model) == wanted[0] or wanted[1] not in allowed_models():
        return
    prompt = {"dit": DIT_PROMPT, "vlm": VLM_QUESTION}.get(wanted[0], state.prompt)
    set_fields(model=wanted[1], layer=-1, head=-1)  # start from the mean of layers and every head
    state.prompt, state.key, state.width, state.height = prompt, "", 0, 0
    st.session_state.update(f_prompt=prompt, f_width=0, f_height=0)
    if wanted[0] == "vlm" and not state.image.startswith("scene-"):
        state.image = VLM_IMAGE
        for key in ("f_image_kind", "f_scene_seed", "f_sample"):
            st.session_state.pop(key, None)
    st.toast(f"Switched the model to {model_title(wanted[1])} for this page.")


def sidebar() -> None:
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


def text_inputs(state: ViewState, modality: str = "text") -> None:
    """A prompt, and what the model does with it: generation settings, or (diffusion) seed and steps.
    The widgets are drafts: the Run button makes them the view's input."""
    drafts = {"f_prompt": state.prompt, "f_chat": state.chat, "f_max_new": state.max_new_tokens,
              "f_seed": state.seed, "f_steps": state.steps, "f_width": state.width, "f_height": state.height}
    for key, value in drafts.items():
        st.session_state.setdefault(key, value)
    if modality == "dit":
        st.text_area("Prompt", height=90, max_chars=300, key="f_prompt",
                     help="What to draw, e.g. “a green triangle at the center and a red square at the top right”.")
        left, right = st.columns(2)
        left.number_input("Seed", 0, 2**31 - 1, key="f_seed", help="The starting noise: same seed, same picture.")
        right.number_input("Steps", 1, capture.MAX_STEPS, key="f_steps", help="Sampling steps (every step's attention is recorded).")
        left.number_input("Width (px)", 0, MAX_SIDE, step=16, key="f_width", help="0: the model's default size.")
        right.number_input("Height (px)", 0, MAX_SIDE, step=16, key="f_height", help="0: the model's default size.")
    else:
        st.text_area("Prompt", height=140, max_chars=20_000, key="f_prompt")
        st.checkbox("Wrap in the chat template", key="f_chat",
                    help="Formats the prompt as a user turn, as the instruct model was trained.")
        st.number_input("Max new tokens", 0, MAX_NEW_TOKENS, key="f_max_new",
                        help="0 runs the prompt only (prefill). Greedy decoding.")
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
    if not state.image:
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
    st.session_state.setdefault("f_prompt", state.prompt)
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
    st.text_input("Question", max_chars=300, key="f_prompt", help="Asked in the model's chat template, e.g. "
                  "“what colour is the circle?”, “where is the red square?”, “how many shapes are there?”.")
    st.button("Run", type="primary", width="stretch", on_click=_apply_vlm_drafts)


def _use_suggestion() -> None:
    picked = st.session_state.get("f_suggest")
    if picked and picked != "—":
        st.session_state["f_prompt"] = picked


def _drafted_image() -> str:
    kind = st.session_state.get("f_image_kind") or "scene"
    if kind == "scene":
        return f"scene-{int(st.session_state['f_scene_seed'])}"
    if kind == "sample":
        return st.session_state["f_sample"]
    return st.session_state.get("f_upload_ref") or view_state().image


def _apply_vlm_drafts() -> None:
    """The Run button of a VLM: the drafted picture and question become the view's input."""
    state = view_state()
    state.image, state.prompt, state.key = _drafted_image(), st.session_state["f_prompt"], ""


def _apply_drafts() -> None:
    """The Run button: the drafted input becomes the view's input."""
    state = view_state()
    state.prompt = st.session_state["f_prompt"]
    state.chat = bool(st.session_state["f_chat"])
    state.max_new_tokens = int(st.session_state["f_max_new"])
    state.seed, state.steps = int(st.session_state["f_seed"]), int(st.session_state["f_steps"])
    state.width, state.height = int(st.session_state["f_width"]), int(st.session_state["f_height"])
    state.key = ""


def resolve_link_key() -> None:
    """A link that names its input by capture key: load that capture's spec (before widgets render)."""
    state = view_state()
    held: Capture | None = st.session_state.get("capture")
    if not state.key or (held is not None and held.key == state.key):
        return
    found = capture.load_capture(state.key)
    if found is not None and found.spec.model in allowed_models():
        state.model, state.prompt = found.spec.model, found.spec.prompt
        state.chat, state.max_new_tokens = found.spec.chat, found.spec.max_new_tokens
        state.seed, state.steps = found.spec.seed, found.spec.steps or state.steps
        state.width, state.height = found.spec.width, found.spec.height
        st.session_state.update(f_prompt=state.prompt, f_chat=state.chat, f_max_new=state.max_new_tokens,
                                f_seed=state.seed, f_steps=state.steps, f_width=state.width, f_height=state.height)
        st.session_state["capture"] = found
    else:
        st.session_state.setdefault("link_warnings", []).append(
            "The linked capture is not in this server's cache; showing the prompt from the link instead.")
        state.key = ""


def spec_of(state: ViewState) -> RunSpec:
    modality = modality_of(state.model)
    if modality == "vision":
        return RunSpec(model=state.model, image=state.image or None)
    if modality == "dit":
        return RunSpec(model=state.model, prompt=state.prompt, seed=state.seed, steps=state.steps,
                       height=state.height, width=state.width)
    if modality == "vlm":
        return RunSpec(model=state.model, prompt=state.prompt, image=state.image or VLM_IMAGE,
                       max_new_tokens=state.max_new_tokens or capture.VLM_MAX_NEW_TOKENS)
    return RunSpec(model=state.model, prompt=state.prompt, chat=state.chat, max_new_tokens=state.max_new_tokens)


T = TypeVar("T")  # what a piece of long work returns


def run_with_progress(label: str, work: Callable[..., T], *args, stored: Callable[..., T | None] | None = None,
                      **kwargs) -> T | None:
    """`work(*args, progress=..., **kwargs)` under a progress bar fed by its (fraction, message) reports.

    `stored(*args)`, when given, is asked first: a result it finds is returned without drawing a bar.
    Work that reports nothing (`lambda progress: ...`) shows its label over an empty bar until it ends.
    A `capture.USER_ERRORS` (bad input, a model that cannot be had, a cache that cannot be written ...)
    is shown as its one sentence and None is returned; nothing the session holds is touched.
    """
    try:
        if stored is not None and (found := stored(*args)) is not None:
            return found
        bar = st.progress(0.0, text=f"{label}…")
        try:
            return work(*args, progress=lambda fraction, message: bar.progress(
                min(max(fraction, 0.0), 1.0), text=f"{label}: {message}"), **kwargs)
        finally:
            bar.empty()
    except capture.USER_ERRORS as exc:
        st.error(str(exc))
        return None


def run_capture(spec: RunSpec, label: str) -> Capture | None:
    """The capture of `spec`: from the cache, else run under a progress bar; None after a one-sentence error."""
    return run_with_progress(label, capture.run, spec, stored=capture.cached)


def current_capture() -> Capture | None:
    """The capture of the current input: from memory, the cache, or computed with a progress bar.

    Shows a clear message (and returns None) for input that cannot be run.
    """
    state = view_state()
    held: Capture | None = st.session_state.get("capture")
    spec = spec_of(state)
    if held is not None and held.spec == spec:
        return held
    found = run_capture(spec, f"Running {spec.model}")
    if found is None:
        return None
    st.session_state["capture"] = found
    if len(state.prompt) > MAX_LINK_PROMPT:
        state.key = found.key  # too long for a link: the link names the capture instead
    return found


def status_line(capture: Capture | None) -> None:
    """What is loaded, and whether it came from the cache."""
    if capture is None:
        st.caption("Nothing loaded.")
        return
    m = capture.meta
    source = "from the cache" if capture.from_cache else "computed now"
    if capture.store is not None and capture.store.temporary:
        st.warning(f"{capture.store.problem} Results are kept only until the server stops.")
    gqa = f" ({m.n_kv_heads} KV heads)" if m.n_kv_heads != m.n_heads else ""
    st.caption(f"**{m.name}** · {m.n_layers} layers × {m.n_heads} heads{gqa} · {capture.n_tokens} tokens · "
               f"{source} · key `{capture.key}`")


def show_text(capture: Capture) -> None:
    """Prompt and generated text, shown as plain text (never as Markdown: links carry user text)."""
    if capture.meta.modality == "vision":
        left, right = st.columns([1, 2])
        with left:
            picture = capture.image()
            if picture is not None:
                st.image(picture, caption=f"what {capture.meta.name} saw", width=220)
        with right:
            if capture.output.classes:
                st.text("\n".join(f"{label}: {p:.1%}" for label, p in capture.output.classes))
        return
    left, right = st.columns(2)
    with left:
        st.markdown("**Prompt**")
        st.text(capture.spec.prompt[:2000] + ("…" if len(capture.spec.prompt) > 2000 else ""))
    with right:
        st.markdown("**Generated**")
        st.text(capture.output.text if capture.output.text else "(prefill only: nothing generated)")
    for note in capture.output.notes:
        st.info(note)


def share_link(state: ViewState) -> str:
    """The URL of this view (the server's address as the browser sees it, plus the state)."""
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(st.context.url or "http://127.0.0.1:8501/")
    query = urlencode(state.to_params())
    return f"{parts.scheme}://{parts.netloc}/" + (f"?{query}" if query else "")


def show_link_warnings() -> None:
    for warning in st.session_state.pop("link_warnings", []):
        st.warning(warning)


def capture_zip(capture: Capture) -> bytes:
    """The whole capture: capture.npz (one [head, query, key] float16 array per layer; for long "qk"
    captures each layer's queries and keys plus the reductions, Capture.export_arrays) + capture.json."""
    arrays = io.BytesIO()
    np.savez_compressed(arrays, **capture.export_arrays())
    sidecar = {"key": capture.key, "tokens": capture.tokens,
               "spans": {k: [v.start, v.stop] for k, v in capture.spans.items()},
               "spec": capture.spec.to_json(), "model": capture.record()["meta"], "output": capture.output.to_json(),
               "layout": capture.layout, "layout_info": capture.layout_info}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("capture.npz", arrays.getvalue())
        zf.writestr("capture.json", json.dumps(sidecar, ensure_ascii=False, indent=1))
    return out.getvalue()
