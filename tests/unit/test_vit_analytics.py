"""analytics.vision on synthetic maps with known answers, the token layout, the image charts and uploads."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from analytics import vision
from analytics.vision import Layout


def _uniform(n: int, heads: int = 2) -> np.ndarray:
    return np.full((heads, n, n), 1.0 / n, dtype=np.float32)


def test_self_attention_has_distance_zero_and_uniform_the_grid_mean():
    layout = Layout(grid=(4, 5), n_prefix=1, patch_px=14)
    n = 1 + 20
    identity = np.broadcast_to(np.eye(n, dtype=np.float32), (3, n, n))
    np.testing.assert_allclose(vision.mean_attention_distance(identity, layout), 0.0, atol=1e-9)
    uniform = _uniform(n)  # includes the CLS key: renormalised over the patches it is uniform there too
    expected = vision.grid_mean_distance(layout)
    np.testing.assert_allclose(vision.mean_attention_distance(uniform, layout), expected, rtol=1e-6)
    # by hand on a 2 x 2 grid of 10-px patches: each patch sees 0, 10, 10 and 14.14 px
    small = Layout(grid=(2, 2), n_prefix=0, patch_px=10)
    assert vision.grid_mean_distance(small) == pytest.approx((0 + 10 + 10 + 200 ** 0.5) / 4)


def test_neighbour_head_and_cls_mass():
    layout = Layout(grid=(3, 3), n_prefix=1, patch_px=16)
    attn = np.zeros((1, 10, 10), np.float32)
    for r in range(3):
        for c in range(3):
            q = layout.token(r, c)
            attn[0, q, layout.token(r, (c + 1) % 3 if c < 2 else c - 1)] = 0.5  # a horizontal neighbour
            attn[0, q, 0] = 0.5  # half the mass on CLS
    attn[0, 0, 0] = 1
    assert vision.mean_attention_distance(attn, layout)[0] == pytest.approx(16.0)
    assert vision.mean_attention_distance(attn, layout, renormalize=False)[0] == pytest.approx(8.0)


def test_distance_profile():
    layout = Layout(grid=(4, 4), n_prefix=1, patch_px=10)
    n = 17
    ident = vision.distance_profile(np.eye(n, dtype=np.float32)[None], layout)
    assert ident.mass[0, 0] == pytest.approx(1.0) and ident.mass[0, 1:].sum() == pytest.approx(0.0)
    assert ident.pairs[0] == 16 and ident.pairs.sum() == 256
    uni = vision.distance_profile(_uniform(n, 1), layout)
    np.testing.assert_allclose(uni.strength[0], 1 / 16, rtol=1e-6)  # every key equally strong
    assert uni.mass[0].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(uni.distance_px, np.arange(len(uni.pairs)) * 10)
    assert uni.strength.shape == (1, int(np.rint(np.hypot(3, 3))) + 1)


def test_grid_maps_with_registers():
    layout = Layout(grid=(3, 4), n_prefix=5)
    n = 5 + 12
    attn = np.zeros((2, n, n), np.float32)
    attn[:, 0, layout.token(2, 1)] = 1  # CLS looks at patch (2, 1)
    attn[:, layout.token(1, 3), layout.token(0, 0)] = 1
    cls = vision.cls_attention(attn, layout)
    assert cls.shape == (2, 3, 4) and cls[0, 2, 1] == 1 and cls.sum() == 2
    patch = vision.patch_attention(attn, layout, 1, 3)
    assert patch[1, 0, 0] == 1 and patch.sum() == 2
    with pytest.raises(IndexError):
        layout.token(3, 0)


def test_rollout():
    n = 5
    eye = np.broadcast_to(np.eye(n), (3, 2, n, n))
    np.testing.assert_allclose(vision.attention_rollout(eye), np.eye(n))
    uni = np.full((1, 2, n, n), 1 / n)
    np.testing.assert_allclose(vision.attention_rollout(uni), 0.5 * np.eye(n) + 0.5 / n)
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, n, n))
    a /= a.sum(-1, keepdims=True)
    hat = [(x.mean(0) + np.eye(n)) / 2 for x in a]
    np.testing.assert_allclose(vision.attention_rollout(a), hat[1] @ hat[0])
    np.testing.assert_allclose(vision.attention_rollout(a, discard_ratio=0.5).sum(-1), 1.0)
    np.testing.assert_allclose(vision.attention_rollout(a, head_fusion="max", residual=False).sum(-1), 1.0)


def test_high_norm_tokens():
    layout = Layout(grid=(2, 3), n_prefix=1)
    norms = np.ones((3, 7))
    norms[2, layout.token(1, 1)] = 10.0  # one patch with 10x the median norm in hidden state 2
    received = np.zeros((2, 7))
    received[:, layout.token(1, 1)] = 0.4
    found = vision.high_norm_tokens(norms, layout, received)
    assert [len(f) for f in found] == [0, 0, 1]
    token = found[2][0]
    assert token.token == layout.token(1, 1) and token.ratio == pytest.approx(10) and token.received is None
    found = vision.high_norm_tokens(norms[[0, 2, 1]], layout, received)  # in a state some block reads
    assert found[1][0].received == pytest.approx(0.4)


def test_token_layout():
    from capture.vision.adapter import token_layout

    tokens, spans = token_layout("dinov2_with_registers", 1 + 4 + 6, (2, 3))
    assert tokens[:6] == ["CLS", "reg0", "reg1", "reg2", "reg3", "patch(0,0)"] and tokens[-1] == "patch(1,2)"
    assert spans == {"cls": range(0, 1), "registers": range(1, 5), "patches": range(5, 11)}
    tokens, spans = token_layout("deit", 2 + 4, (2, 2))
    assert tokens[:2] == ["CLS", "DIST"] and spans["distill"] == range(1, 2)
    tokens, spans = token_layout("siglip_vision_model", 4, (2, 2))
    assert tokens[0] == "patch(0,0)" and spans == {"patches": range(0, 4)}


def test_overlay_chart():
    from charts import image as charts

    picture = np.zeros((28, 42, 3), np.uint8)
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    fig = charts.attention_overlay(picture, values, opacity=0.3, selected=(1, 2))
    kinds = [t.type for t in fig.data]
    assert kinds == ["image", "heatmap", "scatter", "scatter"]  # picture, blocks, grid lines, click targets
    heat = fig.data[1]
    assert heat.zsmooth is False and heat.opacity == 0.3 and (heat.dx, heat.dy) == (14, 14)
    grid_lines, points = fig.data[2], fig.data[3]
    assert grid_lines.mode == "lines" and list(grid_lines.x).count(None) == (2 - 1) + (3 - 1)
    assert grid_lines.x[:2] == (13.5, 13.5) and grid_lines.y[-3:-1] == (13.5, 13.5)
    assert [(int(p[0]), int(p[1])) for p in points.customdata] == [(r, c) for r in range(2) for c in range(3)]
    assert [float(p[2]) for p in points.customdata] == list(values.ravel())  # the hover shows the value
    assert points.x[5] == pytest.approx(2.5 * 14 - 0.5) and points.y[5] == pytest.approx(1.5 * 14 - 0.5)
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(fig.layout.shapes) == 1 and len(rects) == 1 and rects[0].x0 == pytest.approx(27.5)
    assert not [t for t in charts.attention_overlay(picture, values, grid_lines=False).data if t.name == "grid"]
    assert charts.patch_from_selection({"points": [{"customdata": [1, 2]}]}) == (1, 2)
    assert charts.patch_from_selection({"points": [{"customdata": {"0": 1, "1": 2, "2": 0.5}}]}) == (1, 2)
    assert charts.patch_from_selection({"points": []}) is None
    grid = charts.head_overlays(picture, np.stack([values] * 4), per_row=2)
    assert sum(t.type == "heatmap" for t in grid.data) == 4
    assert charts.layer_head_chart(np.ones((3, 4))).data[0].z.shape == (3, 4)


def _png(size=(20, 10), mode="RGB", fmt="PNG") -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def test_uploads(tmp_path, monkeypatch):
    from capture import images
    from core.errors import InputError

    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path))
    ref = images.store_upload(_png())
    assert images.HASH_RE.match(ref) and images.store_upload(_png()) == ref  # same bytes, same name
    assert images.load_image(ref).size == (20, 10)
    assert images.load_image(images.store_upload(_png(mode="RGBA"))).mode == "RGB"
    for bad, words in [(b"hello, not an image", "not an image"), (b"", "empty"),
                       (_png((64, 64))[:6000], "damaged"), (_png(fmt="TIFF"), "not supported"),
                       (_png((64, 64), fmt="JPEG")[:2000], "damaged")]:
        with pytest.raises(InputError, match=words):
            images.store_upload(bad)
    monkeypatch.setattr(images, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(InputError, match="at most"):
        images.store_upload(_png())
    monkeypatch.setattr(images, "MAX_UPLOAD_BYTES", 2**20)
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(InputError, match="megapixels"):
        images.store_upload(_png())
    monkeypatch.setattr(images, "MAX_PIXELS", 40_000_000)
    with pytest.raises(InputError, match="upload it again"):
        images.load_image("sha256:" + "0" * 64)
    with pytest.raises(InputError, match="no sample image"):
        images.load_image("../../etc/passwd")
    assert {"cat", "astronaut", "coffee", "rocket"} <= set(images.sample_names())
    path = tmp_path / "photo.png"
    path.write_bytes(_png((30, 30)))
    assert images.canonical_image(str(path)).startswith("sha256:")
    assert images.canonical_image("cat") == "cat"
