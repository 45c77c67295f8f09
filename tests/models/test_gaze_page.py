"""AppTest of the Gaze page (pages/gaze.py): a tiny random LLaVA folder allowed by the operator, and the
embedded shapes-vlm when its weights exist.  The browser test is in tests/browser/test_browser_pages.py style below."""
from __future__ import annotations

import pytest
from test_vlm_capture import tiny_vlm  # noqa: F401 - the fixture

from capture.vlm import model as vlm_model
from conftest import open_app


@pytest.fixture
def allowed_tiny(tiny_vlm, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", str(tiny_vlm))
    return str(tiny_vlm)


def test_gaze_page_on_a_tiny_llava_round_trips_its_link(allowed_tiny):
    params = {"page": "gaze", "model": allowed_tiny, "image": "scene-7", "prompt": "where is the red square?",
              "layer": "1", "head": "2"}
    at = open_app(params)
    assert at.title[0].value == "Gaze"
    assert not at.warning, [w.value for w in at.warning]
    assert len(at.get("plotly_chart")) >= 4  # saliency, answer map, filmstrip, heads ...
    tower = at.slider(key="gaze_tower_layer")  # the vision tower tab (the tiny tower has 2 layers): last layer first
    assert tower.value == tower.max == 1
    assert any("where is the red square?" in t.value for t in at.text)
    assert at.session_state["view"].to_params() == params
    # the sidebar offers a scene by seed and a question; Run makes them the view's input
    at.number_input(key="f_scene_seed").set_value(11)
    at.text_input(key="f_prompt").set_value("how many shapes are there?")
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    view = at.session_state["view"]
    assert view.image == "scene-11" and view.prompt == "how many shapes are there?"
    # (AppTest reruns only the page script after the first run, so the sidebar is checked first)
    charts = len(at.get("plotly_chart"))
    at.button(key="gaze_vhd").click().run()  # VHD: two extra passes, then its two charts
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) == charts + 2


def test_gaze_intervene_tab_before_after_and_link(allowed_tiny):
    params = {"page": "gaze", "model": allowed_tiny, "image": "scene-3", "prompt": "what colour is the circle?"}
    at = open_app(params)
    at.segmented_control(key="gaze_iv_method").set_value("var").run()
    assert not at.exception, [e.value for e in at.exception]
    view = at.session_state["view"]
    assert view.intervention != "none"
    assert any(m.value.startswith("**After") for m in at.markdown)
    linked = open_app({**params, "intervention": view.intervention})  # a fresh session opens the same setting
    assert linked.segmented_control(key="gaze_iv_method").value == "var"
    assert linked.session_state["view"].intervention == view.intervention
    linked.slider(key="gaze_iv_scenes").set_value(1)
    linked.button(key="gaze_iv_batch").click().run()
    assert not linked.exception, [e.value for e in linked.exception]
    assert linked.session_state["gaze_iv_result"].rows


def test_gaze_page_asks_for_a_vlm_when_another_kind_is_loaded_elsewhere(allowed_tiny):
    at = open_app({"page": "explorer"})  # smollm2 on the explorer is left alone
    assert at.session_state["view"].model == "smollm2"


@pytest.fixture(scope="module")
def shapes_vlm():
    if not vlm_model.trained_path().is_file():
        pytest.skip("no trained shapes-vlm in assets/models/shapes-vlm (python -m training.shapes_vlm)")


def test_gaze_page_switches_to_shapes_vlm_and_answers(shapes_vlm):
    at = open_app({"page": "gaze"})
    view = at.session_state["view"]
    assert (view.model, view.image, view.prompt) == ("shapes-vlm", "scene-3", "what colour is the circle?")
    answer = " ".join(t.value for t in at.text)
    assert "expected: red" in answer


@pytest.mark.parametrize("page", ["explorer", "atlas", "home"])
def test_other_pages_take_a_vlm_capture(allowed_tiny, page):
    params = {"page": page, "model": allowed_tiny, "image": "scene-7", "prompt": "where is the red square?"}
    if page == "atlas":
        params["metric"] = "vlm_image_centric"
    at = open_app(params)
    assert at.session_state["view"].model == allowed_tiny
    assert any(s.label == "Question" for s in at.sidebar.text_input)


def test_gaze_page_on_a_sample_photo(allowed_tiny):
    at = open_app({"page": "gaze", "model": allowed_tiny, "image": "cat", "prompt": "what animal is this?"})
    assert at.title[0].value == "Gaze" and len(at.get("plotly_chart")) >= 4
    assert at.session_state["f_image_kind"] == "sample" and at.session_state["f_sample"] == "cat"
