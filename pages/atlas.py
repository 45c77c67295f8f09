"""Head atlas: any head metric as a layer x head map, per-token metrics over the text, and the long probes."""
import json

import numpy as np
import streamlit as st

import probes
from analytics import METRICS, ProbeMissing, importance
from capture import USER_ERRORS, default_store, load, revision
from charts import atlas as charts
from charts.theme import plot_config
from pages import shared

PER_TOKEN_BY_HEAD = {"act_sink"}  # token metrics shaped [layer, head, token]
GRANULAR = {"prev_token", "induction", "echo", "duplicate_token", "duo_gate"}  # query heads or KV heads

view = shared.view_state()
st.title("Head atlas")
capture = shared.current_capture()
model = view.model
if capture is not None and capture.spec.model != model:
    capture = None  # a capture of another model: probe results are per model
if capture is None:
    st.info("No capture of this model is loaded: one-pass metrics need a run (sidebar), probe metrics only the model.")
modality = capture.meta.modality if capture is not None else "text"
names = [n for n, m in METRICS.items() if modality in m.modalities]
if st.session_state.get("atlas_metric") not in names:
    linked = getattr(view, "metric", None)  # a shared link names the metric
    st.session_state["atlas_metric"] = linked if linked in names else names[0]
metric_name = st.selectbox("Metric", names, key="atlas_metric",
                           format_func=lambda n: f"{METRICS[n].title}{'  · probe' if METRICS[n].probe else ''}")
if view is not None and hasattr(view, "metric"):
    view.metric = metric_name
metric = METRICS[metric_name]
st.markdown(f"{metric.explanation}  \n*{metric.paper}*")


def _compute(name: str, params: dict) -> np.ndarray:
    """The metric's values for the current capture (one-pass) or model (probe results, read from the cache
    by the model's revision: the model itself is loaded only for the GQA group of a per-KV-head metric when
    no capture is loaded)."""
    entry = METRICS[name]

    def compute() -> np.ndarray:
        if entry.probe in (None, "hidden"):
            return entry.compute(capture, **params)
        where = {"store": default_store(), "revision": revision(model), "model": model}
        if capture is None and name in GRANULAR:
            where["group_size"] = load(model).meta.group_size
        return entry.compute(capture, **where, **params)

    key = (name, capture.key if capture is not None else model, json.dumps(params, sort_keys=True))
    return shared.memo("atlas_values", key, compute)


def _run_probe(probe: str, params: dict | None = None) -> None:
    if probe == "hidden":
        result = shared.run_with_progress(f"Residual stream of this capture of {model}", probes.hidden_states, capture)
    else:
        result = shared.run_with_progress(f"{probe} probe on {model}", probes.run_probe, probe, model, params or {})
    if result is None:
        return
    st.session_state.pop("atlas_values", None)
    st.rerun()


params: dict = {}
if metric_name in GRANULAR:
    kv = st.segmented_control("Granularity", ["head", "kv"], default="head", key="atlas_granularity",
                              format_func={"head": "query heads", "kv": "KV heads (max over the GQA group)"}.get,
                              help="RazorAttention and DuoAttention select per KV head (METHODS §10.2).")
    params["granularity"] = kv or "head"
if metric_name == "ablation":
    params["mode"] = st.segmented_control("Ablation", ["zero", "mean", "uniform"], default="zero", key="atlas_mode",
                                          help="zero: head output 0; mean: its mean output; uniform: uniform attention.") or "zero"

values = None
if metric.probe is None and capture is None:
    pass
else:
    try:
        with st.spinner(f"Computing {metric.title}…"):
            values = _compute(metric_name, params)
    except ProbeMissing as exc:
        st.warning(str(exc))
        if metric.probe is None or (metric.probe == "hidden" and capture is None):
            shared.stop()
        label = {"hidden": "Capture the residual stream"}.get(metric.probe, f"Run the {metric.probe} probe")
        if st.button(label, type="primary", key="atlas_run_missing"):
            _run_probe(metric.probe, {"mode": params["mode"]} if metric.probe == "ablation" else None)
    except USER_ERRORS as exc:  # a model that cannot be had, a cache that cannot be read
        st.error(str(exc))

config = plot_config(st.session_state.get("fig_format", "png"))
n_layers = values.shape[0] if values is not None and values.ndim >= 2 else (capture.meta.n_layers if capture else 1)
layer = int(st.session_state.get("atlas_layer", getattr(view, "layer", 0)) or 0)
head = int(st.session_state.get("atlas_head", getattr(view, "head", 0)) or 0)


def _pick() -> None:
    points = st.session_state["atlas_map"].selection.points
    if points:
        data = points[0]["customdata"]
        if isinstance(data, dict):  # the browser sends arrays as {"0": layer, "1": head}
            data = [data[k] for k in sorted(data, key=int)]
        st.session_state["atlas_layer"], st.session_state["atlas_head"] = int(data[0]), int(data[1])


if values is not None and metric.kind == "head":
    cols_name = "KV head" if params.get("granularity") == "kv" else "head"
    layer = min(max(layer, 0), values.shape[0] - 1)
    head = min(max(head, 0), values.shape[1] - 1)
    fig = charts.head_heatmap(values, title=metric.title, value_name=metric_name, threshold=metric.threshold,
                              selected=(layer, head), column=cols_name)
    st.plotly_chart(fig, key="atlas_map", on_select=_pick, selection_mode="points", config=config)
    left, right = st.columns(2)
    with left:
        v = values[layer, head]
        st.metric(f"Layer {layer}, {cols_name} {head}", "not measured" if not np.isfinite(v) else f"{v:.6g}")
        finite = values[np.isfinite(values)]
        if finite.size:
            rank = int((finite > v).sum()) + 1 if np.isfinite(v) else None
            st.caption(f"rank {rank} of {finite.size}" if rank else "")
    with right:
        top = importance.rank_heads(values)[:10]
        st.dataframe({"layer": [t[0] for t in top], cols_name: [t[1] for t in top],
                      metric_name: [round(t[2], 6) for t in top]}, hide_index=True, height=250)
    if view is not None and cols_name == "head":
        view.layer, view.head = layer, head
elif values is not None and metric.kind == "token":
    tokens = capture.tokens if capture is not None else [str(i) for i in range(values.shape[-1])]
    if metric_name in PER_TOKEN_BY_HEAD:
        c1, c2, c3 = st.columns([1, 1, 2])
        which = c3.segmented_control("Heads", ["one", "mean"], default="one", key="atlas_token_heads",
                                     format_func={"one": "selected head", "mean": "mean over heads"}.get) or "one"
        layer = c1.number_input("Layer", 0, values.shape[0] - 1, min(layer, values.shape[0] - 1), key="atlas_tl")
        head = c2.number_input("Head", 0, values.shape[1] - 1, min(head, values.shape[1] - 1), key="atlas_th")
        strip = values[layer, head] if which == "one" else values.reshape(-1, values.shape[-1]).mean(axis=0)
        title = f"{metric.title}: layer {layer}, head {head}" if which == "one" else f"{metric.title}: mean over heads"
    else:
        strip, title = values, metric.title
    st.plotly_chart(charts.token_strip(tokens, strip, title=title, value_name=metric_name, threshold=metric.threshold),
                    key="atlas_strip", config=config)
    with st.expander("Over the text", expanded=len(tokens) <= 400):
        st.html(charts.token_text(tokens, strip))

with st.expander("Long probes (need the model; results are cached per model)"):
    st.caption("Each runs once per model and parameters; the CLI equivalent is `python -m headscope probe NAME --model "
               f"{model}`.")
    cols = st.columns(3)
    long_probes = [("patterns", "Repeated random tokens (~seconds)"), ("needle", "Needle in a haystack (~minutes)"),
                   ("ablation", "Ablate every head (~1-2 min)"), ("gradient", "Gradient importance (~seconds)"),
                   ("duo", "Mini DuoAttention (~2 min)"), ("hidden", "Residual stream of this capture")]
    for i, (probe, label) in enumerate(long_probes):
        disabled = probe == "hidden" and capture is None
        if cols[i % 3].button(label, key=f"atlas_probe_{probe}", disabled=disabled, width="stretch"):
            _run_probe(probe, {"mode": params.get("mode", "zero")} if probe == "ablation" else None)
