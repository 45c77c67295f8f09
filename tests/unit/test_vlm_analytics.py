"""analytics/vlm.py on hand-made maps with known answers (no model), and the metrics on a tiny VLM capture."""
from __future__ import annotations

import numpy as np
import pytest

from analytics import vlm
from analytics.pointing import in_box, pointing
from analytics.vision import Layout

IMAGE = range(2, 6)  # a 2 x 2 grid of image tokens at positions 2..5
GRID = (2, 2)


def test_decode_rows():
    assert vlm.decode_rows({"prompt": range(10), "answer": range(10, 13)}, 13) == range(9, 12)
    assert vlm.decode_rows({"prompt": range(10)}, 10) == range(9, 10)


def test_image_centric_rows_follow_var():
    rows = np.zeros((4, 8), np.float32)
    rows[0, [0, 2, 3]] = [0.7, 0.2, 0.1]  # visual mass 0.3, none on sinks: centric
    rows[1, [0, 2]] = [0.9, 0.1]  # visual mass 0.1 < 0.2: not
    rows[2, [0, 4, 5]] = [0.5, 0.4, 0.1]  # mass 0.5, 0.4 on the visual sink at 4 (80% > 50%): not
    rows[3, [0, 4, 5]] = [0.5, 0.2, 0.3]  # mass 0.5, 0.2 on the sink (40%): centric
    got = vlm.image_centric_rows(rows, IMAGE, visual_sinks=[4])
    assert got.tolist() == [True, False, False, True]
    np.testing.assert_allclose(vlm.visual_mass(rows, IMAGE), [0.3, 0.1, 0.5, 0.5], atol=1e-6)
    # a sink outside the image span is not a visual sink
    assert vlm.image_centric_rows(rows, IMAGE, visual_sinks=[0]).tolist() == [True, False, True, True]


def test_visual_sinks_from_massive_activations():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(5, 8, 1024)).astype(np.float32)  # [layer, token, dim]; φ <= sqrt(dim)
    hidden[2:, 0, 7] = 400.0  # the first token: a text sink on dim 7
    hidden[3, 4, 7] = 300.0  # image token 4 (patch (1, 0)): a visual sink on the same dim
    hidden[2:, 7, 7] = 500.0  # token 7 is after the prompt: never a sink (prefill only)
    found = vlm.visual_sinks(hidden, IMAGE, GRID, n_prompt=7)
    assert found.dims == [7]
    assert found.tokens == [0, 4] and found.visual == [4] and found.patches == [(1, 0)]
    assert found.phi[7] == 0 and found.phi[4] > 20


def test_gaze_shifts_and_saliency():
    a = np.zeros((4, 2, 2), np.float32)
    a[1] = [[0.5, 0.0], [0.0, 0.0]]
    a[2] = [[0.5, 0.3], [0.0, 0.0]]  # shift to (0, 1); (0, 0) stays: no shift there
    a[3] = [[0.0, 0.3], [0.0, 0.6]]  # shift to (1, 1); the drop at (0, 0) does not count
    g = vlm.gaze_shifts(a)
    assert g.shape == (3, 2, 2)
    np.testing.assert_allclose(g[0], [[0.5, 0], [0, 0]])
    np.testing.assert_allclose(g[1], [[0, 0.3], [0, 0]])
    np.testing.assert_allclose(g[2], [[0, 0], [0, 0.6]])
    np.testing.assert_allclose(vlm.saliency(g), [[0.5 / 0.6, 0.5], [0, 1.0]], atol=1e-6)
    assert vlm.saliency(np.zeros((2, 2, 2))).max() == 0


def test_constant_sink_shows_no_shift():
    """GIFT's point: a patch that takes the same large attention from every token never shifts."""
    a = np.full((5, 2, 2), 0.01, np.float32)
    a[:, 0, 0] = 0.8  # a visual sink: constant
    a[3, 1, 1] = 0.2  # the asked object, looked at while reading one word
    s = vlm.saliency(vlm.gaze_shifts(a))
    assert np.unravel_index(np.argmax(s), s.shape) == (1, 1) and s[0, 0] == 0


def test_question_words():
    tokens = ["what", " colour", " is", " the", " circ", "le", "?"]
    assert vlm.question_words(tokens) == [("what", [0]), ("colour", [1]), ("is", [2]), ("the", [3]),
                                          ("circle?", [4, 5, 6])]


def test_pointing_game():
    size = (112, 112)  # an 8 x 8 grid of 14 px patches
    s = np.zeros((8, 8), np.float32)
    s[2, 3] = 1.0  # peak at patch (2, 3): centre (35, 49)
    hit = pointing([s], [[(42, 28, 56, 42)]], size)  # the box holds that centre
    miss = pointing([s], [[(0, 0, 20, 20)]], size)
    assert hit.hits.tolist() == [True] and miss.hits.tolist() == [False]
    assert hit.chance_rate == pytest.approx(1 / 64)  # one patch centre of 64 in the box
    assert pointing([s], [[(0, 0, 20, 20), (42, 28, 56, 42)]], size).hit_rate == 1.0  # any asked object
    assert in_box((8, 8), size, (0, 0, 112, 112)).all()


class _Capture:
    """A capture stand-in over hand-made maps: [layer, head, query, key]."""

    def __init__(self, maps, spans, grid, tokens):
        from core.types import ModelMeta

        self.maps = np.asarray(maps, np.float32)
        layers, heads, n, _ = self.maps.shape
        self.meta = ModelMeta("toy", "llava", "vlm", layers, heads, heads, 4, True, grid=grid)
        self.spans, self.tokens, self.n_tokens = spans, tokens, n

    def rows(self, layer, start, stop, dtype=np.float32):
        return self.maps[layer, :, start:stop, :stop].astype(dtype)

    def image(self):
        return np.zeros((28, 28, 3), np.uint8)


def test_gaze_and_head_vision_on_a_toy_capture():
    n = 10  # 0 bos, 1 newline, 2..5 image, 6 newline, 7..8 question, 9 answer
    maps = np.zeros((3, 2, n, n), np.float32)
    maps[..., 0] = 1.0  # everything on the first token ...
    maps[:, :, 7, :] = 0  # ... but question token 7 looks at patch (0, 1) in every layer and head
    maps[:, :, 7, [0, 3]] = [0.5, 0.5]
    maps[:, :, 8, :] = 0
    maps[:, :, 8, [0, 5]] = [0.2, 0.8]  # ... and token 8 at patch (1, 1)
    spans = {"prompt": range(9), "image": IMAGE, "question": range(7, 9), "answer": range(9, 10)}
    tokens = ["<s>", "↵", "patch(0,0)", "patch(0,1)", "patch(1,0)", "patch(1,1)", "↵", "red", "?", "x"]
    cap = _Capture(maps, spans, GRID, tokens)
    found = vlm.gaze(cap, layers=[0, 1, 2])
    assert found.g.shape == (2, 2, 2) and found.words == [("red?", [0, 1])]
    np.testing.assert_allclose(found.saliency, [[0, 0.5 / 0.8], [0, 1.0]], atol=1e-6)
    assert found.filmstrip().shape == (1, 2, 2)
    assert vlm.layer_set(30) == list(range(2, 30)) and vlm.layer_set(2) == [1]
    per_head = vlm.gaze_per_head(cap)
    np.testing.assert_allclose(per_head, np.full((3, 2), 0.5 + 0.8), atol=1e-6)
    hv = vlm.head_vision(cap)  # the decode row is 8 (the last prompt row): mass 0.8
    np.testing.assert_allclose(hv.mass, 0.8, atol=1e-6)
    assert hv.centric_heads().all() and hv.per_layer().tolist() == [2, 2, 2]
    assert not vlm.head_vision(cap, visual_sinks=[5]).centric_heads().any()  # all of it on a visual sink
    assert Layout.of(cap).n_prefix == 2


def test_t_vhd_is_the_mean_of_the_top_k_heads():
    vhd = np.zeros((2, 3, 2), np.float32)  # [layer, head, token]
    vhd[0, 0, 0], vhd[1, 2, 0], vhd[0, 1, 0] = 5.0, 3.0, 1.0
    vhd[1, 1, 1] = 2.0
    np.testing.assert_allclose(vlm.t_vhd(vhd, k=2), [4.0, 1.0])
    np.testing.assert_allclose(vlm.t_vhd(vhd, k=100), [9.0 / 6, 2.0 / 6])
