"""Intervene: toggle heads, pick a preset, rerun generation, and compare before | after.

Baseline = the current input (the sidebar's view state).  The intervened run is
`capture.run(RunSpec(..., intervention=...))`, cached on disk by the spec key, so the same
intervention is computed once and the loaded model is reused.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import streamlit as st

import capture
import probes
from analytics import METRICS
from capture import Intervention, InterventionError, presets, recall, remember
from charts import compare
from charts.theme import plot_config
from pages import shared
from state import MAX_NEW_TOKENS

MAP_WINDOW = 80  # tokens of the map comparison (the last ones of the shared prefix)


def scored(baseline, intervention: Intervention) -> np.ndarray:
    """Teacher-forced log-prob of the baseline continuation under `intervention` (kept per session)."""
    memo = st.session_state.setdefault("iv_logprobs", {})
    key = (baseline.key, intervention.key())
    if key not in memo:
        n_prompt = len(baseline.spans["prompt"])
        memo[key] = capture.continuation_logprobs(capture.load(baseline.spec.model), baseline.output.token_ids,
                                                  n_prompt, intervention).logprobs
    return memo[key]


def stored_scores(model: str, metric: str, **params):
    """A probe metric read from its stored result (default probe parameters), or None."""
    try:
        return METRICS[metric].compute(None, store=capture.default_store(), revision=capture.revision(model),
                                       model=model, **params)
    except Exception:  # noqa: BLE001 - absent or unreadable: the preset falls back to the chosen heads
        return None


# ---- baseline ------------------------------------------------------------------------------------
st.title("Interventions")
spec = shared.spec_of(shared.view_state())
if not spec.prompt.strip():
    st.error("The prompt is empty: type a prompt in the sidebar and press Run; this page then compares it "
             "with an intervened run.")
    shared.stop()
if spec.max_new_tokens == 0:
    n_new = st.number_input("Tokens to generate", 1, MAX_NEW_TOKENS, 24, key="iv_max_new",
                            help="The input is prefill-only; interventions are compared on a generated continuation.")
    spec = dataclasses.replace(spec, max_new_tokens=int(n_new))
spec = dataclasses.replace(spec, intervention=Intervention())
base = shared.run_capture(spec, "baseline")
if base is None:
    shared.stop()
meta = base.meta
if meta.modality == "dit":
    st.info(f"{meta.name} draws a picture: here the attention maps are compared (averaged over the sampling "
            "steps); the Diffusion (DiT) page shows the pictures before | after, with SoftPAG.")
elif not meta.causal:
    st.warning(f"{meta.name} is an encoder: it does not generate, so only the attention maps are compared.")
n_prompt = len(base.spans["prompt"])

# ---- heads and preset ----------------------------------------------------------------------------
labels = [compare.head_label(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)]
st.session_state["iv_heads"] = [x for x in st.session_state.get("iv_heads", []) if x in labels]


def toggle_from_grid() -> None:
    points = st.session_state["iv_grid"].selection.points
    if not points:
        return
    label = compare.head_label(int(round(points[0]["y"])), int(round(points[0]["x"])))
    chosen = list(st.session_state.get("iv_heads", []))
    st.session_state["iv_heads"] = [x for x in chosen if x != label] if label in chosen else chosen + [label]


left, right = st.columns([1.3, 1])
with right:
    picked = st.multiselect("Heads", labels, key="iv_heads", placeholder="click the grid or type L3H2",
                            help=f"Query heads; with GQA, {meta.group_size} heads share a KV head.")
    heads = [compare.parse_head_label(x) for x in picked]
    name = st.selectbox("Preset", list(presets.PRESETS), key="iv_preset",
                        format_func=lambda n: presets.PRESETS[n].title)
    preset = presets.PRESETS[name]
    default_heads = f"Without chosen heads: {preset.heads_default}." if preset.heads_default else "Acts on the chosen heads."
    st.caption(f"{preset.description} ({preset.paper}). {default_heads}")
    params = {}
    for prm in preset.params:
        key = f"iv_p_{name}_{prm.name}"
        if isinstance(prm.default, bool):
            params[prm.name] = st.checkbox(prm.name, value=prm.default, key=key, help=prm.help)
        elif isinstance(prm.default, int):
            high = int(min(prm.high, meta.n_layers * meta.n_heads)) if prm.name == "k" else int(prm.high)
            params[prm.name] = st.slider(prm.name, int(prm.low), high, min(int(prm.default), high),
                                         int(prm.step), key=key, help=prm.help)
        else:
            params[prm.name] = st.slider(prm.name, float(prm.low), float(prm.high), float(prm.default),
                                         float(prm.step), key=key, help=prm.help)
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
        st.warning(str(exc))
    if intervention is not None:
        st.caption(f"{len(intervention.edits)} edits on {len(intervention.heads())} heads · key `{intervention.key()}`")
    go_col, save_col = st.columns(2)
    with go_col:
        if st.button("Rerun with this intervention", type="primary", key="iv_run", disabled=intervention is None):
            st.session_state["iv_active"] = intervention
    with save_col:
        save_name = st.text_input("Save as", key="iv_save_name", placeholder="name", label_visibility="collapsed")
        if st.button("Save", key="iv_save", disabled=intervention is None or not save_name.strip()):
            st.session_state.setdefault("iv_saved", {})[save_name.strip()] = intervention
with left:
    st.plotly_chart(compare.head_grid(meta.n_layers, meta.n_heads, heads, title="Click heads to toggle"),
                    key="iv_grid", on_select=toggle_from_grid, selection_mode="points", config=plot_config())

# ---- link state: the active intervention travels by key ------------------------------------------
state = shared.view_state()
active: Intervention | None = st.session_state.get("iv_active")
if active is None and state.intervention != "none":
    active = recall(state.intervention)
    if active is None:
        st.warning("The linked intervention is not stored on this server; pick heads and a preset instead.")
if active is None or active.empty:
    st.info("Pick heads and a preset, then press Rerun to compare.")
    shared.stop()
state.intervention = remember(active)

# ---- before | after ------------------------------------------------------------------------------
after = shared.run_capture(dataclasses.replace(spec, intervention=active), "intervened run")
if after is None:
    shared.stop()
st.subheader(f"Before | after · {active.preset or 'custom'} on {len(active.heads())} heads")
before_tokens, after_tokens = base.tokens[n_prompt:], after.tokens[n_prompt:]
diff = compare.token_diff(before_tokens, after_tokens)
if diff.first is None:
    st.success("The generated tokens are identical.")
else:
    st.caption(f"The continuations part at generated token {diff.first} (outlined); struck-through tokens "
               "left the baseline, green ones are new.")
left_html, right_html = compare.token_diff_html(before_tokens, after_tokens)
col_b, col_a = st.columns(2)
with col_b:
    st.markdown("**Before** (baseline)")
    st.html(left_html)
with col_a:
    st.markdown(f"**After** (`{active.key()}`)")
    st.html(right_html)

if meta.causal and before_tokens:
    lp_before, lp_after = scored(base, Intervention()), scored(base, active)
    st.plotly_chart(compare.logprob_figure(before_tokens, lp_before, lp_after, first_diff=diff.first,
                                           title="Log-prob of the baseline continuation (teacher-forced)"),
                    key="iv_logprob", config=plot_config())
    st.caption(f"Total log-prob: before {lp_before.sum():.2f}, after {lp_after.sum():.2f} "
               f"(Δ {lp_after.sum() - lp_before.sum():+.2f}).")

edited = [compare.head_label(l, h) for l, h in active.heads()]
map_head = st.selectbox("Head map", edited + [x for x in labels if x not in edited], key="iv_map_head")
layer, head = compare.parse_head_label(map_head)
shared_len = n_prompt + (diff.first if diff.first is not None else len(before_tokens))
lo = max(0, shared_len - MAP_WINDOW)
before_map = base.window(layer, head, lo, shared_len, lo, shared_len)  # reads (or computes) only these rows
after_map = after.window(layer, head, lo, shared_len, lo, shared_len)
st.plotly_chart(compare.map_comparison(before_map, after_map, base.tokens[lo:shared_len], causal=meta.causal,
                                       title=f"{map_head}: tokens {lo}–{shared_len - 1} (shared by both runs)"),
                key="iv_maps", config=plot_config())

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
