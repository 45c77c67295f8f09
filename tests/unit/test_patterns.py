"""Pattern atlas without a model: map encodings, the autoencoder + UMAP + k-means pipeline on synthetic
maps of known kinds, determinism, the store round trip, profiles and the link fields.  Real SmolLM2
captures and the page: tests/models/test_patterns_smollm2.py."""
from __future__ import annotations

import numpy as np
import pytest

from analytics import patterns as P
from analytics.patterns.encode import _text_columns

KIND_WORDS = {"diagonal": "diagonal", "previous": "previous token", "sink": "sink (first column)",
              "uniform": "broad/uniform", "block": "local"}
FAST = P.AtlasParams(steps=300)  # synthetic maps are easy: half the default training


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
