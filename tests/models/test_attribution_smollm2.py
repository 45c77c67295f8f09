"""Attribution on the real SmolLM2 with the IOI prompt (14 tokens): DLA vs patching rank agreement (reported,
sanity-checked only), the page (AppTest) and its share link, bad input on the page.

The probes run in the default cache (tests' HEADSCOPE_CACHE_DIR), so the page finds them and a second run
of this file is fast.  The rank agreement is written to tests/artifacts/attribution_rank_agreement.json.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from analytics import attribution
from capture import RunSpec, default_store, revision, run
from charts.pictures import ramp
from charts.theme import DIVERGING_SCALE
from conftest import component_data, open_app
from core.probe_results import IOI_CLEAN
from probes import run_probe

SELECTED = {"page": "attribution", "layer": "23", "head": "3"}


@pytest.fixture(scope="module")
def ioi(smollm2):
    """The default IOI patching sweep, the clean capture and its DLA for ' Mary' - ' John'."""
    store = default_store()
    patching = attribution.Patching(run_probe("patching", "smollm2", {}, store=store))
    clean = run(RunSpec(model="smollm2", prompt=IOI_CLEAN), store=store)
    dla = attribution.DLA(run_probe("dla", "smollm2", {"capture": clean.key, "target": " Mary", "foil": " John"},
                                    store=store))
    return patching, clean, dla


def test_dla_and_patching_agree_on_the_name_movers(ioi, artifacts):
    patching, clean, dla = ioi
    assert patching.clean > 0 > patching.corrupted  # the model prefers the indirect object, and the flip flips it
    assert dla.terms()["logit"] == pytest.approx(patching.clean, abs=1e-3)  # the same run, the same metric
    assert dla.result.summary["sum_error"] < 1e-3 and dla.result.summary["residual_error"] < 1e-5
    heads = dla.heads()
    agree = attribution.rank_agreement(heads, patching.effect, k=10)
    top = attribution.rank_agreement(heads, patching.effect, k=5)
    record = {"spearman": agree["spearman"], "top10_overlap": agree["top_overlap"], "top5_overlap": top["top_overlap"],
              "dla_top": [list(map(int, np.unravel_index(i, heads.shape))) for i in np.argsort(-heads, axis=None)[:5]],
              "patching_top": [list(map(int, np.unravel_index(i, heads.shape)))
                               for i in np.argsort(-np.nan_to_num(patching.effect, nan=-9), axis=None)[:5]],
              "clean": patching.clean, "corrupted": patching.corrupted}
    (artifacts / "attribution_rank_agreement.json").write_text(json.dumps(record, indent=1))
    print(f"\nDLA vs patching on SmolLM2 IOI: {record}")
    assert -1 <= agree["spearman"] <= 1 and 0 <= agree["top_overlap"] <= 1
    best = np.unravel_index(np.argmax(heads), heads.shape)
    assert patching.effect[best] > 0  # sanity: the head with the largest DLA restores some of the gap


def test_page_shows_before_after_the_maps_and_the_agreement(ioi):
    at = open_app(SELECTED)
    assert at.title[0].value == "Attribution: which heads made this token"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["corrupted run"] == f"{ioi[0].corrupted:.4g}"
    assert metrics["L23 H3 patched"] == f"{ioi[0].patched[23, 3]:.4g}"
    captions = " ".join(c.value for c in at.caption)
    assert "Spearman ρ" in captions and "sum to the model's own" in captions
    # the maps are pictures (pages/widgets.picture: they paint before Plotly's bundle loads, issue 23); the
    # per-layer terms and the head graph stay Plotly (AppTest has no browser: drawn at once, not deferred)
    assert len(at.get("plotly_chart")) == 2
    maps = {p["title"]: p for p in component_data(at, "headscope_picture")}
    dla_map = maps["DLA per head: click a head"]
    patch_map = maps["Share of the gap each head restores: click a head"]
    for grid, bar in ((dla_map, "DLA (logit difference)"), (patch_map, "share of the gap restored")):
        assert (grid["rows"], grid["cols"]) == (30, 9) and grid["clickable"] and grid["bar_title"] == bar
        assert grid["outline"] == [23, 24, 3, 4]  # the selected head framed
        assert grid["zmin"] == "-" + grid["zmax"] and list(grid["ramp"]) == list(ramp(DIVERGING_SCALE))  # centred on 0
    assert dla_map["values"][23][3] == pytest.approx(float(ioi[2].heads()[23, 3]))
    assert patch_map["values"][23][3] == pytest.approx(float(ioi[0].effect[23, 3]))
    assert at.session_state["view"].to_params() == SELECTED


def test_link_carries_both_prompts_tokens_and_metric(ioi):
    params = {"page": "attribution", "clean": "When Tom and Anna went to the park, Anna gave a ball to",
              "corrupted": "When Tom and Anna went to the park, Tom gave a ball to", "target": " Tom",
              "foil": " Anna", "measure": "prob", "direction": "noise", "receivers": "v"}
    at = open_app(params)
    assert at.session_state["view"].to_params() == params
    assert not at.error
    assert any("Patch each of the 270 heads alone (noise)" in i.value for i in at.info)


@pytest.mark.parametrize("params, sentence", [
    ({"corrupted": "When Mary and John went to the store, John gave drinks"}, "patching needs the same number"),
    ({"target": " Maryanne"}, "is 2 tokens"),
    ({"corrupted": IOI_CLEAN}, "are the same tokens"),
])
def test_bad_input_on_the_page_is_one_sentence(ioi, params, sentence):
    at = open_app({"page": "attribution", **params})
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and sentence in errors[0]


def test_path_patching_from_the_selected_head(ioi):
    at = open_app({**SELECTED, "layer": "28", "head": "1"})
    for button in [b for b in at.button if b.key == "attr_run_path"]:  # absent once the result is cached
        button.click()
        at.run()
    assert not at.exception and not at.error and not [b for b in at.button if b.key == "attr_run_path"]
    (shown,) = [p for p in component_data(at, "headscope_picture") if p["title"].startswith("L28 H1 → later heads' q")]
    assert not shown["clickable"] and shown["outline"] == [28, 29, 1, 2]  # the sender framed
    path = attribution.read_patching(store=default_store(), revision=revision("smollm2"), model="smollm2",
                                     sender=(28, 1), receivers="q")
    assert np.isnan(path.patched[:29]).all() and np.isfinite(path.patched[29]).all()


def test_head_atlas_runs_dla_on_its_capture_from_the_button(smollm2):
    """Head atlas, metric DLA, no stored DLA yet: the button runs the probe on the page's capture (it raised
    before: the capture key was not passed) and the map follows."""
    from core.probe_results import DLAParams, probe_key

    at = open_app({"page": "atlas", "metric": "entropy"})
    capture = at.session_state["capture"]
    key = probe_key(revision("smollm2"), "dla", DLAParams(capture=capture.key))
    default_store().evict(key)  # as on a fresh cache: the page must offer the button
    at.selectbox(key="atlas_metric").set_value("dla").run()
    button = at.button(key="atlas_run_missing")
    assert button.label == "Run direct logit attribution on this capture"
    button.click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    assert default_store().get_meta(key) is not None  # stored under the capture's key
    assert not [w for w in at.warning if "dla" in w.value.lower()]  # the map is drawn, no "run it" warning


def test_explorer_token_view_attributes_the_next_token_to_heads(smollm2):
    """Explorer, token view, query token 3: the button runs DLA on the page's capture; the map is DLA at
    token 3 onto token 4 (the capture's own next token) and the caption's terms sum to the logit."""
    from core.probe_results import DLAParams, probe_key

    at = open_app({"page": "explorer", "view": "token", "token": "3"})
    capture = at.session_state["capture"]
    key = probe_key(revision("smollm2"), "dla", DLAParams(capture=capture.key))
    default_store().evict(key)
    at.run()
    at.button(key="ex_dla_run").click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    dla = attribution.DLA(run_probe("dla", "smollm2", {"capture": capture.key}))
    terms = dla.terms(3)
    assert terms["target"] == capture.output.token_ids[4]  # at token 3, the logit of token 4
    caption = next(c.value for c in at.caption if "direct term in the logit of" in c.value)
    assert repr(capture.tokens[4]) in caption and f"{terms['logit']:.4g}" in caption
    total = dla.heads(3).sum() + terms["mlps"].sum() + terms["embed"] + terms["bias"]
    assert total == pytest.approx(terms["logit"], abs=1e-3)


def test_explorer_token_view_says_why_a_model_has_no_dla():
    at = open_app({"page": "explorer", "model": "minilm", "view": "token"})
    assert any("Direct logit attribution knows the causal LMs llama" in c.value and "minilm" in c.value.lower()
               for c in at.caption)
    assert all(b.key != "ex_dla_run" for b in at.button)


def test_attribution_page_says_which_text_models_it_knows():
    at = open_app({"page": "attribution", "model": "minilm"})  # an encoder: no answer to attribute
    assert any("Attribution knows the causal LMs llama" in i.value and "minilm" in i.value for i in at.info)
