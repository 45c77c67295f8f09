"""Pattern atlas on real SmolLM2 captures: the sink cluster, caching by captures and parameters,
the page (AppTest) and its link, before / after an intervention.  The model-free parts:
tests/unit/test_patterns.py."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from analytics import patterns as P

APP = str(Path(__file__).resolve().parents[2] / "app.py")
PROMPTS = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
           "In 1851 the lighthouse keeper wrote that the storm had broken three windows and the lamp.")


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


def test_atlas_is_cached_by_captures_and_params(smollm2_atlas, monkeypatch):
    from cache.atlas import load_atlas
    from capture.api import default_store
    from probes import pattern_atlas
    from probes.pattern_atlas import build_atlas, recluster

    atlas, captures = smollm2_atlas
    monkeypatch.setattr(pattern_atlas, "train", lambda *a, **k: pytest.fail("a cached atlas was trained again"))
    again = build_atlas(list(reversed(captures)), P.AtlasParams())  # order of the selection does not matter
    assert again.key == atlas.key
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

    # the training controls take the atlas's settings and are given them every run, not only in the first (which a
    # browser may never receive: pages.shared.held)
    vision, k = at.radio(key="pat_vision"), at.selectbox(key="pat_k")
    assert (vision.value, k.value) == (atlas.params.vision, atlas.params.cluster.k)
    assert vision.proto.set_value and k.proto.set_value

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
