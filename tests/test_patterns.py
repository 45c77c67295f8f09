"""Pattern atlas: map encodings, the autoencoder + UMAP + k-means pipeline on synthetic maps of known
kinds, determinism, real SmolLM2 captures, the link fields, and the page (AppTest)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from analytics import patterns as P
from analytics.patterns.encode import _text_columns

APP = str(Path(__file__).resolve().parent.parent / "app.py")
KIND_WORDS = {"diagonal": "diagonal", "previous": "previous token", "sink": "sink (first column)",
              "uniform": "broad/uniform", "block": "local"}
FAST = P.AtlasParams(steps=300)  # synthetic maps are easy: half the default training
PROMPTS = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
           "In 1851 the lighthouse keeper wrote that the storm had broken three windows and the lamp.")


# ---- encodings (no torch) -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [8, 24, 160])
def test_text_encoding_lines_up_each_kind_whatever_the_length(n):
    rng = np.random.default_rng(n)
    expected = {"diagonal": P.SELF_COLUMN, "previous": P.SELF_COLUMN - 1, "sink": 0}
    for kind, column in expected.items():
        image = P.encode_text_map(P.synthetic_map(kind, n, rng))
        assert image.shape == (P.SIZE, P.SIZE)
        np.testing.assert_allclose(image.sum(1), 1.0, atol=1e-4)  # each row: all its mass, once
        assert (image.argmax(1) == column).all(), kind
    block = P.encode_text_map(P.synthetic_map("block", n, rng))
    assert block[:, P.SELF_COLUMN - 7 : P.SELF_COLUMN + 1].sum(1).mean() > 0.6  # within 7 tokens back


def test_text_columns_put_every_key_in_one_column():
    cols = _text_columns(300, tuple(int(q) for q in P.text_queries(300)))
    assert cols.min() >= 0 and cols.max() < P.SIZE
    q = P.text_queries(300)
    assert (cols[:, 0] == 0).all() and (cols[np.arange(32), q] == P.SELF_COLUMN).all()
    assert (cols[np.arange(32), q - 1] == P.SELF_COLUMN - 1).all()
    future = _text_columns(40, (10,))[0]
    assert future[11] == P.SELF_COLUMN + 1 and future[39] > future[11]  # encoders: keys ahead to the right


def test_vision_encoding_centres_the_query_patch():
    grid, start = (16, 16), 1
    lattice = P.query_lattice(grid, 16)
    assert lattice.shape == (16, 2) and {tuple(x) for x in lattice} >= {(2, 2), (14, 14)}
    n = 1 + 256
    rows = np.zeros((2, len(lattice), n), np.float32)  # head 0 attends to itself, head 1 to its right neighbour + CLS
    for i, (r, c) in enumerate(lattice):
        rows[0, i, start + r * 16 + c] = 1.0
        rows[1, i, start + r * 16 + min(c + 1, 15)] = 0.6
        rows[1, i, 0] = 0.4
    centred = P.encode_vision_rows(rows, grid, start, lattice, centred=True)
    assert centred.shape == (2, 16, P.SIZE, P.SIZE)
    assert (centred[0, :, 15, 15] == 1.0).all() and np.isclose(centred[0, :, :31, :31].sum((-1, -2)), 1).all()
    assert np.isclose(centred[1, :, 15, 16], 0.6).all() and np.isclose(centred[1, :, 31, :], 0.4).all()
    uncentred = P.encode_vision_rows(rows, grid, start, lattice, centred=False)
    peaks = [np.unravel_index(img[:31, :31].argmax(), (31, 31)) for img in uncentred[0]]
    assert len(set(peaks)) == len(lattice)  # each query patch where it is on the grid
    np.testing.assert_allclose(uncentred[0, :, :31, :31].sum((-1, -2)), 1.0, rtol=1e-5)
    traits = P.vision_traits(rows, grid, start, lattice)
    i = P.TRAITS.index
    assert np.allclose(traits[0, :, i("self")], 1) and np.allclose(traits[1, :, i("first")], 0.4)
    assert np.allclose(traits[1, :, i("near")], 0.6)


def test_describe_names_each_pattern():
    def traits(**kw):
        base = dict(first=0.05, self=0.05, near=0.05, local=0.2, entropy=0.5, distance=5.0, spread=0.6)
        base.update(kw)
        return np.asarray([base[t] for t in P.TRAITS])

    assert P.describe(traits(first=0.8)) == "sink (first column)"
    assert P.describe(traits(first=0.8), "vision") == "sink (CLS/prefix tokens)"
    assert P.describe(traits(self=0.6, first=0.3)) == "diagonal/self + sink"
    assert P.describe(traits(near=0.7)) == "previous token"
    assert P.describe(traits(entropy=0.95)) == "broad/uniform"
    assert P.describe(traits(local=0.8)) == "local"
    assert P.describe(traits(spread=0.2, first=0.3)) == "local + sink"
    assert P.describe(traits(spread=1.1)) == "global"
    assert P.describe(traits()) == "mid-range"
    assert P.describe(traits(first=0.5, local=0.45)) == "sink (first column) + local"
    assert P.cluster_labels(np.stack([traits(first=0.8)] * 2), ["text", "text"]) == \
        ["sink (first column) · first 0.80", "sink (first column) · first 0.80 #2"]
    two = P.cluster_labels(np.stack([traits(first=0.8, entropy=0.2), traits(first=0.7, entropy=0.6)]), ["text"] * 2)
    assert two[0].startswith("sink (first column) · ") and two[0] != two[1]


def test_selection_text_round_trips():
    idx = [0, 1, 2, 3, 9, 11, 12, 40]
    assert P.selection_text(idx) == "0-3.9.11-12.40"
    assert P.parse_selection("0-3.9.11-12.40") == idx
    scattered = np.random.default_rng(0).choice(10_000, 1000, replace=False)
    text = P.selection_text(scattered)  # a lasso over thousands of scattered maps: a packed bitset
    assert text.startswith("z") and len(text) < 1500
    assert P.parse_selection(text) == sorted(scattered.tolist())
    from state import ViewState

    assert ViewState.from_params({"points": text})[0].points == text
    for bad in ("5-2", "zz!", "z" + "A" * 10):
        with pytest.raises(ValueError):
            P.parse_selection(bad)


def test_link_fields_are_validated():
    from state import ViewState

    state, warnings = ViewState.from_params({"atlas": "0123456789abcdef0123", "colour": "entropy",
                                             "points": "1-5.9", "cluster": "2", "names": "0=induction|2=my heads"})
    assert not warnings
    assert (state.atlas, state.colour, state.points, state.cluster) == ("0123456789abcdef0123", "entropy", "1-5.9", 2)
    assert state.names == "0=induction|2=my heads"
    assert ViewState.from_params(state.to_params())[0] == state
    bad, warnings = ViewState.from_params({"atlas": "../x", "colour": "red", "points": "1;drop", "cluster": "99",
                                           "names": "x=y"})
    assert len(warnings) == 5 and bad == ViewState.from_params({})[0]


# ---- the pipeline on synthetic maps --------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    from probes import pattern_atlas as M

    maps, truth = P.synthetic_set(lengths=(24, 48, 96, 160), per=8, seed=0)
    mapset = P.maps_from_arrays(maps)
    atlas, model = M.atlas_from_maps(mapset, FAST)
    return mapset, truth, atlas, model


def test_each_synthetic_kind_gets_its_own_pure_clusters(synthetic):
    _, truth, atlas, _ = synthetic
    purity = P.purity(truth, atlas.cluster)
    majority = P.majority(truth, atlas.cluster)
    per_kind = {kind: float(np.mean([majority[c] == k for c in atlas.cluster[truth == k]]))
                for k, kind in enumerate(P.SYNTHETIC_KINDS)}
    print(f"\nsynthetic purity {purity:.3f}, k = {atlas.k}, per kind {per_kind}, labels {atlas.labels}")
    assert purity >= 0.9
    assert set(majority.values()) == set(range(len(P.SYNTHETIC_KINDS)))  # every kind leads a cluster
    for c, k in majority.items():  # and the automatic label of that cluster names the kind
        assert KIND_WORDS[P.SYNTHETIC_KINDS[k]] in atlas.labels[c], (P.SYNTHETIC_KINDS[k], atlas.labels[c])
    assert atlas.prototypes.shape == (atlas.k, P.SIZE, P.SIZE) and np.isfinite(atlas.prototypes).all()
    sink = next(c for c, k in majority.items() if P.SYNTHETIC_KINDS[k] == "sink")
    assert atlas.prototypes[sink][:, 0].mean() > 0.3  # the decoded centre of the sink cluster is a first column
    near = atlas.nearest[sink][atlas.nearest[sink] >= 0]
    assert (atlas.cluster[near] == sink).all()


def test_same_seed_same_clusters(synthetic):
    from probes import pattern_atlas as M

    mapset, _, atlas, model = synthetic
    again, model2 = M.atlas_from_maps(mapset, FAST)
    np.testing.assert_array_equal(again.cluster, atlas.cluster)
    np.testing.assert_array_equal(again.codes, atlas.codes)
    np.testing.assert_array_equal(again.xy, atlas.xy)
    other = M.train(mapset.images, P.AtlasParams(steps=20, seed=1))[0]
    assert not np.array_equal(M.encode(other, mapset.images[:4]), M.encode(model, mapset.images[:4]))


def test_atlas_round_trips_through_the_store_and_an_unreadable_record_goes(synthetic, store):
    import dataclasses

    from cache.atlas import atlas_records, load_atlas, load_model, save_atlas, save_model
    from probes import pattern_atlas as M

    mapset, _, trained, model = synthetic
    atlas = dataclasses.replace(trained, key="atlas0", model_key="model0")
    weights = M.weights_of(model)
    save_model(store, "model0", *P.model_to_store(atlas.maps, atlas.codes, atlas.params, atlas.loss, {}), weights)
    save_atlas(store, "atlas0", *P.atlas_to_store(atlas))
    maps, codes, stored_weights, _ = load_model(store, "model0", P.model_from_store)
    np.testing.assert_allclose(maps.images, mapset.images, atol=1e-3)  # float16 on disk
    assert maps.sources == mapset.sources and codes.dtype == np.float32 and list(stored_weights) == list(weights)
    loaded = load_atlas(store, "atlas0", P.atlas_from_store)
    assert loaded.labels == atlas.labels and loaded.k == atlas.k and loaded.params == atlas.params
    np.testing.assert_array_equal(loaded.cluster, atlas.cluster)
    assert loaded.cluster.dtype == np.int64 and loaded.scores == atlas.scores and loaded.chosen == atlas.chosen
    assert [key for key, _ in atlas_records(store)] == ["atlas0"]
    meta, arrays = P.atlas_to_store(atlas)
    del meta["params"]  # an older layout: read as absent, and evicted
    save_atlas(store, "atlas0", meta, arrays)
    assert load_atlas(store, "atlas0", P.atlas_from_store) is None and store.get_meta("atlas0") is None


def test_profiles_dominant_and_shift():
    labels = np.array([0, 0, 1, 1, 1, 2])
    layer = np.array([0, 0, 0, 1, 1, 1])
    head = np.array([0, 0, 1, 0, 0, 1])
    prof = P.head_profiles(labels, layer, head, 2, 2, 3)
    assert prof.shape == (2, 2, 3) and np.allclose(prof[0, 0], [1, 0, 0]) and np.allclose(prof[1, 0], [0, 1, 0])
    dom, share = P.dominant(prof)
    assert dom.tolist() == [[0, 1], [1, 2]] and np.allclose(share, 1)
    assert np.allclose(P.profile_shift(prof, prof), 0)
    assert np.isclose(P.profile_shift(prof, prof[:, ::-1])[0, 0], 1.0)
    assert P.layer_composition(prof).shape == (2, 3)


# ---- real captures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_atlas():
    """An atlas of two short SmolLM2 prompts in the default cache (trained once, then read from it)."""
    from capture.api import run
    from core.types import RunSpec
    from probes.pattern_atlas import build_atlas

    captures = [run(RunSpec(model="smollm2", prompt=p)) for p in PROMPTS]
    return build_atlas(captures, P.AtlasParams()), captures


def test_smollm2_has_a_sink_cluster_named_so(smollm2_atlas):
    atlas, captures = smollm2_atlas
    assert len(atlas.maps) == 2 * 30 * 9
    sink = [c for c, label in enumerate(atlas.labels) if "sink (first column)" in label]
    print(f"\nSmolLM2 clusters: {dict(zip(atlas.labels, np.bincount(atlas.cluster)))}")
    assert sink, atlas.labels
    first = atlas.maps.traits[:, P.TRAITS.index("first")]
    assert first[atlas.cluster == sink[0]].mean() >= 0.45
    assert atlas.prototypes[sink[0]][:, 0].mean() > 0.2  # its decoded centre is a first column
    prof = atlas.profiles("smollm2")
    assert prof.shape == (30, 9, atlas.k) and np.allclose(np.nansum(prof, -1), 1)


def test_atlas_is_cached_by_captures_and_params(smollm2_atlas):
    from cache.atlas import load_atlas
    from capture.api import default_store
    from probes.pattern_atlas import build_atlas, recluster

    atlas, captures = smollm2_atlas
    t0 = time.perf_counter()
    again = build_atlas(list(reversed(captures)), P.AtlasParams())  # order of the selection does not matter
    assert time.perf_counter() - t0 < 10 and again.key == atlas.key
    np.testing.assert_array_equal(again.cluster, atlas.cluster)
    loaded = load_atlas(default_store(), atlas.key, P.atlas_from_store)
    assert loaded.labels == atlas.labels and loaded.maps.sources == atlas.maps.sources
    three = recluster(atlas, P.ClusterParams(k=3))  # re-uses the autoencoder and the embedding
    assert three.k == 3 and three.model_key == atlas.model_key
    np.testing.assert_array_equal(three.xy, atlas.xy)


# ---- the page -------------------------------------------------------------------------------------------

def open_patterns(params: dict):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"page": "patterns", **params})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_shows_the_atlas_and_carries_the_selection_in_the_link(smollm2_atlas):
    atlas, _ = smollm2_atlas
    at = open_patterns({"atlas": atlas.key})
    assert at.title[0].value == "Pattern atlas"
    assert any("540 maps" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == 2  # the scatter and the prototype gallery (the open tab)
    colour = next(w for w in at.selectbox if w.label == "Colour by")
    t0 = time.perf_counter()
    colour.set_value("entropy").run()
    recolour = time.perf_counter() - t0
    assert not at.exception
    view = at.session_state["view"]
    view.points = "0-11.300"
    t0 = time.perf_counter()
    at.run()
    select = time.perf_counter() - t0
    assert not at.exception
    print(f"\npage server time: re-colour {recolour * 1000:.0f} ms, select {select * 1000:.0f} ms")
    assert any("13 selected maps" in s.value for s in at.subheader)
    assert at.dataframe  # the heads they come from
    name_box = next(w for w in at.text_input if w.label.startswith("Cluster 0"))
    name_box.input("my first cluster").run()
    params = at.session_state["view"].to_params()
    assert params["atlas"] == atlas.key and params["points"] == "0-11.300" and params["colour"] == "entropy"
    assert params["names"] == "0=my first cluster"

    at.session_state["pat_tab"] = "Heads"  # the Heads tab: dominant-cluster grid, head profile, layer mix
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) == 5  # scatter, selected tiles, dominant grid, head profile, composition
    at.session_state["pat_tab"] = "Before / after"
    at.run()
    assert any("intervention" in i.value for i in at.info)  # one model, no intervention: says how to get one

    shared = open_patterns(params)  # the link in a fresh session: same view, same selection, same names
    assert any("13 selected maps" in s.value for s in shared.subheader)
    assert next(w for w in shared.selectbox if w.label == "Colour by").value == "entropy"
    assert next(w for w in shared.text_input if w.label.startswith("Cluster 0")).value == "my first cluster"


def test_page_trains_on_the_chosen_captures(smollm2_atlas):
    atlas, captures = smollm2_atlas
    at = open_patterns({})
    assert any("Pick cached captures" in i.value for i in at.info)
    at.multiselect(key="pat_captures").set_value([c.key for c in captures])
    at.button(key="pat_train").click().run()  # same captures and parameters: the cached atlas comes back at once
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["view"].atlas == atlas.key
    assert any("540 maps" in c.value for c in at.caption)


def test_unknown_atlas_link_warns():
    at = open_patterns({"atlas": "0123456789abcdef0123"})
    assert any("not in this server's cache" in w.value for w in at.warning)


def test_bad_selection_in_a_link_selects_nothing(smollm2_atlas):
    atlas, _ = smollm2_atlas
    for points in ("zAAAA", "0-99999999999", "5-9.999999"):
        at = open_patterns({"atlas": atlas.key, "points": points, "cluster": "40"})
        assert not any("selected map" in s.value for s in at.subheader) or points == "5-9.999999"
    assert any("5 selected maps" in s.value for s in at.subheader)  # the maps that exist are kept


def test_before_and_after_an_intervention_profiles_move_only_downstream():
    """Two captures of the same prompt, one with layer 14's attention to the first token redistributed away:
    layers before 14 keep their maps (same codes, same clusters); layer 14's sink heads leave the sink cluster."""
    from capture.api import run
    from core.interventions import HeadEdit, Intervention
    from core.types import RunSpec
    from probes.pattern_atlas import build_atlas

    edit = Intervention(edits=tuple(HeadEdit(layer=14, head=h, op="redistribute", value=0.0, keys="0:1")
                                    for h in range(9)))
    plain, edited = (run(RunSpec(model="smollm2", prompt=PROMPTS[0], intervention=i)) for i in (Intervention(), edit))
    atlas = build_atlas([plain, edited], P.AtlasParams(steps=200))
    groups = atlas.groups()
    assert sorted(groups) == sorted(["smollm2", f"smollm2 · {edit.key()}"])
    before, after = atlas.profiles("smollm2"), atlas.profiles(f"smollm2 · {edit.key()}")
    shift = P.profile_shift(before, after)
    assert np.allclose(shift[:14], 0)  # causal: nothing before the edited layer changes
    first = P.TRAITS.index("first")
    mask_after = atlas.group_mask(f"smollm2 · {edit.key()}") & (atlas.maps.layer == 14)
    assert atlas.maps.traits[mask_after, first].max() < 0.01  # the edit took the first column away
    before_first = atlas.maps.traits[atlas.group_mask("smollm2") & (atlas.maps.layer == 14), first]  # [head]
    print(f"\nlayer 14: profile shift {np.round(shift[14], 2)}, sink mass before {np.round(before_first, 2)}")
    sinks = before_first >= 0.5
    assert sinks.any() and np.allclose(shift[14][sinks], 1.0)  # each sink head of layer 14 left its cluster
