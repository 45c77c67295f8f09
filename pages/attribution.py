"""Attribution: which heads made this token.  Direct logit attribution, activation patching between a clean
and a corrupted prompt, the head graph of the prediction, and path patching from a chosen head (issue 24).

The view (both prompts, the answer and foil tokens, the metric, the direction, the selected head and the
path-patching receivers) lives in ViewState, so a link reproduces it.  Captures of both prompts give the
tokens and the maps; the probes (probes.dla, probes.patching) are cached per model and parameters.  A VLM,
shapes-dit or a vision model is handed over to pages/attribution_pictures.py (patching between two pictures or
two prompts).
"""
import streamlit as st

import capture
import probes
from analytics import ProbeMissing, attribution
from charts import attribution as charts
from charts.attention import token_highlight_html
from charts.theme import plot_config
from pages import shared
from pages.widgets import signed_head_map
from state import MAX_LINK_PROMPT, ViewState

state = shared.view_state()
st.title("Attribution: which heads made this token")
shared.show_link_warnings()
model = state.model
if shared.modality_of(model) != "text":  # a VLM, shapes-dit or a vision model: patching between two inputs
    from pages import attribution_pictures

    attribution_pictures.render(state)
    shared.stop()
st.caption("Direct logit attribution: each head's direct push on the answer's logit, through the final norm with its "
           "scale frozen from the run (Elhage et al. 2021). Activation patching: a head's output copied from the clean "
           "run into the corrupted one (denoise) or back (noise), and how much of the metric it moves "
           "(Wang et al. 2022, IOI). Path patching: a chosen head's effect through the queries, keys or values of "
           "later heads only.")


def load_ioi() -> None:
    defaults = ViewState()
    shared.set_fields(clean=defaults.clean, corrupted=defaults.corrupted, target=defaults.target, foil=defaults.foil,
                      measure="logit_diff")


left, right = st.columns(2)
with left:
    shared.bind("clean", st.text_area, "Clean prompt", height=80, max_chars=MAX_LINK_PROMPT,
                help="The prompt whose answer you want to explain.")
with right:
    shared.bind("corrupted", st.text_area, "Corrupted prompt", height=80, max_chars=MAX_LINK_PROMPT,
                help="The same number of tokens, a word or two changed so the answer changes.")
cols = st.columns([1, 1, 2, 2.4])
with cols[0]:
    shared.bind("target", st.text_input, "Answer token", help="One token, with its leading space: ' Mary'.")
with cols[1]:
    shared.bind("foil", st.text_input, "Foil token", disabled=state.measure == "prob",
                help="The metric is logit(answer) − logit(foil); unused for the probability.")
with cols[2]:
    shared.bind("measure", st.segmented_control, "Metric", ["logit_diff", "prob"], required=True,
                format_func={"logit_diff": "logit diff", "prob": "probability"}.get)
with cols[3]:
    shared.bind("direction", st.segmented_control, "Patching", ["denoise", "noise"], required=True,
                format_func={"denoise": "clean → corrupted", "noise": "corrupted → clean"}.get,
                help="denoise: clean head outputs into the corrupted run (what restores the answer); noise: "
                     "corrupted outputs into the clean run (what breaks it).")
st.button("IOI example", on_click=load_ioi,
          help="When Mary and John went to the store, John gave a drink to → ' Mary' vs ' John'.")

clean = shared.run_capture(capture.RunSpec(model=model, prompt=state.clean), "clean prompt")
corrupted = shared.run_capture(capture.RunSpec(model=model, prompt=state.corrupted), "corrupted prompt")
if clean is None or corrupted is None:
    shared.stop()
meta = clean.meta
if meta.family not in attribution.TEXT_FAMILIES or not meta.causal:
    st.info(f"Attribution knows the causal LMs {', '.join(attribution.TEXT_FAMILIES)}; {meta.name} ({meta.family}) "
            "is not one of them (the patching probe alone runs on any causal LM: `python -m headscope probe "
            "patching --model ...`).")
    shared.stop()
n = clean.n_tokens
differs = [i for i, (a, b) in enumerate(zip(clean.output.token_ids, corrupted.output.token_ids)) if a != b]
st.html(charts.token_pair_html(clean.tokens, corrupted.tokens, differs))
if corrupted.n_tokens != n:
    st.error(f"The clean prompt is {n} tokens and the corrupted one {corrupted.n_tokens}; patching needs the same "
             "number of tokens in both (swap words for words of as many tokens).")
    shared.stop()
if not differs:
    st.error("The clean and corrupted prompts are the same tokens; change a word of the corrupted one.")
    shared.stop()
for warning in state.clamp(meta.n_layers, meta.n_heads, n):
    st.warning(warning)
layer, head = state.layer, state.head
where = {"store": capture.default_store(), "revision": capture.revision(model), "model": model}
foil = state.foil if state.measure == "logit_diff" else ""
patch_params = {"clean": state.clean, "corrupted": state.corrupted, "target": state.target, "foil": foil,
                "metric": state.measure, "direction": state.direction}


def stored(read, *args, **params):
    """A stored probe result through analytics' reader, or None when absent."""
    try:
        return read(*args, **where, **params)
    except ProbeMissing:
        return None


def pick(key: str) -> None:
    """A click on a head graph's node selects that head (customdata [layer, head, ...]; head -1: an MLP)."""
    points = st.session_state[key].selection.points
    if points:
        data = points[0].get("customdata")
        if isinstance(data, dict):  # the browser sends arrays as {"0": layer, "1": head}
            data = [data[k] for k in sorted(data, key=int)]
        if data and int(data[1]) >= 0:
            shared.set_fields(layer=int(data[0]), head=int(data[1]))


def pick_cell(row: int, col: int) -> None:
    """A click on a map's cell (layer, head) selects that head."""
    shared.set_fields(layer=row, head=col)


def head_map(values, title: str, value_name: str, key: str, clickable: bool = True) -> None:
    """values  # [layer, head], signed, the selected head framed; a click selects a head."""
    signed_head_map(values, title, value_name, key, (layer, head), pick_cell if clickable else None)


config = plot_config(st.session_state.get("fig_format", "png"))
dla = stored(attribution.read_dla, clean, target=state.target, foil=foil)
if dla is None:  # about a second: computed at once
    result = shared.run_with_progress("Direct logit attribution", probes.run_probe, "dla", model,
                                      {"capture": clean.key, "target": state.target, "foil": foil})
    if result is None:
        shared.stop()
    dla = attribution.DLA(result)
dla_heads, terms = dla.heads(), dla.terms()
patching = stored(attribution.read_patching, **patch_params)
unit = "logit difference" if state.measure == "logit_diff" else "probability"

# ---- before | after --------------------------------------------------------------------------------
st.subheader(f"Layer {layer}, head {head}")
before, after, moved, link = st.columns([1, 1, 1.2, 1.2])
if patching is not None:
    name = {"denoise": "corrupted", "noise": "clean"}[state.direction]
    base = patching.corrupted if state.direction == "denoise" else patching.clean
    before.metric(f"{name} run", f"{base:.4g}", help=f"The {unit} at the last token.")
    after.metric(f"L{layer} H{head} patched", f"{patching.patched[layer, head]:.4g}",
                 delta=f"{patching.patched[layer, head] - base:+.4g}", help=f"The {unit} with this head patched.")
    moved.metric("share of the gap", f"{patching.effect[layer, head]:.1%}",
                 help="Of the clean − corrupted gap: denoise, restored; noise, destroyed (Wang et al. 2022).")
else:
    before.metric("clean run", f"{terms['logit']:.4g}", help=f"The {unit} at the last token.")
    after.metric(f"L{layer} H{head} writes directly", f"{dla_heads[layer, head]:+.4g}")
if link.button(f"Open L{layer} H{head} in the explorer", key="attr_open", icon=":material/search:", width="stretch",
               help="Its map on the clean prompt (the explorer shows the view's prompt: it becomes the clean one)."):
    state.prompt, state.key, state.chat, state.max_new_tokens = state.clean, "", False, 0
    shared.set_fields(view="head")
    st.switch_page("pages/explorer.py")
with st.expander(f"What L{layer} H{head} reads at the answer position: corrupted | clean", expanded=True):
    pos = n - 1
    st.html(token_highlight_html(corrupted.tokens, corrupted.row(layer, pos)[head], pos, "corrupted"))
    st.html(token_highlight_html(clean.tokens, clean.row(layer, pos)[head], pos, "clean"))

dla_tab, patch_tab, graph_tab, path_tab = st.tabs(["Direct logit attribution", "Activation patching", "Head graph",
                                                   "Path patching"])
with dla_tab:
    answer = dla.result.summary.get("answer", state.target)
    what = f"logit difference {state.target!r} − {foil!r}" if foil else f"logit of {answer!r}"
    st.caption(f"Each head's term in the {what} at the last token. The terms sum to the model's own "
               f"{terms['logit']:.4g} (to {dla.result.summary['sum_error']:.1g}): the final norm's scale is frozen at "
               "its value in this run, so a term is a head's direct contribution, not what removing the head would "
               "change.")
    head_map(dla_heads, "DLA per head: click a head", f"DLA ({'logit difference' if foil else 'logit'})",
             "attr_dla")
    shared.plotly_chart(lambda: charts.layer_terms(dla_heads, terms["mlps"], terms["embed"], terms["bias"],
                                                   "Where the answer is written"),
                        key="attr_terms", config=config)

with patch_tab:
    if patching is None:
        st.info(f"Patch each of the {meta.n_layers * meta.n_heads} heads alone ({state.direction}); batched, a few "
                "seconds to a minute on a CPU, then cached.")
        if st.button("Run activation patching", type="primary", key="attr_run_patching"):
            if shared.run_with_progress("Activation patching", probes.run_probe, "patching", model, patch_params):
                st.rerun()
    else:
        agree = attribution.rank_agreement(dla_heads, patching.effect)
        st.caption(f"{unit}: clean {patching.clean:.4g}, corrupted {patching.corrupted:.4g}. Rank agreement with DLA: "
                   f"Spearman ρ = {agree['spearman']:.2f}; {agree['top_overlap']:.0%} of DLA's top {agree['k']} heads "
                   f"are among patching's top {agree['k']}.")
        verb, done = ("restores", "restored") if state.direction == "denoise" else ("destroys", "destroyed")
        head_map(patching.effect, f"Share of the gap each head {verb}: click a head", f"share of the gap {done}",
                 "attr_patch")

with graph_tab:
    size_by = st.segmented_control("Size nodes by", ["dla", "patching"], default="dla", key="attr_graph_by",
                                   format_func={"dla": "DLA", "patching": "patching effect"}.get,
                                   disabled=patching is None) or "dla"
    scores = patching.effect if size_by == "patching" and patching is not None else dla_heads
    mlps = terms["mlps"] if size_by == "dla" else None
    path = stored(attribution.read_patching, **patch_params, sender=(layer, head), receivers=state.receivers)
    graph = attribution.head_graph(scores, n - 1, clean.tokens, lambda l, h: clean.row(l, n - 1)[h], mlps=mlps,
                                   paths={(layer, head): path.effect} if path is not None else None)
    st.caption("The components with the largest attribution at the last token (red up, blue down), the tokens each "
               "head reads there (grey: attention × |attribution|) and, after path patching, the later heads the "
               "selected head drives (orange). Click a head to select it.")
    shared.plotly_chart(lambda: charts.graph_figure(graph, meta.n_layers, n, (layer, head),
                                                    "DLA" if size_by == "dla" else "effect"),
                        key="attr_graph", on_select=lambda: pick("attr_graph"), selection_mode="points", config=config)

with path_tab:
    shared.bind("receivers", st.segmented_control, "Receivers' input", ["q", "k", "v"], required=True,
                format_func={"q": "queries", "k": "keys", "v": "values"}.get)
    if layer == meta.n_layers - 1:
        st.info("The selected head is in the last layer: no later head can receive from it. Select an earlier head.")
    elif path is None:
        st.info(f"Sender L{layer} H{head}: its {state.direction} output reaches only the {state.receivers} input of "
                "each later head, every other head frozen (Wang et al. 2022, Appendix B).")
        if st.button("Run path patching", type="primary", key="attr_run_path"):
            if shared.run_with_progress("Path patching", probes.run_probe, "patching", model,
                                        dict(patch_params, sender=(layer, head), receivers=state.receivers)):
                st.rerun()
    else:
        done = "restored" if state.direction == "denoise" else "destroyed"
        head_map(path.effect, f"L{layer} H{head} → later heads' {state.receivers}: share of the gap {done} via each",
                 f"share of the gap {done}", "attr_path", clickable=False)
        st.caption(f"Each later head with L{layer} H{head}'s {state.direction} output reaching only its "
                   f"{state.receivers} input. Grey: layers up to the sender's, which it cannot reach.")
