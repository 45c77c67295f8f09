"""The Attribution page on the other kinds of model (issue 24, items 4 and 5; pages/attribution_pictures.py):
activation patching of shapes-vlm's language-model heads between two pictures and of shapes-dit's heads
between two prompts (Wang et al. 2022; Heimersheim & Nanda 2024), opened on a link in AppTest.

Without a cached result the page offers one button; a click computes the sweep, and the before | after
numbers and the map are then the stored result's (analytics.patching_kinds).  The link carries the controls,
bad input is one sentence, and dinov2-s (no classifier) is refused with one sentence.  The "not cached"
tests evict their probe key first; the sweeps land in the tests' default cache (shapes-vlm's 270 heads
about 40 s on 2 CPU cores, shapes-dit's 16 heads x 20 steps a few seconds).
"""
from __future__ import annotations

from dataclasses import asdict

import pytest

from analytics.patching_kinds import read_dit_patching, read_vlm_patching
from capture import default_store, revision
from conftest import component_data, open_app
from core.probe_results import DitPatchingParams, VlmPatchingParams, probe_key
from state import ViewState

VLM_LINK = {"page": "attribution", "model": "shapes-vlm", "layer": "20", "head": "3"}
DIT_LINK = {"page": "attribution", "model": "shapes-dit", "layer": "1", "head": "2"}


def evict(model: str, kind: str, params) -> None:
    """As on a fresh cache: the page must offer the button."""
    default_store().evict(probe_key(revision(model), kind, params))


def shown(at) -> dict:
    return {m.label: m.value for m in at.metric}


def run_button(at):
    buttons = [b for b in at.button if b.key == "ap_run"]
    assert len(buttons) == 1 and buttons[0].label == "Run activation patching"
    return buttons[0]


def check_page_numbers(at, patching, layer: int, head: int, base: float) -> None:
    """The page's metrics and map are the stored result's."""
    metrics = shown(at)
    assert metrics["clean run"] == f"{patching.clean:.4g}"
    assert metrics["corrupted run"] == f"{patching.corrupted:.4g}"
    assert metrics[f"L{layer} H{head} patched"] == f"{patching.patched[layer, head]:.4g}"
    assert metrics["share of the gap"] == f"{patching.effect[layer, head]:.1%}"
    (delta,) = [m.proto.delta for m in at.metric if m.label == f"L{layer} H{head} patched"]
    assert delta == f"{patching.patched[layer, head] - base:+.4g}"
    (grid,) = [p for p in component_data(at, "headscope_picture") if p["title"].startswith("Share of the gap")]
    assert (grid["rows"], grid["cols"]) == patching.patched.shape and grid["clickable"]
    assert grid["outline"] == [layer, layer + 1, head, head + 1]  # the selected head framed
    assert grid["values"][layer][head] == pytest.approx(float(patching.effect[layer, head]), abs=1e-6)


def test_link_fields_of_the_picture_kinds_are_validated():
    state, warnings = ViewState.from_params({"corrupted_image": "scene-4", "positions": "image"})
    assert not warnings and (state.corrupted_image, state.positions) == ("scene-4", "image")
    assert ViewState.from_params(state.to_params()) == (state, [])
    bad, warnings = ViewState.from_params({"corrupted_image": "/etc/passwd", "positions": "everywhere"})
    assert len(warnings) == 2 and bad == ViewState.from_params({})[0]
    assert "corrupted_image" in warnings[0] and "positions" in warnings[1]


def test_vlm_button_computes_then_the_page_shows_the_stored_result():
    evict("shapes-vlm", "vlm_patching", VlmPatchingParams())
    at = open_app(VLM_LINK)
    assert not at.metric and not at.error
    run_button(at).click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    assert not [b for b in at.button if b.key == "ap_run"]  # cached now: drawn at once
    patching = read_vlm_patching(store=default_store(), revision=revision("shapes-vlm"), model="shapes-vlm",
                                 **asdict(VlmPatchingParams()))
    assert patching.clean > patching.corrupted  # scene-3's circle is red: ' red' - ' yellow' falls on scene-4
    check_page_numbers(at, patching, 20, 3, patching.corrupted)
    assert at.session_state["view"].to_params() == {**VLM_LINK, "image": "scene-3"}  # the sidebar's picture
    # a fresh session on the same link draws the cached result at once
    again = open_app(VLM_LINK)
    assert shown(again) == shown(at) and not [b for b in again.button if b.key == "ap_run"]


def test_vlm_link_carries_the_controls_and_the_controls_write_the_link():
    params = {"page": "attribution", "model": "shapes-vlm", "prompt": "what colour is the square?",
              "image": "scene-12", "corrupted_image": "scene-4", "target": "red", "foil": "blue", "measure": "prob",
              "direction": "noise", "positions": "image"}
    at = open_app(params)
    assert at.session_state["view"].to_params() == params and not at.error
    assert at.text_input(key="ap_prompt").value == "what colour is the square?"
    assert at.selectbox(key="ap_corrupted_image").value == "scene-4" and at.text_input(key="ap_foil").disabled
    at.text_input(key="ap_target").set_value("green").run()
    at.selectbox(key="ap_corrupted_image").set_value("scene-7").run()
    at.segmented_control(key="w_positions").set_value("text").run()
    link = at.session_state["view"].to_params()
    assert (link["target"], link["corrupted_image"], link["positions"]) == ("green", "scene-7", "text")
    assert len(run_button(at).label) > 0 and not at.exception


def test_vlm_answer_of_two_tokens_is_one_sentence():
    at = open_app({**VLM_LINK, "target": "reddish purple"})
    run_button(at).click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "not one" in errors[0] and errors[0].count(".") <= 2, errors


def test_dit_button_computes_then_the_pictures_and_numbers_are_the_stored_ones():
    evict("shapes-dit", "dit_patching", DitPatchingParams())
    at = open_app(DIT_LINK)
    assert not at.metric
    run_button(at).click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    patching = read_dit_patching(store=default_store(), revision=revision("shapes-dit"), model="shapes-dit",
                                 **asdict(DitPatchingParams()))
    assert patching.clean == 0 < patching.corrupted  # the distance to the clean prompt's picture
    check_page_numbers(at, patching, 1, 2, patching.corrupted)
    captions = [c.value for c in at.caption]
    shown_captions = [caption for element in at.get("image") for caption in element.captions]
    assert shown_captions == ["clean: a red circle at the center", "corrupted: a blue circle at the center"]
    assert any("16 heads" in c for c in captions)
    assert at.session_state["view"].to_params() == DIT_LINK


def test_dit_link_carries_prompts_seed_steps_and_direction():
    params = {**DIT_LINK, "clean": "a green square at the top", "corrupted": "a yellow square at the top",
              "seed": "3", "steps": "4", "direction": "noise"}
    at = open_app(params)
    assert at.session_state["view"].to_params() == params and not at.error
    assert at.number_input(key="ap_steps").value == 4 and at.text_input(key="ap_clean").value == params["clean"]
    at.number_input(key="ap_seed").set_value(5).run()
    assert at.session_state["view"].to_params()["seed"] == "5"


def test_dit_patching_samples_at_the_links_guidance_scale():
    """The sidebar's Guidance scale (a link's `guidance`, as a capture's) is the scale both prompts are sampled at:
    the stored result is the one of DitPatchingParams(guidance=1.0), not of the default scale."""
    params = DitPatchingParams(steps=2, guidance=1.0)
    evict("shapes-dit", "dit_patching", params)
    at = open_app({**DIT_LINK, "steps": "2", "guidance": "1"})
    assert at.number_input(key="f_guidance").value == 1.0
    run_button(at).click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    patching = read_dit_patching(store=default_store(), revision=revision("shapes-dit"), model="shapes-dit",
                                 **asdict(params))
    check_page_numbers(at, patching, 1, 2, patching.corrupted)


def test_dit_prompts_of_different_lengths_are_one_sentence():
    at = open_app({**DIT_LINK, "corrupted": "a blue circle in the very middle of it all", "steps": "2"})
    run_button(at).click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "the same number of tokens" in errors[0], errors


def test_dinov2_is_refused_with_one_sentence():
    at = open_app({"page": "attribution", "model": "dinov2-s"})
    assert not at.error and not [b for b in at.button if b.key == "ap_run"]
    (info,) = [i.value for i in at.info]
    assert info.startswith("ViT patching needs a ViT or DeiT image classifier") and "dinov2-s is not one" in info


@pytest.fixture
def vit_classifier(tmp_path, monkeypatch):
    """A tiny random ViT image classifier saved as a folder (5 classes, 32 px pictures) the operator allows."""
    import json

    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    labels = {i: name for i, name in enumerate(["cat", "coffee", "tabby", "mug", "dog"])}
    model = ViTForImageClassification(ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=32, patch_size=8, num_labels=5,
                                                id2label=labels, label2id={v: k for k, v in labels.items()},
                                                initializer_range=0.2))
    folder = tmp_path / "tiny-vit-classifier"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 32, "width": 32}, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "rescale_factor": 1 / 255}))
    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", str(folder))
    return str(folder)


def test_vit_classifier_button_computes_then_the_page_shows_the_stored_result(vit_classifier):
    """The ViT path of the page on a real (tiny, random) classifier folder: cat vs coffee, each picture's top
    class by default; the numbers and the map are the stored vit_patching result's."""
    from analytics.patching_kinds import read_vit_patching
    from core.probe_results import VitPatchingParams

    params = VitPatchingParams()  # the page's defaults: cat vs coffee, the top classes
    evict(vit_classifier, "vit_patching", params)
    at = open_app({"page": "attribution", "model": vit_classifier, "layer": "1", "head": "2"})
    assert not at.error, [e.value for e in at.error]
    run_button(at).click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    patching = read_vit_patching(store=default_store(), revision=revision(vit_classifier), model=vit_classifier,
                                 **asdict(params))
    check_page_numbers(at, patching, 1, 2, patching.corrupted)
