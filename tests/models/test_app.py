"""AppTest of every page, including share links with valid, out-of-range and garbage parameters."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import component_data

APP = str(Path(__file__).resolve().parents[2] / "app.py")
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


def open_app(params: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    if params:
        at.query_params.update(params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def number(at: AppTest, label: str) -> int:
    return next(int(w.value) for w in at.number_input if w.label == label)


def test_home_shows_the_loaded_model_and_text():
    at = open_app()
    assert at.title[0].value == "HeadScope"
    status = " ".join(c.value for c in at.caption)
    assert "smollm2" in status and "30 layers × 9 heads" in status and "3 KV heads" in status
    assert any(PROMPT in t.value for t in at.text)


@pytest.mark.parametrize("view", ["model", "head", "token"])
def test_explorer_views_render(view):
    at = open_app({"page": "explorer", "view": view, "layer": "4", "head": "7"})
    assert at.title[0].value == "Attention explorer"
    assert number(at, "Layer") == 4 and number(at, "Head") == 7
    assert not at.warning
    if view == "token":
        assert any("mean of heads" in h.proto.body for h in at.get("html"))
    elif view == "model":  # the picture component (pages/widgets.py): every head, the selected one outlined
        (mosaic,) = component_data(at, "headscope_picture")
        assert (mosaic["rows"], mosaic["cols"], mosaic["outline"]) == (30, 9, [4, 5, 7, 8])
        assert mosaic["src"].startswith("data:image/png;base64,") and len(mosaic["ramp"]) == 11
        assert mosaic["clickable"] and mosaic["row_labels"][4] == "L4"
    else:  # one head's map with token labels and the weights for the hover
        (drawn,) = component_data(at, "headscope_picture")
        n = len(drawn["row_labels"])
        assert drawn["title"].startswith("Layer 4, head 7") and drawn["zoom"] and not drawn["clickable"]
        assert drawn["row_labels"][1] == "1  quick" and len(drawn["values"]) == n == drawn["cols"]
        np.testing.assert_allclose(drawn["values"][5][:6], at.session_state["capture"].head(4, 7)[5, :6], atol=1e-4)
    (share,) = component_data(at, "headscope_share_link")
    assert "page=explorer" in share["link"] and "layer=4&head=7" in share["link"]



def link_params(at: AppTest) -> dict:
    """The query parameters app.py writes at the end of a run (AppTest does not report
    st.query_params writes, so read them from the ViewState that app.py serialises)."""
    return at.session_state["view"].to_params()


def test_link_round_trip_through_query_params():
    params = {"page": "explorer", "view": "head", "layer": "2", "head": "5", "scale": "log"}
    at = open_app(params)
    assert link_params(at) == params


def test_out_of_range_link_falls_back_with_a_warning():
    at = open_app({"page": "explorer", "view": "head", "layer": "99", "head": "42"})
    warnings = " ".join(w.value for w in at.warning)
    assert "Layer 99 does not exist" in warnings and "Head 42 does not exist" in warnings
    assert number(at, "Layer") == 0 and number(at, "Head") == 0


def test_garbage_link_never_crashes_and_names_what_was_ignored():
    at = open_app({"page": "nowhere", "layer": "x", "model": "/etc/passwd", "view": "<script>",
                   "key": "../../etc", "image": "/tmp/cat.png", "bogus": "1"})
    warnings = " ".join(w.value for w in at.warning)
    for name in ("page", "layer", "model", "view", "key", "image", "bogus"):
        assert name in warnings
    assert link_params(at) == {}


def test_page_switch_keeps_the_state():
    at = open_app({"page": "explorer", "view": "head", "layer": "3", "head": "1"})
    at.switch_page("pages/home.py").run()
    assert not at.exception
    at.switch_page("pages/explorer.py").run()
    assert number(at, "Layer") == 3 and number(at, "Head") == 1
    assert link_params(at)["layer"] == "3" and link_params(at)["page"] == "explorer"


def test_running_a_new_prompt_from_the_sidebar_generates_text():
    at = open_app()
    at.sidebar.text_area[0].input("Paris is the capital of")
    at.sidebar.number_input[0].set_value(4)
    at.sidebar.button[0].click().run()
    assert not at.exception and not at.error
    status = " ".join(c.value for c in at.caption)
    assert "tokens" in status
    generated = [t.value for t in at.text]
    assert "Paris is the capital of" in generated
    assert any(g and g != "Paris is the capital of" and "prefill" not in g for g in generated)


def test_empty_prompt_gets_a_clear_message_and_nothing_is_cached():
    from capture.api import cached
    from core.types import RunSpec

    at = open_app()
    at.sidebar.text_area[0].input("   ")
    at.sidebar.button[0].click().run()
    assert not at.exception
    assert any("prompt is empty" in e.value for e in at.error)
    assert cached(RunSpec(model="smollm2", prompt="   ")) is None


def test_long_prompt_travels_by_capture_key():
    long_prompt = " ".join(["The lamp was lit at six and the wind was moderate."] * 20)
    at = open_app()
    at.sidebar.text_area[0].input(long_prompt)
    at.sidebar.button[0].click().run()
    assert not at.exception
    params = link_params(at)
    assert "prompt" not in params and len(params["key"]) == 20
    shared = open_app({"key": params["key"], "page": "explorer", "view": "token"})
    assert not shared.warning
    assert shared.session_state["view"].prompt == long_prompt
    assert shared.sidebar.text_area[0].value == long_prompt


def test_unknown_capture_key_falls_back_to_the_prompt_with_a_warning():
    at = open_app({"key": "0123456789abcdef0123", "prompt": "Hello there"})
    assert any("not in this server's cache" in w.value for w in at.warning)
    assert at.sidebar.text_area[0].value == "Hello there"


def test_pictures_place_each_cell_and_export_a_labelled_svg():
    """charts.attention pictures: thumbnail (layer, head) sits at row layer, column head of the mosaic PNG,
    coloured by the attention scale; a head's picture leaves a causal map's future blank; picture_svg
    labels the axes and embeds the same picture."""
    import base64
    import io
    import re

    from PIL import Image

    from charts.attention import head_picture, model_mosaic, picture_svg
    from charts.theme import ATTENTION_SCALE, colour_table

    def pixels(p):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(p.src.split(",", 1)[1]))))

    thumbs = np.zeros((3, 2, 8, 8), dtype=np.float32)
    thumbs[2, 1, 5, 6] = 1.0  # one hot block in layer 2, head 1
    m = model_mosaic(thumbs)
    picture = pixels(m)
    assert picture.shape == (3 * m.cell, 2 * m.cell, 4) and m.cell == 9  # 8 bins + a 1-pixel gap
    lut = colour_table(ATTENTION_SCALE)
    assert tuple(picture[2 * m.cell + 5, 1 * m.cell + 6, :3]) == tuple(lut[255])
    assert tuple(picture[2 * m.cell + 5, 1 * m.cell + 5, :3]) == tuple(lut[0])
    assert picture[0, 8, 3] == 0  # the gap is transparent
    svg = picture_svg(m)
    assert svg.startswith("<svg") and m.src in svg and "max weight" in svg
    assert re.findall(r">(H\d+)<", svg) == ["H0", "H1"] and re.findall(r">(L\d+)<", svg) == ["L0", "L1", "L2"]

    attn = np.tril(np.full((4, 4), 0.25, dtype=np.float32))
    h = head_picture(attn, list("abcd"), list("abcd"), title="Layer 0, head 0")
    drawn = pixels(h)
    assert drawn.shape == (4, 4, 4) and drawn[0, 1, 3] == 0 and drawn[1, 0, 3] == 255  # future keys blank
    assert h.row_labels == ("0 a", "1 b", "2 c", "3 d") and h.values[3][0] == 0.25
    assert ">3 d<" in picture_svg(h) and "Layer 0, head 0" in picture_svg(h)


def test_intervene_page_compares_a_vision_models_maps():
    """A vision model reads its picture, not a prompt: the Intervene page runs its baseline (it asked for a prompt
    before, and then raised KeyError 'prompt' on a capture without one) and compares the maps after an edit."""
    at = open_app({"page": "intervene", "model": "dinov2-s", "image": "cat"})
    assert not at.error and at.info[0].value.startswith("Pick heads and a preset")
    at.multiselect(key="iv_heads").set_value(["L1H0"]).run()
    at.button(key="iv_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert any("is an encoder" in w.value for w in at.warning)  # only the maps are compared
    assert at.get("plotly_chart")
