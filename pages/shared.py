"""What every page shares: the view state, the current capture, the status line, and one way to run long
work (`run_with_progress`, `run_capture`: an estimate first, a progress line, a Stop button).

The `ViewState` in `st.session_state["view"]` is the single source of truth.  Widgets are bound
to its fields (`bind`); app.py writes it to `st.query_params` at the end of every run, which also
puts back the parameters Streamlit drops when the sidebar switches pages.  The sidebar's input widgets
are in pages/sidebar.py.  A page that has nothing more to show calls `stop()` (not `st.stop()`), so the
share box still comes.
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, NoReturn, TypeVar

import numpy as np
import streamlit as st

import capture
from capture import Capture, RunSpec
from pages.resend import as_default, resend
from state import MAX_LINK_PROMPT, ViewState

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
    """Render `widget` bound to ViewState.<field>: initialised from it, written back to it.  The value is also
    the widget's own default (pages.resend.as_default): when a rerun starts, Streamlit drops the messages of the run it
    cuts short that the browser has not had yet, and a value set in that run never reaches the browser, which
    then shows the widget at its own default and sends that back with the next rerun (a link's model was lost
    so: the Diffusion page opened on shapes-dit fell back to SmolLM2 at the first click, under load)."""
    state = view_state()
    key = f"w_{field}"
    resend(key, getattr(state, field))
    value = widget(*args, key=key, **as_default(widget, args, kwargs, st.session_state[key]), **kwargs)
    setattr(state, field, value)
    return value


def set_fields(**values) -> None:
    """Change ViewState fields and the widgets bound to them (use from callbacks, before widgets render)."""
    state = view_state()
    for field, value in values.items():
        setattr(state, field, value)
        st.session_state[f"w_{field}"] = value


def held(key: str, default) -> None:
    """Give the widget `key` its value, right before it is drawn: its current one, else the one it had when
    it was last drawn (kept aside), else `default`.

    Set through st.session_state in the run that draws the widget, so the browser shows it.  A value set
    in a run that does not draw its widget (a default for another mode's slider) reaches the server but not
    the browser, which then shows the widget's own default (a slider's minimum) and sends that back: the
    Diffusion page's SoftPAG sliders came back at 0.00 after the mode was switched away and back (the
    sidebar's widgets: pages.resend)."""
    kept = st.session_state.setdefault("kept_widgets", {})
    value = st.session_state[key] if key in st.session_state else kept.get(key, default)
    st.session_state[key] = kept[key] = value


def plotly_chart(figure, **kwargs) -> None:
    """st.plotly_chart(figure(), **kwargs), except in a browser session's first run, before its first figures
    have painted: a page then paints its pictures first and draws its Plotly charts a moment later (app.py asks
    the browser to say when it has painted, which reruns the page).  Plotly's bundle (4.7 MB) would otherwise
    arrive while the pictures paint and hold the browser's main thread for a second.  `figure` is a figure or
    a function that builds it (not called when the chart waits)."""
    in_browser = bool(st.context.headers.get("User-Agent")) if st.context.headers is not None else False
    if in_browser and not st.session_state.get("painted"):
        st.session_state["plotly_waiting"] = True
        st.empty()  # holds the chart's place, so the elements after it keep theirs (a tab opened meanwhile stays open)
        return
    st.plotly_chart(figure() if callable(figure) else figure, **kwargs)


def painted() -> None:
    st.session_state["painted"] = True


_MEMO: dict[str, dict] = {}  # name -> {key: value}, shared by every session of this server
_MEMO_LOCK = threading.Lock()


def memo(name: str, key, compute, size: int = 16):
    """compute() once per server and key, the newest `size` keys of each name kept: the numbers and figures a
    page draws from a capture (or atlas), whose key names its content, so every session (a shared link opened
    in a fresh browser) reuses them.  `forget(name)` drops them when what they read has changed."""
    with _MEMO_LOCK:
        held = _MEMO.setdefault(name, {})
        if key in held:
            return held[key]
    value = compute()
    with _MEMO_LOCK:
        held[key] = value
        while len(held) > size:
            held.pop(next(iter(held)))
    return value


def forget(name: str) -> None:
    """Drop what memo() keeps under `name` (a probe has just stored a new result, say)."""
    with _MEMO_LOCK:
        _MEMO.pop(name, None)


def model_title(model: str) -> str:
    """What the model menu shows: an embedded model's short label, else the name itself."""
    return capture.EMBEDDED[model].label if model in capture.EMBEDDED else model


def modality_of(model: str) -> str:
    """"text", "vision", "vlm" or "dit": what the sidebar asks for."""
    return capture.modality(model)


def spec_of(state: ViewState) -> RunSpec:
    modality = modality_of(state.model)
    if modality == "vision":
        return RunSpec(model=state.model, image=state.image or None)
    if modality == "dit":
        return RunSpec(model=state.model, prompt=state.prompt, seed=state.seed, steps=state.steps,
                       height=state.height, width=state.width, keep=state.kept_steps(),
                       guidance=state.guidance_scale())
    if modality == "vlm":
        return RunSpec(model=state.model, prompt=state.prompt, image=state.image or VLM_IMAGE,
                       max_new_tokens=state.max_new_tokens or capture.VLM_MAX_NEW_TOKENS)
    return RunSpec(model=state.model, prompt=state.prompt, chat=state.chat, max_new_tokens=state.max_new_tokens)


T = TypeVar("T")  # what a piece of long work returns
STOPPED = "stopped_work"  # labels of work the user stopped: a rerun does not start it again by itself
_MEASURED: dict[str, float] = {}  # seconds per unit of each kind of work, as last measured in this server


_running = threading.local()  # per session thread: whether app.py is running the page (page_run)


class PageStop(Exception):
    """Raised by `stop()` inside `page_run()`: the page ends there, and app.py goes on to write the link and
    the share box, which `st.stop()` (it ends app.py too) would leave out."""


@contextlib.contextmanager
def page_run():
    """app.py runs the page inside this block; a `stop()` in the page ends the page only."""
    _running.app = True
    try:
        yield
    except PageStop:
        pass
    finally:
        _running.app = False


def stop() -> NoReturn:
    """End the page here: inside app.py's page_run only the page ends; a page script run on its own (as
    AppTest reruns it) ends with st.stop()."""
    if getattr(_running, "app", False):
        raise PageStop
    st.stop()


@dataclass(frozen=True)
class Estimate:
    """How long a piece of long work should take, said before it starts: `units` x seconds per unit.

    `each_s` is the time per unit measured on the reference machine (2 CPU cores, README); once this
    server has run the same kind of work (`what`, e.g. "ablation smollm2"), its own measured time is
    used instead."""

    what: str
    units: int
    unit: str  # "heads", "sampling runs", "scenes" ...
    each_s: float
    fixed_s: float = 0.0  # loading the model and the like

    def seconds(self) -> float:
        return self.fixed_s + self.units * _MEASURED.get(self.what, self.each_s)

    def text(self) -> str:
        each = _MEASURED.get(self.what, self.each_s)
        where = "measured on this server" if self.what in _MEASURED else "on a 2-core CPU"
        return (f"about {duration(self.seconds())} ({self.units:,} {self.unit} × {each:.2g} s, {where}"
                + (f", plus ~{self.fixed_s:.0f} s to load" if self.fixed_s >= 1 else "") + ")")

    def learn(self, elapsed: float) -> None:
        if self.units > 0:
            _MEASURED[self.what] = max(elapsed - self.fixed_s, 0.0) / self.units


def duration(seconds: float) -> str:
    """"45 s", "3 min 20 s", "1 h 5 min"."""
    s = int(round(seconds))
    if s < 60:
        return f"{max(s, 1)} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s % 60 and s < 600 else "")
    return f"{s // 3600} h {s % 3600 // 60} min"


def clear_stopped() -> None:
    """Forget stopped work (the sidebar's Run starts everything afresh)."""
    st.session_state.pop(STOPPED, None)


def _stop_work(label: str) -> None:
    st.session_state.setdefault(STOPPED, set()).add(label)
    st.toast(f"Stopped: {label}. Nothing partial was kept.")


def _restart_work(label: str) -> None:
    st.session_state.get(STOPPED, set()).discard(label)


def run_with_progress(label: str, work: Callable[..., T], *args, stored: Callable[..., T | None] | None = None,
                      estimate: Estimate | None = None, asked: bool = True, **kwargs) -> T | None:
    """`work(*args, progress=..., **kwargs)` under a progress bar fed by its (fraction, message) reports,
    with the estimate said before it starts, the time so far and left, and a Stop button.

    `stored(*args)`, when given, is asked first: a result it finds is returned without drawing a bar.
    Work that reports nothing (`lambda progress: ...`) shows its label over an empty bar until it ends.
    Stop: the click reruns the page, and Streamlit ends the running script at its next element update,
    which is the bar's at the work's next report, so the work stops there.  Captures and probes write
    their metadata record last (DESIGN.md, "Cache"): a stopped one leaves nothing that reads as complete.
    The stopped label is remembered: work that starts by itself on a rerun (`asked=False`: the capture of
    the page's input) shows "Stopped" and a button to start again instead of starting over; work a button
    asks for runs whenever it is asked.  A `capture.USER_ERRORS` (bad input, a model that cannot be had, a cache that
    cannot be written ...) is shown as its one sentence and None is returned.
    """
    try:
        if stored is not None and (found := stored(*args)) is not None:
            return found
        if not asked and label in st.session_state.get(STOPPED, ()):  # stopped, and nobody asked again
            st.info(f"Stopped: {label}. Nothing partial was kept.")
            st.button("Start again", key=f"restart_{label}", on_click=_restart_work, args=(label,))
            return None
        _restart_work(label)
        slot = st.empty()
        with slot.container():
            if estimate is not None:
                st.caption(f"{label}: {estimate.text()}.")
            bar = st.progress(0.0, text=f"{label}…")
            st.button("Stop", key=f"stop_{label}", on_click=_stop_work, args=(label,),
                      help="Ends the work at its next progress report; nothing partial is kept.")
        t0 = time.perf_counter()

        def report(fraction: float, message: str) -> None:
            done = min(max(fraction, 0.0), 1.0)
            elapsed = time.perf_counter() - t0
            left = f", ~{duration(elapsed * (1 - done) / done)} left" if 0.05 <= done < 1 else ""
            bar.progress(done, text=f"{label}: {message} ({duration(elapsed)}{left})")

        try:
            result = work(*args, progress=report, **kwargs)
        finally:
            slot.empty()
        if estimate is not None:
            estimate.learn(time.perf_counter() - t0)
        return result
    except capture.USER_ERRORS as exc:
        st.error(str(exc))
        return None


def cached_capture(spec: RunSpec) -> Capture | None:
    """The capture of `spec` if the cache has it (nothing runs), else None."""
    try:
        return capture.cached(spec)
    except capture.USER_ERRORS:
        return None


# seconds per unit of a capture on the reference machine (2 CPU cores): per prompt token and generated token
# (text, VLM), per sampling step (DiT), per picture (vision); the first capture of a model also loads it
CAPTURE_COST = {"text": (0.01, 0.1), "vlm": (0.01, 0.3), "dit": (0.0, 0.6), "vision": (0.0, 1.0)}


def capture_estimate(spec: RunSpec) -> Estimate:
    """How long a capture of `spec` should take, before it starts (prompt tokens guessed as characters / 4)."""
    modality = modality_of(spec.model)
    per_prompt, per_step = CAPTURE_COST.get(modality, (0.01, 0.1))
    if modality == "dit":
        return Estimate(f"capture {spec.model}", spec.steps or 20, "sampling steps", per_step, fixed_s=2.0)
    if modality == "vision":
        return Estimate(f"capture {spec.model}", 1, "picture", per_step, fixed_s=2.0)
    steps = spec.max_new_tokens
    units = max(1, round(len(spec.prompt) / 4 * per_prompt / per_step + steps))  # in generated-token times
    return Estimate(f"capture {spec.model}", units, f"token-steps (a generated token, or {per_step / per_prompt:.0f} "
                    "prompt tokens)", per_step, fixed_s=3.0)


def run_capture(spec: RunSpec, label: str) -> Capture | None:
    """The capture of `spec`: from the cache, else run under a progress bar with its estimate; None after a
    one-sentence error."""
    return run_with_progress(label, capture.run, spec, stored=capture.cached, estimate=capture_estimate(spec),
                             asked=False)


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
