"""Pattern atlas: every head's maps as points (autoencoder codes in 2-D), their clusters, prototypes and head profiles."""
import numpy as np
import streamlit as st

import probes
from analytics import patterns as P
from capture import default_store, load_capture
from charts import patterns as charts
from charts.pictures import coloured, mosaic
from charts.theme import ATTENTION_SCALE, plot_config
from pages import shared
from pages.widgets import picture
from state import ATLAS_COLOURS, MAX_LINK_POINTS, names_text, parse_names

TILES = 24  # selected maps shown as tiles
COLOUR_TITLES = {"cluster": "cluster", "layer": "layer", "model": "model", "input": "input",
                 **{t: P.TRAIT_TITLES[t] for t in P.TRAITS}}

state = shared.view_state()
store = default_store()
config = plot_config()
st.title("Pattern atlas")
shared.show_link_warnings()


def capture_options() -> dict[str, str]:
    """{capture key: label} of every complete capture in the cache (metadata only: no arrays read)."""
    def build():
        out = {}
        for key in store.keys():
            try:
                record = store.get_meta(key) or {}
            except Exception:  # noqa: BLE001 - an unreadable entry is not offered
                continue
            if record.get("kind", "capture") != "capture" or "meta" not in record:
                continue
            spec = record["spec"]
            what = spec.get("image") or " ".join(spec.get("prompt", "").split())[:40]
            edits = spec.get("intervention") or {}
            tag = " · intervention" if edits.get("edits") or edits.get("preset") else ""
            out[key] = f"{record['meta']['name']} · {what} · {len(record['tokens'])} tok{tag} · {key[:6]}"
        return out
    return shared.memo("pat_options", tuple(store.keys()), build, size=1)


def current_atlas() -> P.Atlas | None:
    if not state.atlas:
        return None
    held = st.session_state.get("pattern_atlas")
    if held is not None and held.key == state.atlas:
        return held
    found = probes.stored_atlas(state.atlas, store)
    if found is None:
        st.warning("The linked pattern atlas is not in this server's cache; train it below.")
        state.atlas, state.points, state.cluster = "", "", -1
        return None
    st.session_state["pattern_atlas"] = found
    return found


def train(keys: list[str], vision: str, k: int) -> None:
    captures = [c for c in (load_capture(key, store) for key in keys) if c is not None]
    params = P.AtlasParams(vision=vision, cluster=P.ClusterParams(k=k))
    try:
        atlas = shared.run_with_progress("Pattern atlas", probes.build_atlas, captures, params, store)
    except ValueError as exc:  # probes.pattern_atlas says "too few maps" with a ValueError, not yet an InputError
        st.error(str(exc))
        return
    if atlas is None:
        return
    st.session_state["pattern_atlas"] = atlas
    state.atlas, state.points, state.cluster, state.names = atlas.key, "", -1, ""
    st.rerun()


atlas = current_atlas()
options = capture_options()
with st.expander("Train on these captures", expanded=atlas is None):
    stored = probes.stored_atlases(store)
    if stored and atlas is None:
        labels = {key: f"{len(rec.get('labels', []))} clusters · {key[:8]}" for key, rec in stored}
        pick = st.selectbox("Open a stored atlas", [""] + list(labels), format_func=lambda k: labels.get(k, "—"))
        if pick:
            state.atlas = pick
            st.rerun()
    if atlas is not None:
        default = [s.key for s in atlas.maps.sources if s.key in options]
    else:
        held = st.session_state.get("capture")
        default = [held.key] if held is not None and held.key in options else list(options)[-3:]
    st.session_state.setdefault("pat_captures", default)
    if atlas is not None:  # the training controls start from the atlas's own settings, given every run
        shared.held("pat_vision", atlas.params.vision)  # (shared.held: a first run cut short may not reach the browser)
        shared.held("pat_k", atlas.params.cluster.k)
    st.session_state["pat_captures"] = [k for k in st.session_state["pat_captures"] if k in options]
    chosen = st.multiselect("Captures", list(options), format_func=options.get, key="pat_captures",
                            help="Cached runs (any model). Run more inputs from the sidebar to add them here.")
    left, right = st.columns(2)
    with left:
        vision = st.radio("Image maps", ["centred", "uncentred"], horizontal=True, key="pat_vision",
                          help="centred: each query patch's map shifted so the query patch is in the middle; "
                               "uncentred: the map on the patch grid as it is.")
    with right:
        k = st.selectbox("Clusters", [0] + list(range(2, 13)), key="pat_k",
                         format_func=lambda v: "auto (silhouette)" if v == 0 else str(v))
    if st.button("Train on these captures", type="primary", disabled=not chosen, key="pat_train"):
        train(chosen, vision, k)

if atlas is None:
    st.info("Pick cached captures above and train: a small convolutional autoencoder learns the attention maps of "
            "every head, UMAP lays its codes out in 2-D, and k-means groups them into pattern types.")
    shared.stop()

# ---- names, colours, selection --------------------------------------------------------------------------------
maps = atlas.maps
n = len(maps)
custom = {c: v for c, v in parse_names(state.names).items() if c < atlas.k}
names = [custom.get(c, atlas.labels[c]) for c in range(atlas.k)]
counts = np.bincount(atlas.cluster[atlas.cluster >= 0], minlength=atlas.k).tolist()
models = sorted({s.model for s in maps.sources})
timing = atlas.timings
chosen_k = ", ".join(f"{k} {fam}" + (f" (silhouette {atlas.scores[fam][k]:.2f})" if k in atlas.scores.get(fam, {}) else "")
                     for fam, k in atlas.chosen.items())
st.caption(f"**{n:,} maps** from {len(maps.sources)} inputs ({', '.join(models)}) · {atlas.k} clusters"
           + (f": {chosen_k}" if len(atlas.chosen) > 1 or any(atlas.scores.values()) else "")
           + (f" · autoencoder loss {atlas.loss[-1]:.2e}" if atlas.loss else "")
           + f" · trained in {timing.get('train_s', 0):.0f} s, embedded in {timing.get('embed_s', 0):.0f} s"
           + f" · atlas `{atlas.key}`")


def pick_cluster(_row: int, col: int) -> None:
    state.points = ""
    shared.set_fields(cluster=col)


def prototype_strip():
    """Each cluster's decoded centre as one picture (drawn before the scatter, and quick: no Plotly)."""
    protos = np.asarray(atlas.prototypes, dtype=np.float32)  # [k, size, size], attention mass
    side = max(1, 72 // protos.shape[-1])
    tiles = [coloured(np.repeat(np.repeat(p / max(float(p.max()), 1e-12), side, 0), side, 1), ATTENTION_SCALE, 0, 1)
             for p in protos]
    return mosaic(np.stack(tiles)[None], ["centre"], [f"{c} ({counts[c]:,} maps)" for c in range(atlas.k)],
                  title="The clusters at a glance: each one's decoded centre (click one to select its maps)",
                  label="mass / max", col_name="cluster ")


picture(shared.memo("pat_strip", (atlas.key, tuple(names)), prototype_strip, size=4), key="pat_prototypes",
        on_pick=pick_cluster, min_cell_px=60, max_cell_px=110,
        outline=(0, 1, state.cluster, state.cluster + 1) if state.cluster >= 0 else None)
st.text(" · ".join(f"{c}: {names[c]}" for c in range(atlas.k)))  # plain text: names can come from a link

try:
    selected = np.asarray([i for i in P.parse_selection(state.points) if i < n], dtype=np.int64)
except ValueError:
    selected = np.zeros(0, np.int64)
if state.cluster >= atlas.k:
    state.cluster = -1
if not selected.size and state.cluster >= 0:
    selected = np.flatnonzero(atlas.cluster == state.cluster)


def map_index(customdata) -> int:
    """customdata[0] of a selected point (the browser sends numeric customdata as a list or as {"0": ...})."""
    return int(customdata["0"] if isinstance(customdata, dict) else customdata[0])


def on_select() -> None:
    points = st.session_state["atlas_scatter"].selection.points
    idx = sorted({map_index(p["customdata"]) for p in points if p.get("customdata") is not None})
    text = P.selection_text(idx)
    if len(text) > MAX_LINK_POINTS:  # keep the most maps (in index order) whose selection fits in a link
        lo, hi = 0, len(idx)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(P.selection_text(idx[:mid])) <= MAX_LINK_POINTS else (lo, mid - 1)
        text = P.selection_text(idx[:lo])
        st.session_state["pat_truncated"] = (lo, len(idx))
    state.points = text
    shared.set_fields(cluster=-1)


def colour_values(colour: str):
    """(values, names or None) of the scatter's colour."""
    if colour == "cluster":
        return atlas.cluster, names
    if colour == "layer":
        return maps.layer.astype(np.float32), None
    if colour == "model":
        groups = atlas.groups()
        return np.asarray([groups.index(s.group) for s in maps.sources])[maps.source], groups
    if colour == "input":
        return maps.source, [f"{s.model}: {s.title}" for s in maps.sources]
    return maps.traits[:, P.TRAITS.index(colour)], None


top = st.columns([2, 1, 1])
with top[0]:
    colour = shared.bind("colour", st.selectbox, "Colour by", ATLAS_COLOURS, format_func=COLOUR_TITLES.get)


def clear_points() -> None:
    state.points = ""


def clear_selection() -> None:
    shared.set_fields(cluster=-1)
    state.points = ""


with top[1]:
    cluster_choice = shared.bind("cluster", st.selectbox, "Select a cluster", list(range(-1, atlas.k)),
                                 format_func=lambda c: "—" if c < 0 else f"{c}: {names[c]}", on_change=clear_points)
with top[2]:
    st.write("")
    st.button("Clear selection", disabled=not selected.size, on_click=clear_selection)
if cluster_choice >= 0 and not state.points:
    selected = np.flatnonzero(atlas.cluster == cluster_choice)


def scatter_figure():
    values, value_names = colour_values(colour)
    hover = np.stack([maps.layer, maps.head, maps.query, maps.source], 1)
    text = [f"{s.model}: {s.title}" for s in maps.sources]
    return charts.scatter(atlas.xy, values, value_names, hover, np.asarray(text, dtype=object)[maps.source], selected,
                          title="Every map, placed by its autoencoder code (UMAP)", colour_title=COLOUR_TITLES[colour])


fig = shared.memo("pat_scatter", (atlas.key, colour, tuple(names), state.points, state.cluster), scatter_figure, size=1)
shared.plotly_chart(fig, key="atlas_scatter", on_select=on_select, selection_mode=("points", "box", "lasso"),
                    config=config)
st.caption("Lasso or box-select points (or click one) to see their maps and heads; double-click to clear. "
           "Click a legend entry to hide a group.")
truncated = st.session_state.pop("pat_truncated", None)
if truncated:
    st.warning(f"A link holds {MAX_LINK_POINTS} characters of selection: {truncated[0]:,} of the {truncated[1]:,} "
               "selected maps are kept. Select fewer maps, or a whole cluster, to keep them all.")

# ---- the selection -------------------------------------------------------------------------------------------
if selected.size:
    st.subheader(f"{selected.size:,} selected map{'s' if selected.size != 1 else ''}")
    shown = selected[:TILES]

    def tile_title(i: int) -> str:
        s = maps.sources[maps.source[i]]
        where = f" q{maps.query[i]}" if maps.query[i] >= 0 else ""
        return f"{s.model}<br>L{maps.layer[i]} H{maps.head[i]}{where}"

    shared.plotly_chart(lambda: shared.memo("pat_sel_tiles", (atlas.key, tuple(shown)), lambda: charts.tiles(
        maps.images[shown], [tile_title(i) for i in shown], cols=8), size=1), key="selected_tiles", config=config,
        width="content")
    families = set(maps.family()[shown])
    hints = ([charts.TEXT_COLUMNS_HINT] if "text" in families else []) + ([charts.VISION_HINT] if "image" in families else [])
    st.caption(". ".join(h[0].upper() + h[1:] for h in hints) + "." +
               (f" Showing the first {TILES}." if selected.size > TILES else ""))
    table = P.selection_heads(maps, atlas.cluster, selected, names)
    st.markdown(f"**The heads they come from** ({len(table)})")
    st.dataframe(table[:500], hide_index=True, height=min(400, 38 + 35 * len(table[:500])))

# ---- prototypes, heads, comparisons --------------------------------------------------------------------------

def prototypes_view() -> None:
    shared.plotly_chart(lambda: shared.memo("pat_gallery", (atlas.key, tuple(names)), lambda: charts.prototype_gallery(
        atlas.prototypes, atlas.nearest, maps.images, names, counts,
        title="Each cluster: its decoded centre, then the maps nearest to it"), size=1), key="gallery", config=config,
        width="content")
    st.caption("Labels are automatic (from sink, diagonal, previous-token and local mass, entropy and spread); "
               "rename a cluster below. Names travel with the share link.")

    def rename(c: int) -> None:
        text = st.session_state[f"pat_name_{atlas.key}_{c}"].strip()
        current = parse_names(state.names)
        if text and text != atlas.labels[c]:
            current[c] = text
        else:
            current.pop(c, None)
        state.names = names_text(current)

    cols = st.columns(3)
    for c in range(atlas.k):
        key = f"pat_name_{atlas.key}_{c}"
        st.session_state.setdefault(key, names[c])
        traits = ", ".join(f"{t} {v:.2f}" for t, v in zip(P.TRAITS, atlas.ctraits[c]))
        cols[c % 3].text_input(f"Cluster {c} ({counts[c]:,} maps)", key=key, on_change=rename, args=(c,),
                               max_chars=60, help=f"Mean traits: {traits}")


def heads_view() -> None:
    groups = atlas.groups()
    group = st.selectbox("Model", groups, key="pat_group")
    src = next(s for s in maps.sources if s.group == group)
    profiles = shared.memo("pat_profiles", (atlas.key, group), lambda: atlas.profiles(group), size=1)
    layer = min(max(state.layer, 0), src.n_layers - 1)
    head = min(max(state.head, 0), src.n_heads - 1)

    def pick_head() -> None:
        points = st.session_state["dominant_grid"].selection.points
        if points:
            shared.set_fields(layer=int(round(points[0]["y"])), head=int(round(points[0]["x"])))

    def profile_figure():
        members = [i for i, s in enumerate(maps.sources) if s.group == group]
        per_input = np.stack([atlas.profiles(group, i)[layer, head] for i in members] + [profiles[layer, head]])
        labels = [maps.sources[i].title for i in members] + ["all inputs"]
        return charts.head_profile(per_input, labels, names,
                                   title=f"Layer {layer}, head {head}: share of its maps in each cluster, per input")

    left, right = st.columns([1.1, 1])
    with left:
        shared.plotly_chart(lambda: shared.memo(
            "pat_dominant", (atlas.key, group, tuple(names), layer, head),
            lambda: charts.dominant_grid(*P.dominant(profiles), names, selected=(layer, head),
                                         title=f"{group}: each head's most frequent cluster"), size=1),
            key="dominant_grid", on_select=pick_head, selection_mode="points", config=config)
    with right:
        shared.plotly_chart(lambda: shared.memo("pat_head_profile", (atlas.key, group, tuple(names), layer, head),
                                                profile_figure, size=1), key="head_profile", config=config)
        st.caption("Click a head in the grid to see its profile.")
    comp = shared.memo("pat_composition", (atlas.key, tuple(names)), lambda: charts.composition(
        {g: P.layer_composition(atlas.profiles(g)) for g in groups}, names,
        title="How each layer's heads split over the clusters"), size=1)
    shared.plotly_chart(comp, key="composition", config=config)


def compare_view() -> None:
    groups = atlas.groups()
    if len(groups) < 2:
        st.info("Add captures of the same inputs under an intervention (Intervene page) and train on both sets "
                "to compare each head's pattern mix before and after.")
        return
    edited = [g for g in groups if " · " in g]
    after_default = edited[0] if edited else groups[1]
    before_default = after_default.split(" · ")[0] if after_default.split(" · ")[0] in groups else groups[0]
    shared.held("pat_before", before_default)
    shared.held("pat_after", after_default)
    a, b = st.columns(2)
    before = a.selectbox("Before", groups, key="pat_before")
    after = b.selectbox("After", groups, key="pat_after")
    sa = next(s for s in maps.sources if s.group == before)
    sb = next(s for s in maps.sources if s.group == after)
    if (sa.n_layers, sa.n_heads) != (sb.n_layers, sb.n_heads):
        st.info(f"{before} and {after} have different shapes; compare them in the Heads tab's layer chart.")
        return

    def figures():
        pa, pb = atlas.profiles(before), atlas.profiles(after)
        shift = P.profile_shift(pa, pb)
        return (charts.dominant_grid(*P.dominant(pa), names, title=f"Before: {before}"),
                charts.dominant_grid(*P.dominant(pb), names, title=f"After: {after}"),
                charts.shift_grid(shift, title="How far each head's cluster mix moved (0 = same, 1 = disjoint)"),
                int((np.nan_to_num(shift) >= 0.5).sum()))

    fig_a, fig_b, fig_shift, moved = shared.memo("pat_compare", (atlas.key, before, after, tuple(names)), figures,
                                                 size=1)
    with a:
        shared.plotly_chart(fig_a, key="dom_before", config=config)
    with b:
        shared.plotly_chart(fig_b, key="dom_after", config=config)
    shared.plotly_chart(fig_shift, key="shift_grid", config=config)
    st.caption(f"{moved} heads changed their mix by half or more.")


# lazy tabs: only the open one runs, so a re-colouring or a selection does not rebuild the other two
prototypes_tab, heads_tab, compare_tab = st.tabs(["Prototypes", "Heads", "Before / after"], key="pat_tab",
                                                 on_change="rerun")
for tab, view in ((prototypes_tab, prototypes_view), (heads_tab, heads_view), (compare_tab, compare_view)):
    if tab.open:
        with tab:
            view()
