"""Diffusion transformer view: a prompt sampled by shapes-dit, its joint attention per step, word
heatmaps per head, RefAM sink tokens, a head grounding table, and before | after pictures of SoftPAG /
PAG guidance, scaled (masked) heads or attention redistributed away from sink tokens.

Thin: the capture front door for the captures (cached), analytics.dit for the numbers, charts.dit for
the figures.  Widget keys start with "dit_".
"""
import numpy as np
import streamlit as st

import probes
from analytics import dit as analytics
from capture import RunSpec, dit_capture, dit_presets, recall, remember
from charts import dit as charts
from charts.dit_words import word_maps
from charts.pictures import photo
from charts.theme import plot_config
from pages import dit_patch, dit_summary, shared
from pages.widgets import picture

STEP_S = 1.0  # seconds per recorded sampling step of shapes-dit on 2 CPU cores, with the perturbed branch
# capture.dit.families' names as the caption says them
TITLES = {"sd3": "Stable Diffusion 3", "flux": "Flux", "flux2": "FLUX.2 [klein]", "flux2dev": "FLUX.2 [dev]",
          "chroma": "Chroma", "pixart": "PixArt", "sana": "Sana", "qwenimage": "Qwen-Image", "cogview4": "CogView 4",
          "auraflow": "AuraFlow", "hunyuandit": "HunyuanDiT", "lumina2": "Lumina 2", "zimage": "Z-Image"}

st.title("Diffusion transformer")
state = shared.view_state()
capture = shared.current_capture()
shared.show_link_warnings()
shared.status_line(capture)
if capture is None or not dit_capture.is_dit(capture):
    st.info("Pick a diffusion transformer in the sidebar (shapes-dit is embedded) to see its attention.")
    shared.stop()
MODEL = capture.spec.model
prompt, seed, steps = capture.spec.prompt, capture.spec.seed, capture.spec.steps
if MODEL == "shapes-dit":
    st.caption("shapes-dit: a small MM-DiT (SD3-style joint attention) HeadScope trained on 32 x 32 pictures of "
               "coloured shapes, conditioned on MiniLM. Prompts read like “a red circle at the top left and a "
               "blue square at the center” (colours red, orange, yellow, green, blue, purple; circle, square, "
               "triangle; a 3 x 3 grid of positions). Prompt, seed and steps are in the sidebar.")
else:
    title = TITLES.get(capture.meta.family, capture.meta.family)
    st.caption(f"{MODEL}: a {title} diffusion pipeline, {capture.meta.n_layers} layers x "
               f"{capture.meta.n_heads} heads, {capture.meta.grid[1]} x {capture.meta.grid[0]} image patches. Prompt, "
               "seed, steps and picture size are in the sidebar.")


meta = capture.meta
image = dit_capture.generated_image(capture)
timesteps = capture.output.timesteps
n_steps = len(timesteps)
col_img, col_ctl = st.columns([1, 2])
with col_img:  # the picture first: it paints while the maps below are worked out
    picture(photo(image, f"seed {seed}, {n_steps} steps"), key="dit_picture", min_cell_px=200, max_cell_px=256)
grid = meta.grid
raw_tokens = dit_capture.text_tokens(capture)  # the tokenizer's: analytics reads word boundaries from them
tokens = [dit_capture.word_label(t) for t in raw_tokens]  # as shown: "red", not "red</w>"
positions = dit_capture.column_positions(capture)  # text column i stands for these capture positions
column_of = {p: c for c, ps in enumerate(positions) for p in ps}
masks = analytics.object_masks(image, prompt, raw_tokens)  # the objects a scene caption's words name
with col_ctl:
    summary = dit_summary.summary(capture, masks)  # every step's word maps, read once (a real pipeline's: GBs)
if summary is None:
    shared.stop()
word_heads = summary.daam.shape[1]  # the word maps' heads (Sana's cross-attention has its own count)
stats = summary.stats  # RefAM's, a grouped padding run judged as its average token
attended = np.flatnonzero(stats.attended)  # the text columns some image query reads (not masked padding)
column_label = lambda i: f"{i}:{tokens[i]}"  # noqa: E731  a text column as the token lists name it

if not 0 <= state.step < n_steps:
    shared.set_fields(step=n_steps // 2)
if not -1 <= state.layer < meta.n_layers:
    shared.set_fields(layer=-1)
if not -1 <= state.head < word_heads:
    shared.set_fields(head=-1)
with col_ctl:
    all_steps = shared.bind("all_steps", st.checkbox, "Average over all steps (DAAM)")
    step = shared.bind("step", st.slider, "Sampling step", 0, n_steps - 1, disabled=all_steps,
                       help="0 is the first step (pure noise); the timestep falls from 1000 to 0.")
    if not all_steps:
        st.caption(f"step {step}: timestep {timesteps[step]:.0f}")
    layer = shared.bind("layer", st.selectbox, "Layer", list(range(-1, meta.n_layers)),
                        format_func=lambda l: "mean of layers" if l == -1 else f"layer {l}")
    head = shared.bind("head", st.selectbox, "Heads shown", list(range(-1, word_heads)),
                       format_func=lambda h: "mean of heads" if h == -1 else f"head {h}")
    shared.held("dit_every_head", False)
    every = st.checkbox("Every head too", key="dit_every_head", disabled=head != -1,
                        help="One row of word maps per head under the mean.")
    show_padding = st.checkbox("Show special and padding tokens", value=False, key="dit_padding",
                               help="Masked padding (PixArt's, Sana's) receives no attention and is never shown.")
    for note in capture.output.notes:
        st.info(note)

steps_sel = None if all_steps else [step]
layers_sel = None if layer == -1 else [layer]
a = summary.daam[None] if all_steps else dit_capture.image_to_text(capture, step)  # [1, layer, head, image, text]
h = analytics.word_heatmaps(a if layers_sel is None else a[:, layers_sel], grid)  # [1, layer, head, text, rows, cols]
if layers_sel is not None and not a[:, layers_sel].any():  # an image-only or caption-only layer: no word maps
    st.info(f"Layer {layer} reads within the picture or within the caption only (a refiner, or SD3.5's extra "
            "self-attention): its picture reads no words, so its word heatmaps are empty. Pick another layer, or all.")
per_head = h.mean(axis=(0, 1))  # [head, text, rows, cols]
mean_heads = per_head.mean(0, keepdims=True)
words = attended.tolist() if show_padding else dit_capture.word_columns(capture)
if head == -1:
    panels = (np.concatenate([mean_heads, per_head]) if every else mean_heads)[:, words]  # [row, word, rows, cols]
    row_names = ["mean"] + ([f"head {i}" for i in range(word_heads)] if every else [])
else:
    panels = per_head[head : head + 1, words]  # [1, word, rows, cols]
    row_names = [f"head {head}"]
segments = {k: r for k, r in capture.spans.items()
            if k not in ("image", "text", "prompt", "padding", "registers", "system")}


def encoder_of(column: int) -> str:
    """" · T5" after a word when the text has several encoders' segments (SD3: CLIP's, then T5's), else ""."""
    if len(segments) < 2:
        return ""
    return next((f" · {name.upper()}" for name, span in segments.items() if positions[column][0] in span), "")


word_names = [tokens[i] + encoder_of(i) + (" (sink)" if stats.global_sink[i] else "") for i in words]
shared.plotly_chart(lambda: word_maps(image, panels, word_names, row_names, title="Word heatmaps: where the picture "
                                      "reads each word (each panel scaled to its own max)"),
                    key="dit_words", config=plot_config())
st.caption("Hover a panel for its largest attention weight. “(sink)”: a RefAM global sink, read from everywhere.")

# a link that names an intervention opens on its before | after (decided once, on the page's first run)
st.session_state.setdefault("dit_open_tab", "Intervene" if state.intervention != "none" else None)
tab_sinks, tab_ground, tab_patch, tab_pag = st.tabs(
    ["Sink tokens (RefAM)", "Head grounding", dit_patch.TAB, "Intervene"], default=st.session_state["dit_open_tab"])
with tab_sinks:
    sel = np.s_[:] if steps_sel is None else steps_sel
    mean = stats.mean[sel].mean(axis=(0, 1, 2))
    cv = stats.cv[sel].mean(axis=(0, 1, 2))
    shared.plotly_chart(charts.sink_chart([tokens[i] for i in attended], mean[attended], cv[attended],
                                          stats.share[attended], stats.global_sink[attended],
                                          title="Received attention per text token (red: global sink)",
                                          columns=attended.tolist()),
                        key="dit_sinks", config=plot_config())
    grouped = [column_label(i) for i in attended if len(positions[i]) > 1]
    if grouped:
        st.caption(f"{', '.join(grouped)}: a run of padding tokens stored as one column; charted as its average token.")
    if len(attended) < len(tokens):
        st.caption(f"{len(tokens) - len(attended)} masked tokens (the text encoder's padding, which the model's "
                   "attention mask hides) receive no attention and are not charted.")
    over_steps = stats.mean.mean(axis=(1, 2))  # [step, text]: each token's received attention, step by step
    shown_cols = [i for i in range(len(tokens)) if stats.global_sink[i]][:4] + words[:4]
    shared.plotly_chart(lambda: charts.timestep_profile(
        list(timesteps), over_steps[:, shown_cols].T, [column_label(i) for i in shown_cols],
        selected=None if all_steps else step, title="Received attention through sampling (sinks and the first words)",
        label="mean attention from image"), key="dit_profile", config=plot_config())
    flagged = [f"{i}:{t}" for i, t in enumerate(tokens) if stats.global_sink[i]]
    st.write("Global sinks: " + (", ".join(flagged) if flagged else "none") +
             f". A sink gets at least {analytics.SINK_RATIO:g} x the median token's attention, spread evenly "
             f"(CV <= {analytics.SINK_CV_MAX:g}), in at least {analytics.SINK_SHARE:.0%} of the maps. "
             "RefAM discards such tokens before aggregating heatmaps.")

with tab_ground:
    if not masks:
        st.info("Grounding needs a scene caption whose objects appear in the picture "
                "(e.g. “a green triangle at the center”).")
    else:
        ground = summary.grounding
        metric = st.radio("Score", ["auroc", "iou"], horizontal=True, key="dit_ground_metric",
                          format_func=lambda m: {"auroc": "AUROC", "iou": "top-k IoU"}[m])
        scores = ground.score(metric, steps_sel)
        shared.plotly_chart(charts.grounding_chart(scores, title="How well each head's word maps find the objects",
                                                   label=metric.upper()), key="dit_ground", config=plot_config())
        ranked = analytics.rank_heads(scores)
        st.dataframe({"layer": [r[0] for r in ranked], "head": [r[1] for r in ranked],
                      metric.upper(): [round(r[2], 3) for r in ranked]}, hide_index=True, key="dit_ground_table")
        st.caption("Words scored: " + ", ".join(tokens[w] for w in ground.words) +
                   ". Ground truth: the largest blob of each object's colour in the generated picture.")

with tab_patch:
    dit_patch.render(capture, image, a, tokens, words, None if all_steps else step, layer, head)

with tab_pag:
    labels = [f"L{l}H{h}" for l in range(meta.n_layers) for h in range(meta.n_heads)]
    plain_words = set(dit_capture.word_columns(capture))
    # RefAM's sinks, else end and padding tokens; masked tokens (read by nobody) are no choice
    sinks = [int(i) for i in np.flatnonzero(stats.global_sink)] or \
        [int(i) for i in attended if i >= 1 and i not in plain_words]
    token_labels = [column_label(i) for i in attended]
    held = st.session_state.get("dit_sink_tokens")
    if held is None or any(x not in token_labels for x in held):  # first render, or another prompt's tokens
        st.session_state["dit_sink_tokens"] = [column_label(i) for i in sinks]
    if "dit_pag_heads" not in st.session_state:  # first render: the link's intervention if it names one
        linked = recall(state.intervention)
        st.session_state["dit_linked_iv"] = linked.key() if linked is not None else ""
        heads_in_link = [f"L{l}H{h}" for l, h in linked.heads() if f"L{l}H{h}" in labels] if linked else []
        st.session_state["dit_pag_heads"] = heads_in_link or [x for x in ["L1H0"] if x in labels]
        if linked is not None and dit_presets.is_guidance(linked):
            st.session_state["dit_pag_u"] = min(max(float(linked.edits[0].value), 0.0), 1.0)
            st.session_state["dit_pag_s"] = min(max(dit_presets.pag_scale(linked), 0.0), 6.0)
        elif linked is not None and linked.preset in ("dit-scale", "dit-redistribute") and linked.edits:
            mode = "scale" if linked.preset == "dit-scale" else "redistribute"
            st.session_state["dit_mode"] = mode
            st.session_state[f"dit_{mode}_value"] = min(max(float(linked.edits[0].value), 0.0), 1.0)
            if mode == "redistribute":  # the edits' key ranges "a:b" are capture positions
                spans = {range(*map(int, e.keys.split(":"))) for e in linked.edits}
                hit = sorted({column_of[p] for r in spans for p in r if p in column_of})
                st.session_state["dit_sink_tokens"] = [column_label(c) for c in hit if column_label(c) in token_labels]
    hunted = st.session_state.pop("dit_hunted", None)  # HeadHunter's pick replaces the chosen heads
    if hunted:
        st.session_state["dit_pag_heads"] = [f"L{l}H{h}" for l, h in hunted if f"L{l}H{h}" in labels]
    shared.held("dit_mode", "softpag")  # each widget's value is given right before it is drawn (shared.held)
    mode = st.segmented_control("Intervention", ["softpag", "scale", "redistribute"], key="dit_mode",
                                format_func={"softpag": "SoftPAG / PAG guidance", "scale": "Scale / mask heads",
                                             "redistribute": "Redistribute away from sink tokens"}.get) or "softpag"
    shared.held("dit_pag_heads", [])
    chosen = st.multiselect("Heads", labels, key="dit_pag_heads")
    heads = [(int(x[1:].split("H")[0]), int(x.split("H")[1])) for x in chosen]
    iv, label, problem = None, "", "Pick at least one head."
    if mode == "softpag":
        c1, c2 = st.columns(2)
        shared.held("dit_pag_u", 1.0)
        shared.held("dit_pag_s", dit_presets.DEFAULT_PAG_SCALE)
        u = c1.slider("u (toward identity; 1 = PAG)", 0.0, 1.0, step=0.05, key="dit_pag_u")
        scale = c2.slider("Guidance scale s", 0.0, 6.0, step=0.25, key="dit_pag_s")
        if heads and scale > 0:
            iv, label = dit_presets.softpag(heads, u=u, scale=scale), f"SoftPAG u={u:g}, s={scale:g}"
        elif heads:
            problem = "Pick a guidance scale above 0."
        st.caption("A perturbed branch with these heads' image self-attention mixed toward the identity; each step "
                   "guides away from it: ε̂ = ε + s (ε − ε_perturbed) (Ahn et al. 2025; PAG when u = 1).")
    elif mode == "scale":
        shared.held("dit_scale_value", 0.0)
        factor = st.slider("Head output × factor (0 masks the head)", 0.0, 1.0, step=0.05, key="dit_scale_value")
        if heads:
            iv, label = dit_presets.scale_heads(heads, factor), f"heads × {factor:g}"
    else:
        shared.held("dit_redistribute_value", 0.4)
        beta = st.slider("β: these tokens keep this share of their attention", 0.0, 1.0, step=0.05,
                         key="dit_redistribute_value", help="0.4 is ACT's default; the freed attention goes to the "
                                                            "other tokens in proportion.")
        shared.held("dit_sink_tokens", [])
        st.multiselect("Tokens to take attention from", token_labels, key="dit_sink_tokens",
                       help="By default the RefAM global sinks of this run, else the end-of-text and padding tokens.")
        taken = [p for x in st.session_state["dit_sink_tokens"] for p in positions[int(x.split(":", 1)[0])]]
        if heads and taken:
            iv, label = dit_presets.redistribute_from(heads, taken, beta), f"{len(taken)} tokens × {beta:g}"
        elif heads:
            problem = "Pick at least one token to take attention from."
    state.intervention = remember(iv) if iv is not None else "none"  # the link carries the setting by key
    if iv is not None:
        spec = RunSpec(model=MODEL, prompt=prompt, seed=seed, steps=steps, intervention=iv,
                       height=capture.spec.height, width=capture.spec.width, guidance=capture.spec.guidance)
        cost = shared.Estimate(f"dit-intervened {MODEL}", steps, "recorded steps", STEP_S, fixed_s=1.0)
        # sampled when asked (or opened from a link naming it): a new prompt or seed does not start it by itself
        asked = st.button(f"Sample with {label}", key="dit_sample", type="primary",
                          help=f"The same prompt, seed and steps with the intervention: {cost.text()}.")
        if asked or st.session_state.get("dit_linked_iv") == iv.key():
            after = shared.run_capture(spec, f"Sampling with {label}")
        else:
            after = shared.cached_capture(spec)
        if after is None and not asked and st.session_state.get("dit_linked_iv") != iv.key():
            shared.plotly_chart(charts.before_after(image, np.full_like(image, 235),
                                                    ("before", "after: not sampled yet")),
                                key="dit_before_after", config=plot_config())
            st.caption(f"Press “Sample with {label}” for the picture after: {cost.text()}.")
        elif after is not None:
            shared.plotly_chart(charts.before_after(image, dit_capture.generated_image(after),
                                                    ("before", f"after ({label})")),
                                key="dit_before_after", config=plot_config())
            st.caption("Same prompt, seed and steps. " + " ".join(after.output.notes))
    else:
        st.info(problem)
    h1, h2 = st.columns([1, 2])
    objective = h1.selectbox("HeadHunter objective", ["colour", "position", "shape", "all"], key="dit_hunt_objective",
                             help="What the perturbation should improve, read from the pixels of 8 prompts x 2 seeds.")
    if h2.button("Find heads (HeadHunter-lite: greedy search, cached)", key="dit_hunt"):
        hunt = probes.HeadHunterParams(objective=objective, height=capture.spec.height, width=capture.spec.width,
                                       guidance=capture.spec.guidance)
        runs = 1 + meta.n_layers * meta.n_heads + hunt.rounds * hunt.candidates  # baseline, each head, greedy rounds
        result = shared.run_with_progress(
            "HeadHunter", probes.run_headhunter, MODEL, hunt,
            estimate=shared.Estimate(f"headhunter {MODEL}", runs, f"sampling runs of {hunt.n_prompts * hunt.n_seeds} "
                                     "pictures", 7.0, fixed_s=2.0))
        if result is not None:
            st.session_state["dit_hunted"] = result.heads
            st.session_state["dit_hunt_result"] = (result.record, result.single(), result.single_images())
            st.rerun()
    if "dit_hunt_result" in st.session_state:
        record, single, sheet = st.session_state["dit_hunt_result"]
        st.write(f"HeadHunter ({record['params']['objective']}): {record['note']} (baseline "
                 f"{record['baseline']:.3f}); chosen: " + (", ".join(f"L{l}H{h}" for l, h in record["selected"])
                                                             or "none"))
        shared.plotly_chart(charts.grounding_chart(
            single, title=f"{record['params']['objective'].capitalize()} accuracy with each single head perturbed",
            label="objective"), key="dit_hunt_grid", config=plot_config())
        flat = sheet.reshape((-1,) + sheet.shape[2:])
        names = [f"L{l}H{h}" for l in range(sheet.shape[0]) for h in range(sheet.shape[1])]
        shared.plotly_chart(charts.head_contact_sheet(
            list(flat), names, title=f"Per-head perturbed samples: “{record['prompts'][0]}”"),
            key="dit_hunt_sheet", config=plot_config())
