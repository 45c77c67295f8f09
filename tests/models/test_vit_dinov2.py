"""Integration on the real embedded DINOv2-small: capture, spatial analytics and the vision probes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from analytics import METRICS, vision
from capture import images
from capture.api import run
from capture.vision.adapter import VisionAdapter
from core.errors import ProbeMissing
from core.types import RunSpec
from probes import vision as probes_vision


@pytest.fixture(scope="module")
def dinov2():
    from capture import registry

    return registry.load("dinov2-s")


@pytest.fixture(scope="module")
def vstore(tmp_path_factory):
    from cache.store import Store

    s = Store(tmp_path_factory.mktemp("vit") / "cache", size_limit=2**30)
    yield s
    s.close()


@pytest.fixture(scope="module")
def cat(dinov2, vstore):
    return run(RunSpec(model="dinov2-s", image="cat"), store=vstore)


def test_capture_layout_and_eager_equality(dinov2, cat):
    assert cat.meta.modality == "vision" and cat.meta.grid == (16, 16) and cat.n_tokens == 257
    assert cat.tokens[:2] == ["CLS", "patch(0,0)"] and cat.tokens[-1] == "patch(15,15)"
    assert cat.spans == {"cls": range(0, 1), "patches": range(1, 257)} and cat.layout == "full"
    assert cat.image().shape == (224, 224, 3)
    pixels, _ = images.preprocess(images.load_image("cat"), dinov2.tokenizer)
    dinov2.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            eager = dinov2.model(pixel_values=torch.from_numpy(pixels)[None], output_attentions=True).attentions
    finally:
        dinov2.model.set_attn_implementation("headscope")
    for layer in range(12):
        maps = cat.attention(layer).astype(np.float32)
        np.testing.assert_allclose(maps, eager[layer][0].numpy(), atol=1e-3)
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=2e-2)
    assert cat.head(11, 2).shape == (257, 257)


def test_last_layer_cls_attention_prefers_the_cat_to_the_border(dinov2, vstore):
    """Centre region vs border ring of the WHOLE photo (aspect kept, 224 px high: 16 x 24 patches).

    The mask: Chelsea's face fills the middle of the photo (eyes, nose) and the border ring is where
    the background lies (the wall on the right, the top corners).  The default 224 x 224 centre crop
    is not used here: it cuts away nearly all background, so its "border" is cat fur too.
    """
    adapter = VisionAdapter(dinov2)
    adapter.prep = dataclasses.replace(adapter.prep, size={"shortest_edge": 224}, do_center_crop=False)
    capture = adapter.capture(RunSpec(model="dinov2-s", image="cat", seed=1), "whole-cat", vstore, lambda *_: None)
    rows, cols = capture.meta.grid
    assert (rows, cols) == (16, 24)
    cls = vision.cls_attention(capture.attention(11), vision.Layout.of(capture)).mean(0)  # [rows, cols]
    border = np.zeros((rows, cols), bool)
    border[:2] = border[-2:] = True
    border[:, :2] = border[:, -2:] = True
    centre = np.zeros((rows, cols), bool)
    centre[rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4] = True
    assert cls[centre].mean() > cls[border].mean()


def test_mean_attention_distance_grows_with_depth(cat):
    distance = vision.distance_per_head(cat)  # [layer, head] px
    assert distance.shape == (12, 6) and (distance >= 0).all() and (distance < 224 * 1.5).all()
    per_layer = distance.mean(1)
    assert per_layer[-4:].mean() > per_layer[:4].mean()
    np.testing.assert_allclose(METRICS["attn_distance_px"].compute(cat), distance)


def test_rollout_and_profile(cat):
    rollout = METRICS["rollout"].compute(cat)
    assert rollout.shape == (257,) and rollout.sum() == pytest.approx(1.0, abs=1e-3)
    layout = vision.Layout.of(cat)
    assert layout.patch_px == 14
    profile = vision.distance_profile(cat.attention(0), layout)
    assert profile.strength.shape[0] == 6 and profile.mass.sum(-1) == pytest.approx(np.ones(6), abs=1e-3)


def test_token_norms_probe(cat):
    with pytest.raises(ProbeMissing, match="token_norms"):
        METRICS["token_norm"].compute(cat)
    norms = probes_vision.token_norms(cat)
    assert norms.shape == (13, 257) and (norms > 0).all()
    np.testing.assert_allclose(METRICS["token_norm"].compute(cat), norms[-1])
    received = np.stack([vision.received_attention(cat.attention(l)).mean(0) for l in range(12)])
    found = vision.high_norm_tokens(norms, vision.Layout.of(cat), received)
    assert len(found) == 13 and found[0] == []


def test_most_important_head_changes_cls_more_than_least(cat):
    with pytest.raises(ProbeMissing):
        METRICS["vit_grad_gate"].compute(cat)
    importance = probes_vision.grad_gate(cat)
    assert importance.shape == (12, 6) and np.isfinite(importance).all()
    np.testing.assert_array_equal(METRICS["vit_grad_gate"].compute(cat), importance)
    top = tuple(int(i) for i in np.unravel_index(importance.argmax(), importance.shape))
    bottom = tuple(int(i) for i in np.unravel_index(importance.argmin(), importance.shape))
    result = probes_vision.ablation(cat, heads=[top, bottom])
    assert result[0][top] > result[0][bottom] > 0
    assert np.isnan(result[2][top])  # an encoder has no class probabilities


def test_vision_page_renders(cat):
    """The Vision page through the app, as a share link opens it: CLS query, then a linked patch."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    app_file = str(Path(__file__).resolve().parents[2] / "app.py")
    link = {"page": "vision", "model": "dinov2-s", "image": "cat", "layer": "11", "head": "-1"}
    app = AppTest.from_file(app_file, default_timeout=120)
    app.query_params.update(link)
    app.run()
    assert not app.exception and len(app.get("plotly_chart")) == 5
    assert any("Query: CLS token" in m.value for m in app.markdown)
    app = AppTest.from_file(app_file, default_timeout=120)
    app.query_params.update(dict(link, patch="3,4"))
    app.run()
    assert not app.exception and any("patch (3, 4)" in m.value for m in app.markdown)