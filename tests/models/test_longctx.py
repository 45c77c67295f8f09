"""Long contexts: the "qk" layout (queries + keys + one-pass reductions) against the stored "tril" maps.

One ~1,000-token SmolLM2 prompt (+4 generated tokens, so the response rows have their own column
sums) is captured twice: with the default threshold (stored packed triangle) and with the
threshold lowered to 512 (qk layout).  The 8,192-token run is in bench/peers.py, not here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import analytics
from analytics import summary
from analytics.reduced import stored_summary
from bench.common import prompt_of
from cache.store import Store
from capture.api import run
from capture.engine import longctx, memory
from capture.text.adapter import TextAdapter
from conftest import component_data
from core.errors import InputError
from core.interventions import HeadEdit, Intervention
from core.types import Capture, ModelMeta, RunSpec
from core.layouts import max_pool

N_PROMPT = 1000
LAYERS = (0, 9, 29)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, smollm2):
    """(tril capture, qk capture) of the same spec, in two stores."""
    root = tmp_path_factory.mktemp("longctx")
    spec = RunSpec(model="smollm2", prompt=prompt_of(smollm2.tokenizer, N_PROMPT), max_new_tokens=4)
    tril_store, qk_store = Store(root / "tril", size_limit=4 * 2**30), Store(root / "qk", size_limit=4 * 2**30)
    tril = run(spec, store=tril_store)
    old = os.environ.get("HEADSCOPE_QK_THRESHOLD")
    os.environ["HEADSCOPE_QK_THRESHOLD"] = "512"
    try:
        qk = run(spec, store=qk_store)
    finally:
        if old is None:
            os.environ.pop("HEADSCOPE_QK_THRESHOLD")
        else:
            os.environ["HEADSCOPE_QK_THRESHOLD"] = old
    yield tril, qk
    tril_store.close()
    qk_store.close()


def test_layout_chosen_by_length(pair):
    tril, qk = pair
    assert tril.layout == "tril" and qk.layout == "qk"
    assert qk.n_tokens == tril.n_tokens >= N_PROMPT
    assert qk.qk_params.split == N_PROMPT and qk.qk_params.scaling == pytest.approx(64 ** -0.5)
    assert set(qk.reductions()) == {"colsum", "colsum_response", "entropy", "distance", "waad"}
    # stored: queries then keys per layer, float32
    stored = qk._layer_array(0)
    assert stored.shape == (9 + 3, qk.n_tokens, 64) and stored.dtype == np.float32


def test_choose_layout_rules(smollm2, monkeypatch):
    meta = smollm2.meta
    monkeypatch.delenv("HEADSCOPE_QK_THRESHOLD", raising=False)
    assert longctx.qk_threshold() == longctx.DEFAULT_QK_THRESHOLD == 2048
    assert longctx.choose_layout(meta, 2048) == "tril"
    assert longctx.choose_layout(meta, 2049) == "qk"
    scale = Intervention((HeadEdit(3, 1, "scale", 0.0),))
    logit = Intervention((HeadEdit(3, 1, "logit", -5.0),))
    assert longctx.choose_layout(meta, 8192, scale) == "qk"  # output edits keep q/k = the maps' inputs
    assert longctx.choose_layout(meta, 8192, logit) == "tril"  # edited maps are not softmax(q k^T)
    encoder = ModelMeta("enc", "bert", "text", 2, 4, 4, 16, causal=False)
    assert longctx.choose_layout(encoder, 9000) == "full"

    class SlidingConfig:
        sliding_window = 4096

    assert longctx.choose_layout(meta, 8192, config=SlidingConfig()) == "tril"
    monkeypatch.setenv("HEADSCOPE_QK_THRESHOLD", "100")
    assert longctx.choose_layout(meta, 101) == "qk"


def test_same_output(pair):
    tril, qk = pair
    assert qk.output.text == tril.output.text
    assert qk.output.token_ids == tril.output.token_ids
    assert [t for t, _ in qk.output.next_top] == [t for t, _ in tril.output.next_top]
    assert np.allclose([p for _, p in qk.output.next_top], [p for _, p in tril.output.next_top], atol=1e-4)


def test_maps_match_tril(pair):
    tril, qk = pair
    n = tril.n_tokens
    for layer in LAYERS:
        a, b = tril.attention(layer), qk.attention(layer)
        assert b.dtype == np.float16 and b.shape == a.shape == (9, n, n)
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= 1e-3  # fp16 rounding of the same weights
        assert np.all(np.triu(b[2], 1) == 0)  # causal
        assert np.allclose(b.astype(np.float32).sum(-1), 1, atol=5e-3)
    assert np.abs(tril.head(9, 4).astype(np.float32) - qk.head(9, 4).astype(np.float32)).max() <= 1e-3
    for q in (0, 1, 517, n - 1):
        assert np.abs(tril.row(9, q).astype(np.float32) - qk.row(9, q).astype(np.float32)).max() <= 1e-3
    assert np.abs(tril.rows(29, 200, 300) - qk.rows(29, 200, 300)).max() <= 1e-3
    # GQA: heads 3..5 read KV head 1; a map computed by hand from the stored q and k of head 4
    stored = qk._layer_array(9)
    q, k = np.asarray(stored[4], np.float32), np.asarray(stored[9 + 4 // 3], np.float32)
    logits = (q * np.float32(64 ** -0.5)) @ k.T
    logits[np.triu_indices(n, 1)] = -np.inf
    by_hand = np.exp(logits - logits.max(1, keepdims=True))
    by_hand /= by_hand.sum(1, keepdims=True)
    assert np.abs(by_hand - qk.head(9, 4).astype(np.float32)).max() <= 1e-3


def test_overviews_and_windows(pair):
    tril, qk = pair
    assert np.array_equal(tril.overview().shape, qk.overview().shape)
    assert np.abs(tril.overview().astype(np.float32) - qk.overview().astype(np.float32)).max() <= 1e-3
    # the head view's 128-bin overview: stored for qk, pooled from the map for tril
    for layer, head in ((0, 0), (9, 4), (29, 8)):
        expected = max_pool(tril.head(layer, head).astype(np.float32), 128)
        assert np.abs(qk.head_overview(layer, head, 128) - expected).max() <= 1e-3
        assert np.abs(tril.head_overview(layer, head, 128) - expected).max() == 0
    a = tril.window(9, 4, 700, 796, 650, 746)
    b = qk.window(9, 4, 700, 796, 650, 746)
    assert a.shape == b.shape == (96, 96)
    assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= 1e-3
    assert np.array_equal(a, tril.head(9, 4)[700:796, 650:746])


def test_reductions_equal_full_maps(pair):
    """The stored reductions against the same sums over the full float32 maps (recomputed from q, k)."""
    _, qk = pair
    red, n, split = qk.reductions(), qk.n_tokens, qk.qk_params.split
    i = np.arange(n)
    for layer in (3, 29):
        a = qk.rows(layer, 0, n).astype(np.float64)  # [head, n, n] float32 maps, exact
        assert np.allclose(red["colsum"][layer], a.sum(1), rtol=1e-4, atol=1e-4)
        assert np.allclose(red["colsum_response"][layer], a[:, split:].sum(1), rtol=1e-4, atol=1e-5)
        ent = -(a * np.log(np.where(a > 0, a, 1))).sum(-1)
        assert np.allclose(red["entropy"][layer], ent, atol=1e-4)
        dist = (a * (i[:, None] - i[None, :])).sum(-1)
        assert np.allclose(red["distance"][layer], dist, rtol=1e-4, atol=1e-2)
        waad = (a * np.minimum(np.clip(i[:, None] - i[None, :], 0, None), 10)).sum(-1)
        assert np.allclose(red["waad"][layer], waad, atol=1e-4)


def test_metrics_from_reductions_match_streamed_maps(pair, monkeypatch):
    """The one-pass metrics of a qk capture come from its reductions (no map is computed) and equal
    the metrics streamed from the tril capture's fp16 maps."""
    tril, qk = pair
    summary.forget()
    expected = {name: analytics.compute(name, tril) for name in ("sink_alpha", "act_sink", "lookback", "entropy",
                                                                 "waad", "fai")}
    for rows in ("all", "prompt"):
        assert stored_summary(qk, rows) is not None
    assert stored_summary(qk, range(10, 20)) is None  # no stored column sums for these rows: streamed instead

    def no_maps(*_args, **_kwargs):
        raise AssertionError("a map was computed")

    monkeypatch.setattr(Capture, "rows", no_maps)
    monkeypatch.setattr(Capture, "attention", no_maps)
    summary.forget()
    got = {name: analytics.compute(name, qk) for name in expected}
    # fp16 maps against fp32 reductions: distances of ~400 tokens differ by ~1e-4 relative
    tol = {"sink_alpha": 1e-3, "act_sink": 1e-3, "lookback": 1e-3, "entropy": 1e-3, "waad": 1e-2, "fai": 1e-3}
    for name, value in got.items():
        assert value.shape == expected[name].shape, name
        assert np.array_equal(np.isnan(value), np.isnan(expected[name])), name
        scale = np.maximum(1.0, np.abs(expected[name])) if name == "lookback" else 1.0
        assert np.nanmax(np.abs(value - expected[name]) / scale) <= tol[name], name


def test_peak_memory_reported(pair):
    for capture in pair:
        assert capture.timings["estimate_mb"] > 0
        assert 0 <= capture.timings["peak_mb"] < 4096
    record = pair[1].record()
    assert record["layout"] == "qk" and record["layout_info"]["reductions"]


def test_estimates_grow_as_the_layouts_say(smollm2):
    meta = smollm2.meta
    tril, qk = memory.estimate(meta, 8192, "tril"), memory.estimate(meta, 8192, "qk")
    assert tril.disk_bytes == 30 * 9 * 8192 * 8193 // 2 * 2  # the packed triangle: ~18 GB
    assert qk.disk_gb < 1.0 and qk.memory_gb < 2.5  # queries + keys: 755 MB
    assert qk.memory_bytes < tril.memory_bytes


def test_refusal_says_how_to_fit(smollm2):
    adapter = TextAdapter(smollm2)
    with pytest.raises(InputError) as err:
        adapter.check_size(6000, 0, 20 * 2**30, layout="tril", memory_bytes=512 * 2**20)
    text = str(err.value)
    assert "Capturing 6,000 tokens of smollm2" in text and "GB of memory" in text and "0.5 GB is available" in text
    assert "shorten the input to at most" in text and "HEADSCOPE_CAPTURE_GB" in text
    assert "drop the attention-level edits" in text  # over the threshold, tril only because of edits
    fit = int(text.split("at most ")[1].split(" ")[0].replace(",", ""))
    assert 0 < fit < 6000
    adapter.check_size(fit, 0, 20 * 2**30, layout="tril", memory_bytes=512 * 2**20)  # the suggestion fits
    with pytest.raises(InputError, match="GB of cache"):
        adapter.check_size(3000, 0, 2**30, layout="tril", memory_bytes=2**40)
    adapter.check_size(8192, 0, 2**30, layout="qk", memory_bytes=3 * 2**30)  # 8k fits as qk
    with pytest.raises(InputError, match="takes at most 8192"):
        adapter.check_size(8190, 8, 2**40)


def test_refused_before_running(tmp_path, smollm2, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CAPTURE_GB", "0.01")
    store = Store(tmp_path / "c", size_limit=2**30)
    with pytest.raises(InputError, match="shorten the input to at most"):
        run(RunSpec(model="smollm2", prompt=prompt_of(smollm2.tokenizer, 600)), store=store)
    assert store.keys() == []
    store.close()


@pytest.mark.parametrize("view", ["model", "head", "token"])
def test_app_browses_a_qk_capture(pair, view, monkeypatch):
    """The explorer opens a long (qk) capture by its link: model view (stored thumbnails), head view
    (stored 128-bin overview + a computed window), token view (a computed row)."""
    from streamlit.testing.v1 import AppTest

    import capture.api as capture_run

    APP = str(Path(__file__).resolve().parents[2] / "app.py")
    _, qk = pair
    monkeypatch.setattr(capture_run, "_default_store", qk.store)
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"page": "explorer", "view": view, "key": qk.key, "layer": "9", "head": "4"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.warning, [w.value for w in at.warning]
    if view == "token":
        assert any("mean of heads" in h.proto.body for h in at.get("html"))
    elif view == "model":  # the mosaic, from the stored thumbnails
        (mosaic,) = component_data(at, "headscope_picture")
        assert mosaic["outline"] == [9, 10, 4, 5] and mosaic["src"].startswith("data:image/png")
    else:  # the stored 128-bin overview (clickable) and a computed 96 x 96 detail window
        overview, detail = component_data(at, "headscope_picture")
        n = len(at.session_state["capture"].tokens)
        size = -(-n // 128)
        assert overview["rows"] == -(-n // size) and overview["clickable"] and overview["outline"][0] == 0
        assert overview["row_hover"][-1].endswith(f"–{n - 1}")  # the last block ends at the last token
        assert detail["rows"] == detail["cols"] == 96 and len(detail["values"]) == 96


@pytest.mark.parametrize("n, split, softcap, tile", [(700, 650, None, 40), (333, None, 30.0, 128)])
def test_fused_kernel_equals_torch_ops(n, split, softcap, tile, monkeypatch):
    """capture/engine/fused.cpp gives the torch ops' output, reductions and thumbnails (ragged row blocks,
    bins and tiles; a response split; a softcap), and loading it leaves denormals alone."""
    from capture.engine import fused

    monkeypatch.setattr(fused, "QK_TILE", tile)
    assert fused.load() is not None, f"the fused kernel did not build: {fused.problem()}"
    assert torch.tensor(1e-40) * 1 != 0  # no flush-to-zero: -ffast-math is a compile flag only
    meta = ModelMeta(name="t", family="llama", modality="text", n_layers=1, n_heads=6, n_kv_heads=2,
                     head_dim=16, causal=True)
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(h, n, 16, generator=g) * 3 for h in (6, 2, 2))
    results = []
    for use_kernel in (False, True):
        rec = longctx.QKRecorder(meta, n, lambda *a: None, split=split, row_block=96, use_kernel=use_kernel)
        rec.softcap = softcap
        with torch.inference_mode():
            out = rec._attend(0, q, k, v, 0.25, softcap)
        results.append((out, rec))
    (out_t, rec_t), (out_f, rec_f) = results
    assert torch.allclose(out_f, out_t, atol=1e-5)
    assert set(rec_f.arrays) == set(rec_t.arrays)
    for name in rec_t.arrays:
        np.testing.assert_allclose(rec_f.arrays[name], rec_t.arrays[name], atol=2e-4, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(rec_f._overviews[0].astype(np.float32), rec_t._overviews[0].astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(rec_f.head_overview.astype(np.float32), rec_t.head_overview.astype(np.float32), atol=1e-3)


def test_peak_sampler_catches_a_short_spike():
    """memory.PeakSampler reads the kernel's high-water mark: a 256 MB spike that lasts a few ms is seen,
    by the block and by a block nested in it."""
    with memory.PeakSampler() as outer:
        with memory.PeakSampler() as inner:
            spike = np.ones(2**25)  # 256 MB, touched
            del spike
    assert inner.peak >= 200 * 2**20 and outer.peak >= inner.peak - 16 * 2**20
    with memory.PeakSampler() as quiet:
        pass
    assert quiet.peak < 64 * 2**20  # a new block starts from a fresh mark
