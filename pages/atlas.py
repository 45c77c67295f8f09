"""Head atlas: any head metric as a layer x head map, per-token metrics over the text, and the long probes."""
import json

import numpy as np
import streamlit as st

import probes
from analytics import METRICS, ProbeMissing, importance
from capture import USER_ERRORS, default_store, load, revision
from charts import atlas as charts
from charts.pictures import metric_grid
from charts.theme import plot_config
from core.probe_results import CAPTURE_PROBES
from pages import shared
from pages.widgets import picture

PER_TOKEN_BY_HEAD = {"act_sink"}  # token metrics shaped [layer, head, token]
GRANULAR = {"prev_token", "induction", "echo", "duplicate_token", "duo_gate"}  # query heads or KV heads
# what each probe ran on (core.probe_results: the defaults), said next to its map
PROBE_INPUTS = {
    "patterns": "a built-in probe: BOS + 64 random tokens repeated 3 times (RazorAttention's probe, shortened); "
                "scores read where a token repeats",
    "needle": "a built-in sweep: 15 needle-in-a-haystack tests (haystacks of 256, 512 and 1,024 tokens of "
              "assets/haystack.txt, needles at depths 0-100 %, assets/needles.json), greedy answers of up to 24 tokens",
    "gradient": "a built-in text: 4 chunks of 128 tokens of assets/haystack.txt, mean next-token loss",
    "duo": "built-in synthetic passkeys: 2 passkeys of 8 words in 256-token contexts, 24 optimisation steps",
}
# seconds per unit of each probe on the reference machine (2 CPU cores; pages/shared.Estimate)
PROBE_COST = {"patterns": (1, "forward pass", 3.0), "needle": (15, "needle tests", 12.0),
              "gradient": (4, "texts", 2.5), "duo": (24, "optimisation steps", 5.0), "hidden": (1, "forward pass", 3.0),
              "dla": (1, "forward pass", 3.0)}
ABLATION_EACH_S = 0.5  # one head ablated: one row of a batched forward over 128 tokens

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


def _estimate(probe: str) -> shared.Estimate:
    """How long `probe` takes on this model: its units x the measured time per unit."""
    if probe == "ablation":
        heads = capture.meta.n_layers * capture.meta.n_heads if capture is not None else 270
        return shared.Estimate(f"ablation {model}", heads, "heads ablated", ABLATION_EACH_S, fixed_s=3.0)
    units, unit, each = PROBE_COST[probe]
    return shared.Estimate(f"{probe} {model}", units, unit, each, fixed_s=3.0)


def _run_probe(probe: str, params: dict | None = None) -> None:
    if probe == "hidden":
        result = shared.run_with_progress(f"Residual stream of this capture of {model}", probes.hidden_states, capture,
                                          estimate=_estimate(probe))
    else:
        if probe in CAPTURE_PROBES:  # a probe of this capture's tokens, named by its key
            params = dict(params or {}, capture=capture.key)
        result = shared.run_with_progress(f"{probe} probe on {model}", probes.run_probe, probe, model, params or {},
                                          estimate=_estimate(probe))
    if result is None:
        return
    shared.forget("atlas_values")
    st.rerun()


params: dict = {}
if metric_name in GRANULAR:
    kv = st.segmented_control("Granularity", ["head", "kv"], default="head", key="atlas_granularity",
                              format_func={"head": "query heads", "kv": "KV heads (max over the GQA group)"}.get,
                              help="RazorAttention and DuoAttention select per KV head (METHODS §10.2).")
    params["granularity"] = kv or "head"
if metric_name == "ablation":
    c1, c2 = st.columns([1, 1.4])
    params["mode"] = c1.segmented_control(
        "Ablation", ["zero", "mean", "uniform"], default="zero", key="atlas_mode",
        help="zero: head output 0; mean: its mean output; uniform: uniform attention.") or "zero"
    own = capture is not None and capture.meta.modality == "text" and len(capture.spans.get("prompt", ())) >= 4
    scored_on = c2.segmented_control("Scored text", ["builtin", "prompt"], default="builtin", key="atlas_ablation_on",
                                     format_func={"builtin": "built-in text", "prompt": "this prompt"}.get,
                                     disabled=not own, help="Built-in: the first 128 tokens of assets/haystack.txt, "
                                     "its last 32 scored. This prompt: the sidebar's prompt, its second half scored "
                                     "(or the target below).") or "builtin"
    if scored_on == "prompt" and own:
        target = st.text_input("Target (optional): text appended to the prompt and scored instead", key="atlas_target")
        n_prompt = len(capture.spans["prompt"])
        params.update(prompt=capture.spec.prompt, target=target, score_last=max(1, min(32, n_prompt // 2)))
if metric.probe in PROBE_INPUTS:
    st.caption(f"Ran on {PROBE_INPUTS[metric.probe]}, not on the sidebar's prompt.")
elif metric_name == "ablation" and params.get("prompt"):
    scored = f"the target “{params['target']}”" if params.get("target") else \
        f"its last {params['score_last']} tokens"
    st.caption(f"Ran on the sidebar's prompt (“{params['prompt'][:80]}”), scoring {scored}.")
elif metric_name == "ablation":
    st.caption("Ran on a built-in text: the first 128 tokens of assets/haystack.txt, scoring the log-prob of its "
               "last 32 tokens; pick “this prompt” to score your own.")

values = None
if metric.probe is None and capture is None:
    pass
else:
    try:
        with st.spinner(f"Computing {metric.title}…"):
            values = _compute(metric_name, params)
    except ProbeMissing as exc:
        st.warning(str(exc))
        if metric.probe is None or (metric.probe in CAPTURE_PROBES and capture is None):
            shared.stop()
        label = {"hidden": "Capture the residual stream",
                 "dla": "Run direct logit attribution on this capture"}.get(metric.probe, f"Run the {metric.probe} probe")
        if metric.probe in PROBE_COST or metric.probe == "ablation":
            st.caption(f"It takes {_estimate(metric.probe).text()}.")
        if st.button(label, type="primary", key="atlas_run_missing"):
            _run_probe(metric.probe, {k: v for k, v in params.items() if k != "granularity"}
                       if metric.probe == "ablation" else None)
    except USER_ERRORS as exc:  # a model that cannot be had, a cache that cannot be read
        st.error(str(exc))

config = plot_config(st.session_state.get("fig_format", "png"))
n_layers = values.shape[0] if values is not None and values.ndim >= 2 else (capture.meta.n_layers if capture else 1)
layer = int(st.session_state.get("atlas_layer", getattr(view, "layer", 0)) or 0)
head = int(st.session_state.get("atlas_head", getattr(view, "head", 0)) or 0)


def _pick(row: int, col: int) -> None:
    st.session_state["atlas_layer"], st.session_state["atlas_head"] = row, col


if values is not None and metric.kind == "head":
    cols_name = "KV head" if params.get("granularity") == "kv" else "head"
    layer = min(max(layer, 0), values.shape[0] - 1)
    head = min(max(head, 0), values.shape[1] - 1)
    grid = metric_grid(values, title=f"{metric.title}: click a head", value_name=metric_name,
                       threshold=metric.threshold, col_name=cols_name, aspect=3.0)
    left, right = st.columns([1.25, 1], gap="medium")
    with left:
        picture(grid, key="atlas_map", on_pick=_pick, outline=(layer, layer + 1, head, head + 1), min_cell_px=10,
                max_cell_px=18, cell_ratio=3.0)
    with right:
        v = values[layer, head]
        st.metric(f"Layer {layer}, {cols_name} {head}", "not measured" if not np.isfinite(v) else f"{v:.6g}")
        finite = values[np.isfinite(values)]
        if finite.size:
            rank = int((finite > v).sum()) + 1 if np.isfinite(v) else None
            st.caption(f"rank {rank} of {finite.size}" if rank else "")
        shared.plotly_chart(charts.layer_profile(values, title="Through the layers", value_name=metric_name,
                                                 threshold=metric.threshold, column=cols_name),
                            key="atlas_profile", config=config)
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
    shared.plotly_chart(lambda: charts.token_strip(tokens, strip, title=title, value_name=metric_name,
                                                   threshold=metric.threshold), key="atlas_strip", config=config)
    with st.expander("Over the text", expanded=len(tokens) <= 400):
        st.html(charts.token_text(tokens, strip))

with st.expander("Long probes (need the model; results are cached per model)"):
    st.caption("Each runs once per model and parameters; the CLI equivalent is `python -m headscope probe NAME --model "
               f"{model}`.")
    cols = st.columns(3)
    long_probes = [("patterns", "Repeated random tokens"), ("needle", "Needle in a haystack"),
                   ("ablation", "Ablate every head"), ("gradient", "Gradient importance"),
                   ("duo", "Mini DuoAttention"), ("hidden", "Residual stream of this capture")]
    for i, (probe, label) in enumerate(long_probes):
        disabled = probe == "hidden" and capture is None
        took = shared.duration(_estimate(probe).seconds())
        runs_on = PROBE_INPUTS.get(probe, "this capture" if probe == "hidden" else "the built-in text")
        if cols[i % 3].button(f"{label} (~{took})", key=f"atlas_probe_{probe}", disabled=disabled, width="stretch",
                              help=f"Runs on {runs_on}."):
            _run_probe(probe, {"mode": params.get("mode", "zero")} if probe == "ablation" else None)
