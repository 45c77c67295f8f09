"""Intervene: pick a preset and heads, rerun generation, and compare before | after.

Baseline = the current input (the sidebar's view state).  The intervened run is
`capture.run(RunSpec(..., intervention=...))`, cached on disk by the spec key, so the same
intervention is computed once and the loaded model is reused.  A link names the intervention by key;
opening it restores the preset, the heads and the sliders (pages/intervene_link.py) as well as the result.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import streamlit as st

import capture
import probes
from analytics import METRICS
from capture import Intervention, InterventionError, presets, recall, remember
from charts import compare
from charts.pictures import metric_grid
from charts.theme import plot_config
from pages import shared
from pages.intervene_link import settings_of
from pages.widgets import picture
from state import MAX_NEW_TOKENS

MAP_WINDOW = 80  # tokens of the map comparison (the last ones of the shared prefix)
GRID_COLOUR = {"retrieval-mask": "retrieval", "duo-streaming": "duo_gate", "prune": "ablation"}  # else sink α


def scored(baseline, intervention: Intervention) -> np.ndarray:
    """Teacher-forced log-prob of the baseline continuation under `intervention` (kept by the server)."""
    return _logprobs(baseline.spec.model, tuple(baseline.output.token_ids), len(baseline.spans["prompt"]),
                     json.dumps(intervention.to_json(), sort_keys=True))


@st.cache_data(max_entries=64, show_spinner=False)
def _logprobs(model: str, token_ids: tuple[int, ...], n_prompt: int, intervention: str) -> np.ndarray:
    return capture.continuation_logprobs(capture.load(model), list(token_ids), n_prompt,
                                         Intervention.from_json(json.loads(intervention))).logprobs


def stored_scores(model: str, metric: str, **params):
    """A probe metric read from its stored result (default probe parameters), or None."""
    try:
        return METRICS[metric].compute(None, store=capture.default_store(), revision=capture.revision(model),
                                       model=model, **params)
    except Exception:  # noqa: BLE001 - absent or unreadable: the preset falls back to the chosen heads
        return None


def grid_values(base, name: str) -> np.ndarray | None:
    """The grid's colour: a one-pass metric of the baseline (kept by the server), or a stored probe metric (read
    each time: a probe may have run since; None if absent)."""
    metric = METRICS[name]
    if metric.probe is not None:
        return stored_scores(base.spec.model, name)
    return shared.memo("iv_grid_values", (base.key, name), lambda: metric.compute(base), size=64)


def most_changed(base, after, lo: int, hi: int) -> tuple[int, int]:
    """The head whose map over query rows lo..hi-1 moved most (mean |after - before|): the edited head's own
    map does not change under an output-level edit (prune, ITI), the heads after it do."""
    def compute():
        change = np.zeros((base.meta.n_layers, base.meta.n_heads))
        for layer in range(base.meta.n_layers):
            before_rows = base.rows(layer, lo, hi)  # [head, rows, keys]
            after_rows = after.rows(layer, lo, hi)
            change[layer] = np.abs(after_rows - before_rows).mean(axis=(1, 2))
        return divmod(int(np.argmax(change)), base.meta.n_heads)

    return shared.memo("iv_most_changed", (base.key, after.key, lo, hi), compute)


# ---- baseline ------------------------------------------------------------------------------------
st.title("Interventions")
state = shared.view_state()
spec = shared.spec_of(state)
if not spec.prompt.strip() and spec.image is None:  # a vision model reads its picture, no prompt
    st.error("The prompt is empty: type a prompt in the sidebar and press Run; this page then compares it "
             "with an intervened run.")
    shared.stop()
left, right = st.columns([1, 1.35], gap="medium")  # controls | before and after
grid_col, map_col = st.columns([1, 1.35], gap="medium")  # the head grid | the maps (drawn first: it is quick)
if spec.max_new_tokens == 0:
    n_new = left.number_input("Tokens to generate", 1, MAX_NEW_TOKENS, 24, key="iv_max_new",
                              help="The input is prefill-only; interventions are compared on a generated continuation.")
    spec = dataclasses.replace(spec, max_new_tokens=int(n_new))
spec = dataclasses.replace(spec, intervention=Intervention())
with right:
    base = shared.run_capture(spec, "baseline")
if base is None:
    shared.stop()
meta = base.meta
n_prompt = len(base.spans.get("prompt", range(base.n_tokens)))  # a vision model's input: its whole axis
before_tokens = base.tokens[n_prompt:]
labels = [compare.head_label(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)]

# ---- a link's intervention: its result and its controls ------------------------------------------
if st.session_state.get("iv_linked") != (state.intervention, meta.name):
    st.session_state["iv_linked"] = (state.intervention, meta.name)
    linked = recall(state.intervention) if state.intervention != "none" else None
    if linked is None and state.intervention != "none":
        st.warning("The linked intervention is not stored on this server; pick heads and a preset instead.")
    settings = settings_of(linked, meta) if linked is not None else None
    if settings is not None:
        st.session_state["iv_preset"] = settings.preset
        st.session_state["iv_heads"] = [compare.head_label(l, h) for l, h in settings.heads]
        for name, value in settings.params.items():
            st.session_state[f"iv_p_{settings.preset}_{name}"] = value
        st.session_state["iv_link_note"] = settings.note
    if linked is not None:
        st.session_state["iv_active"] = linked
active: Intervention | None = st.session_state.get("iv_active")

st.session_state["iv_heads"] = [x for x in st.session_state.get("iv_heads", []) if x in labels]


def toggle_head(layer: int, head: int) -> None:
    label = compare.head_label(layer, head)
    chosen = list(st.session_state.get("iv_heads", []))
    st.session_state["iv_heads"] = [x for x in chosen if x != label] if label in chosen else chosen + [label]


# ---- preset and heads --------------------------------------------------------------------
with left:
    shared.held("iv_preset", next(iter(presets.PRESETS)))  # given every run, so a link's preset reaches the browser
    name = st.selectbox("Preset", list(presets.PRESETS), key="iv_preset",
                        format_func=lambda n: presets.PRESETS[n].title)
    preset = presets.PRESETS[name]
    picked = st.multiselect("Heads", labels, key="iv_heads", placeholder="click the grid or type L3H2",
                            help=f"Query heads; with GQA, {meta.group_size} heads share a KV head.")
    heads = [compare.parse_head_label(x) for x in picked]
    default_heads = f"Without chosen heads: {preset.heads_default}." if preset.heads_default else \
        "Acts on the chosen heads."
    st.caption(f"{preset.description} ({preset.paper}). {default_heads}")
    params = {}
    for prm in preset.params:
        key = f"iv_p_{name}_{prm.name}"  # set from a link, or the preset's default
        if isinstance(prm.default, bool):
            shared.held(key, prm.default)
            params[prm.name] = st.checkbox(prm.name, key=key, help=prm.help)
        elif isinstance(prm.default, int):
            high = int(min(prm.high, meta.n_layers * meta.n_heads)) if prm.name == "k" else int(prm.high)
            st.session_state[key] = min(max(int(st.session_state.get(key, prm.default)), int(prm.low)), high)
            params[prm.name] = st.slider(prm.name, int(prm.low), high, step=int(prm.step), key=key, help=prm.help)
        else:
            st.session_state[key] = min(max(float(st.session_state.get(key, prm.default)), float(prm.low)),
                                        float(prm.high))
            params[prm.name] = st.slider(prm.name, float(prm.low), float(prm.high), step=float(prm.step), key=key,
                                         help=prm.help)
    extra = {}
    if "scores" in preset.needs:
        scores = stored_scores(spec.model, "retrieval")
        if scores is None:
            st.caption("No retrieval probe result: the chosen heads are masked (or K random heads).")
            if params.get("random") or not heads:
                scores = np.zeros((meta.n_layers, meta.n_heads))
        extra["scores"] = scores
    if "gates" in preset.needs:
        gates = stored_scores(spec.model, "duo_gate", granularity="kv")
        if gates is not None and not heads:
            extra["gates"] = gates
            st.caption("Streaming heads from the stored DuoAttention gates.")
    if "directions" in preset.needs:
        pos = st.text_area("Prompts toward (one per line)", key="iv_pos", height=90)
        neg = st.text_area("Prompts away from (one per line)", key="iv_neg", height=90)
        memo = st.session_state.setdefault("iv_dirs", {})
        dkey = (spec.model, spec.chat, pos, neg)
        if st.button("Compute directions", key="iv_dirs_btn"):
            found = shared.run_with_progress("Collecting head outputs", lambda progress: probes.steering_directions(
                capture.load(spec.model), pos.splitlines(), neg.splitlines(), chat=spec.chat))
            if found is not None:
                memo[dkey] = found
        extra["directions"] = memo.get(dkey)
    try:
        intervention = presets.build(name, meta, heads or None, **params, **extra)
        intervention.validate(meta.n_layers, meta.n_heads, meta.head_dim)
    except InterventionError as exc:
        intervention = None
        if active is None or active.empty:
            st.warning(str(exc))
    if intervention is not None:
        st.caption(f"{len(intervention.edits)} edits on {len(intervention.heads())} heads · key "
                   f"`{intervention.key()}`")
    if st.button("Rerun with this intervention", type="primary", key="iv_run", disabled=intervention is None,
                 width="stretch"):
        st.session_state["iv_active"] = active = intervention
    save_name, save_button = st.columns([2, 1])
    typed = save_name.text_input("Save as", key="iv_save_name", placeholder="name to save it as",
                                 label_visibility="collapsed")
    if save_button.button("Save", key="iv_save", disabled=intervention is None or not typed.strip()):
        st.session_state.setdefault("iv_saved", {})[typed.strip()] = intervention

# ---- the head grid --------------------------------------------------------------------
with grid_col:
    available = [n for n, m in METRICS.items() if m.kind == "head" and meta.modality in m.modalities
                 and (m.probe is None or grid_values(base, n) is not None)]
    wanted = GRID_COLOUR.get(name, "sink_alpha")
    st.session_state.setdefault("iv_grid_colour", wanted if wanted in available else
                                ("sink_alpha" if "sink_alpha" in available else "none"))
    if st.session_state["iv_grid_colour"] not in ["none", *available]:
        st.session_state["iv_grid_colour"] = "none"
    colour = st.selectbox("Colour the grid by", ["none", *available], key="iv_grid_colour",
                          format_func=lambda n: "nothing (chosen heads only)" if n == "none" else METRICS[n].title,
                          help="Any head metric of the atlas: the one-pass ones of this input, and the probe "
                               "results stored for this model.")
    values = grid_values(base, colour) if colour != "none" else None
    edited = sorted(set(active.heads())) if active is not None and not active.empty else []
    grid = metric_grid(values if values is not None else np.full((meta.n_layers, meta.n_heads), np.nan),
                       title="Heads: click one to choose or drop it",
                       value_name=METRICS[colour].title if colour != "none" else "not coloured",
                       chosen=heads, marked=edited, aspect=2.0)
    # cells twice as wide as high, 8 px high at least: SmolLM2's 9 heads fit this column at 1280 px, no scrolling
    picture(grid, key="iv_head_grid", on_pick=toggle_head, min_cell_px=8, max_cell_px=16, cell_ratio=2.0)
    st.caption("Red frame: the chosen heads. Red dot: the heads the intervention shown edits"
               + (f" ({len(edited)})." if edited else "."))

# ---- before | after, and the maps ------------------------------------------------------------------
shown = active is not None and not active.empty
after = None
with right:
    if not shown:
        st.info("Pick heads and a preset, then press Rerun to compare.")
    else:
        state.intervention = remember(active)
        st.session_state["iv_linked"] = (state.intervention, meta.name)  # this page's own choice: nothing to restore
        after = shared.run_capture(dataclasses.replace(spec, intervention=active), "intervened run")
    if after is not None:
        st.subheader(f"Before | after · {active.preset or 'custom'} on {len(active.heads())} heads")
        if meta.modality == "dit":
            st.info(f"{meta.name} draws a picture: here the attention maps are compared (averaged over the sampling "
                    "steps); the Diffusion (DiT) page shows the pictures before | after, with SoftPAG.")
        elif not meta.causal:
            st.warning(f"{meta.name} is an encoder: it does not generate, so only the attention maps are compared.")
        if st.session_state.get("iv_link_note"):
            st.caption(st.session_state["iv_link_note"])
        after_tokens = after.tokens[n_prompt:]
        diff = compare.token_diff(before_tokens, after_tokens)
        left_html, right_html = compare.token_diff_html(before_tokens, after_tokens)
        col_b, col_a = st.columns(2)
        with col_b:
            st.markdown("**Before** (baseline)")
            st.html(left_html)
        with col_a:
            st.markdown(f"**After** (`{active.key()}`)")
            st.html(right_html)
        if diff.first is None:
            st.success("The generated tokens are identical.")
        else:
            st.caption(f"The continuations part at generated token {diff.first} (outlined); struck-through tokens "
                       "left the baseline, green ones are new.")
        if meta.causal and before_tokens:
            lp_before, lp_after = scored(base, Intervention()), scored(base, active)
            st.metric("Log-prob of the baseline continuation", f"{lp_after.sum():.2f}",
                      f"{lp_after.sum() - lp_before.sum():+.2f} (before {lp_before.sum():.2f})")

if after is not None:
    shared_len = n_prompt + (diff.first if diff.first is not None else len(before_tokens))
    lo = max(0, shared_len - MAP_WINDOW)
    changed = compare.head_label(*most_changed(base, after, lo, shared_len))
    options = [changed] + [x for x in labels if x != changed]
    if st.session_state.get("iv_map_for") != (base.key, after.key):  # a new comparison: the head that moved most
        st.session_state["iv_map_for"] = (base.key, after.key)
        st.session_state["iv_map_head"] = changed
    with map_col:
        map_head = st.selectbox("Head map", options, key="iv_map_head",
                                format_func=lambda x: f"{x} (moved most)" if x == changed else x,
                                help="Starts on the head whose map moved most over the tokens both runs share.")
        layer, head = compare.parse_head_label(map_head)
        before_map = base.window(layer, head, lo, shared_len, lo, shared_len)  # reads (or computes) only these rows
        after_map = after.window(layer, head, lo, shared_len, lo, shared_len)
        shared.plotly_chart(lambda: compare.map_comparison(
            before_map, after_map, base.tokens[lo:shared_len], causal=meta.causal,
            title=f"{map_head}: tokens {lo}–{shared_len - 1} (shared by both runs)"), key="iv_maps",
            config=plot_config())
    if meta.causal and before_tokens:
        shared.plotly_chart(lambda: compare.logprob_figure(
            before_tokens, lp_before, lp_after, first_diff=diff.first,
            title="Log-prob of each baseline token (teacher-forced), before and after"), key="iv_logprob",
            config=plot_config())

# ---- saved interventions against the baseline ----------------------------------------------------
saved: dict[str, Intervention] = st.session_state.get("iv_saved", {})
if saved:
    st.subheader("Saved interventions")
    if st.button(f"Compare all {len(saved)} with the baseline", key="iv_compare_saved"):
        rows = []
        for label, iv in saved.items():
            run_ = shared.run_capture(dataclasses.replace(spec, intervention=iv), label)
            if run_ is None:
                continue
            d = compare.token_diff(before_tokens, run_.tokens[n_prompt:])
            delta = float(scored(base, iv).sum() - scored(base, Intervention()).sum()) if meta.causal and before_tokens else 0.0
            rows.append({"name": label, "preset": iv.preset or "custom", "heads": len(iv.heads()),
                         "first differing token": "-" if d.first is None else d.first,
                         "Δ log-prob (baseline text)": round(delta, 3), "key": iv.key(),
                         "continuation": run_.output.text[:120]})
        st.dataframe(rows, hide_index=True)
    else:
        st.caption(", ".join(f"{k} ({v.preset or 'custom'}, {len(v.heads())} heads)" for k, v in saved.items()))
