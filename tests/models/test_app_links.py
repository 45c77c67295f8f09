"""Links restore the controls, not only the result (issue 23): every page opened from a link shows the
widgets as the link names them.  AppTest (no browser); the browser-only parts are in test_browser_links.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from capture import ModelMeta, presets
from conftest import component_data, open_app
from pages.intervene_link import settings_of

PROMPT = "The cat sat on the mat. The cat sat on the"
META = ModelMeta(name="smollm2", family="llama", modality="text", n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                 causal=True)


@pytest.mark.parametrize("name, heads, params", [
    ("prune", [(10, 3), (11, 4)], {"factor": 0.25}),
    ("uniform", [(3, 2)], {"u": 0.5}),
    ("retrieval-mask", [(17, 3), (18, 6)], {}),
    ("act", None, {"tau": 0.2, "beta": 0.3, "keep_first": False}),
    ("act", [(5, 1), (6, 2)], {}),
    ("var", None, {"p": 0.5, "tau": 0.15, "include_first": False}),
    ("duo-streaming", [(4, 0), (9, 8)], {"sink": 8, "recent": 64, "mean_token": True}),
    ("duo-streaming", None, {}),
    ("softpag", [(2, 2)], {"u": 0.7}),
])
def test_every_preset_reads_back_to_the_same_intervention(name, heads, params):
    built = presets.build(name, META, heads, **params)
    settings = settings_of(built, META)
    assert settings is not None and settings.preset == name
    again = presets.build(name, META, settings.heads or None, **{**presets.PRESETS[name].defaults(), **settings.params})
    assert again.key() == built.key()


def test_intervene_link_restores_preset_heads_and_sliders():
    heads = [(10, 3), (11, 4), (12, 5)]
    key = presets.prune(META, heads, factor=0.5)
    from capture import remember

    link = {"page": "intervene", "max_new_tokens": "6", "prompt": PROMPT, "intervention": remember(key)}
    at = open_app(link)
    assert at.selectbox(key="iv_preset").value == "prune"
    assert at.multiselect(key="iv_heads").value == ["L10H3", "L11H4", "L12H5"]
    assert at.slider(key="iv_p_prune_factor").value == 0.5
    assert not at.warning, [w.value for w in at.warning]  # no "pick at least one head" beside the result
    assert any("Before | after · prune on 3 heads" in h.value for h in at.subheader)
    (grid,) = [p for p in component_data(at, "headscope_picture") if p["rows"] == 30 and p["cols"] == 9]
    assert grid["clickable"] and "click one" in grid["title"]
    assert at.session_state["view"].to_params()["intervention"] == link["intervention"]


def test_an_act_link_shows_its_default_heads_on_the_grid_not_in_the_box():
    from capture import remember

    link = {"page": "intervene", "max_new_tokens": "4", "prompt": PROMPT, "intervention": remember(presets.act(META))}
    at = open_app(link)
    assert at.selectbox(key="iv_preset").value == "act" and at.multiselect(key="iv_heads").value == []
    assert any("243" in c.value for c in at.caption)  # "Red dot: the heads the intervention shown edits (243)."


@pytest.mark.parametrize("page", ["gaze", "dit"])
def test_mean_pages_open_on_the_mean_unless_the_link_names_a_layer(page):
    from state import ViewState

    state, warnings = ViewState.from_params({"page": page})
    assert (state.layer, state.head) == (-1, -1) and not warnings
    state, _ = ViewState.from_params({"page": page, "layer": "0", "head": "0"})
    assert (state.layer, state.head) == (0, 0)
    assert state.to_params()["layer"] == "0" and state.to_params()["head"] == "0"
    assert ViewState.from_params({"page": "explorer"})[0].layer == 0  # other pages keep layer 0


def test_atlas_link_restores_metric_and_selected_head():
    at = open_app({"page": "atlas", "metric": "entropy", "layer": "7", "head": "4"})
    assert at.selectbox(key="atlas_metric").value == "entropy"
    (grid,) = component_data(at, "headscope_picture")
    assert grid["outline"] == [7, 8, 4, 5] and grid["rows"] == 30
    assert at.session_state["view"].to_params() == {"page": "atlas", "metric": "entropy", "layer": "7", "head": "4"}


def test_vision_link_restores_layer_head_and_patch():
    at = open_app({"page": "vision", "model": "dinov2-s", "image": "cat", "layer": "5", "head": "2", "patch": "3,4"})
    assert at.slider(key="w_layer").value == 5 and at.selectbox(key="w_head").value == 2
    overlay = component_data(at, "headscope_picture")[0]
    assert overlay["outline"] == [3, 4, 4, 5] and "patch (3, 4)" in overlay["title"]


def test_a_prompt_over_the_context_is_refused_with_its_length_never_dropped():
    text = (Path(__file__).resolve().parents[2] / "assets" / "haystack.txt").read_text()
    long_prompt = " ".join([text] * 18)  # ~48,000 characters, ~10,000 tokens: over SmolLM2's 8,192
    at = open_app({"page": "explorer"})
    at.sidebar.text_area[0].input(long_prompt)
    at.sidebar.button[0].click().run()
    assert at.session_state["view"].prompt == long_prompt  # kept, not dropped
    assert at.session_state["f_prompt"] == long_prompt  # (AppTest reruns the page alone: no sidebar to read)
    refused = " ".join(e.value for e in at.error)
    assert "tokens" in refused and "takes at most 8192" in refused


def test_an_empty_prompt_says_so_under_the_title_and_keeps_the_share_box():
    at = open_app({"page": "explorer"})
    at.sidebar.text_area[0].input("")
    at.sidebar.button[0].click().run()
    assert not at.exception
    assert at.title[0].value == "Attention explorer" and any("prompt is empty" in e.value for e in at.error)
    assert not at.get("progress")  # no bar left behind
    linked = open_app({"page": "explorer", "prompt": ""})  # the same through app.py: the share box stays
    assert any("prompt is empty" in e.value for e in linked.error)
    assert component_data(linked, "headscope_share_link")


def test_bound_widgets_take_the_linked_values_as_their_own_defaults():
    """pages.shared.bind (pages.resend.as_default): when a rerun starts, Streamlit drops the messages of the run
    it cut short that the browser has not had yet, so a browser may never be sent the value a link gave a widget;
    it then shows the widget's own default and sends that back at the next rerun (the Diffusion page fell back
    from shapes-dit to SmolLM2 at the first click, in a clean-clone browser test).  The default must therefore
    be the link's value."""
    at = open_app({"page": "dit", "model": "shapes-dit", "prompt": "a red circle at the top left", "steps": "2",
                   "step": "1", "layer": "1", "head": "0"})
    model, layer, head = (at.selectbox(key=k) for k in ("w_model", "w_layer", "w_head"))
    assert (model.value, layer.value, head.value) == ("shapes-dit", 1, 0)
    assert [w.proto.default for w in (model, layer, head)] == [model.index, layer.index, head.index]
    assert model.index != 0  # not SmolLM2, the menu's first entry and the app's default
    assert list(at.slider(key="w_step").proto.default) == [1.0]


def test_a_bound_value_outside_the_widgets_bounds_gives_no_default():
    import streamlit as st

    from pages.resend import as_default

    assert as_default(st.number_input, ("Layer", 0, 29), {"step": 1}, -1) == {}  # an error if it were given
    assert as_default(st.number_input, ("Layer", 0, 29), {"step": 1}, 7) == {"value": 7}
    assert as_default(st.selectbox, ("Head", [-1, 0, 1]), {}, 5) == {}
    view = ("View", ["model", "head"])
    assert as_default(st.segmented_control, view, {"required": True}, "head") == {"default": "head"}


def test_an_intervene_links_preset_and_switches_are_sent_again_on_later_runs():
    """The Intervene page gives its preset and a preset's on / off settings every run (shared.held), not only
    in the first: that run may be cut short before the browser has it (see the test above)."""
    from capture import remember

    at = open_app({"page": "intervene", "max_new_tokens": "4", "prompt": PROMPT,
                   "intervention": remember(presets.act(META, keep_first=False))})
    at.run()  # a later run
    preset, keep_first = at.selectbox(key="iv_preset"), at.checkbox(key="iv_p_act_keep_first")
    assert (preset.value, keep_first.value) == ("act", False)
    assert preset.proto.set_value and keep_first.proto.set_value
