"""Activation patching of a DiT's heads between two prompts, measured on the picture (probes.dit_patching,
issue 24 item 4), on a random-weight shapes-dit transformer (capture.dit.model.build_transformer, 4 layers x
4 heads, 32 x 32 pixels) with the embedded MiniLM as its text encoder, and on the trained shapes-dit.

Exactness: patching no head reproduces the corrupted prompt's picture; patching every head at every step
with the pooled prompt embedding (the blocks' adaLN input) taken from the clean prompt too reproduces the
clean picture (without the pooled embedding it does not: shapes-dit also reads the prompt there, and the
test shows that it matters); the batched sweep equals one trajectory per head.  Stored through run_probe
and read back torch-free (analytics.patching_kinds).  Bad input is one sentence each.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from analytics.patching_kinds import read_dit_patching
from cache.store import Store
from capture import registry
from capture.dit import attention as dit_attention
from capture.dit.model import ShapesDit, TextEncoder, build_transformer
from capture.engine.handle import ModelHandle
from core.errors import InputError
from core.probe_results import DitPatchingParams
from core.types import ModelMeta
from probes.dit_patching import dit_patching_sweep, distance, prompt_pair, recorded_run, sample_rows
from probes.runner import run_probe

CLEAN = "a red circle at the center"
CORRUPTED = "a blue circle at the center"
STEPS = 4
EXACT = 1e-6  # distances across batch shapes (float32 matmuls of different widths)


def random_dit(minilm) -> ModelHandle:
    transformer = build_transformer(seed=0).eval()
    dit_attention.install(transformer)
    pipe = ShapesDit(transformer, TextEncoder(minilm))
    layers = [m for _p, m, kind in dit_attention.attention_modules(transformer) if kind != "cross"]
    config = transformer.config
    meta = ModelMeta(name="tiny-dit", family="sd3", modality="dit", n_layers=len(layers),
                     n_heads=int(config.num_attention_heads), n_kv_heads=int(config.num_attention_heads),
                     head_dim=int(config.attention_head_dim), causal=False, grid=pipe.grid)
    return ModelHandle(name="tiny-dit", model=transformer, tokenizer=pipe, meta=meta, attention_modules=layers,
                       lock=threading.Lock())


@pytest.fixture(scope="module", params=["random", "shapes-dit"])
def dit(request, minilm):
    return random_dit(minilm) if request.param == "random" else registry.load("shapes-dit")


def every_head(handle, z, rows: int = 1):
    """head_patches at each step: every head of every layer, conditional rows, from the recorded z."""
    mask = torch.zeros(2 * rows, handle.meta.n_heads, dtype=torch.bool)
    mask[:rows] = True
    return lambda i: {l: (mask, z[i][l]) for l in range(handle.meta.n_layers)}


def test_patching_none_gives_the_corrupted_picture_and_every_head_with_pooled_the_clean(dit):
    pipe = dit.tokenizer
    x_clean, z_clean = recorded_run(pipe, CLEAN, 0, STEPS, dit.meta.n_layers)
    x_corrupted = sample_rows(pipe, CORRUPTED, 0, STEPS)
    gap = float(distance(x_corrupted, x_clean)[0])
    assert gap > 1e-4  # the prompt matters
    none = torch.zeros(2, dit.meta.n_heads, dtype=torch.bool)
    x_none = sample_rows(pipe, CORRUPTED, 0, STEPS, patches_at=lambda i: {l: (none, z_clean[i][l])
                                                                          for l in range(dit.meta.n_layers)})
    torch.testing.assert_close(x_none, x_corrupted, rtol=0, atol=1e-6)
    pooled = pipe.text.encode([CLEAN])[1]
    x_all = sample_rows(pipe, CORRUPTED, 0, STEPS, patches_at=every_head(dit, z_clean), pooled=pooled)
    torch.testing.assert_close(x_all, x_clean, rtol=0, atol=1e-5)
    heads_only = sample_rows(pipe, CORRUPTED, 0, STEPS, patches_at=every_head(dit, z_clean))
    assert float(distance(heads_only, x_clean)[0]) > 1e-3 * gap  # the pooled prompt matters too: stated, not hidden


@pytest.mark.parametrize("patch_pooled", [False, True])
def test_batched_sweep_equals_one_head_at_a_time(dit, patch_pooled):
    clean, corrupted, batched, pictures = dit_patching_sweep(dit, CLEAN, CORRUPTED, CLEAN, 0, STEPS,
                                                             patch_pooled=patch_pooled)
    assert clean == 0.0 and corrupted > 0 and pictures["source"].shape == (32, 32, 3)
    _, _, single, _ = dit_patching_sweep(dit, CLEAN, CORRUPTED, CLEAN, 0, STEPS, patch_pooled=patch_pooled,
                                         batch_size=1)
    np.testing.assert_allclose(batched, single, atol=EXACT)
    assert np.isfinite(batched).all() and np.ptp(batched) > 0
    _, _, three, _ = dit_patching_sweep(dit, CLEAN, CORRUPTED, CLEAN, 0, STEPS, patch_pooled=patch_pooled,
                                        batch_size=3)
    np.testing.assert_allclose(three, single, atol=EXACT)


def test_patching_samples_at_the_guidance_scale_it_is_given(dit, tmp_path, monkeypatch):
    """`guidance` samples both prompts as ShapesDit.sample does at that scale (a capture's RunSpec.guidance), and
    the probe stores its pictures under a key of its own; unset, the key is the one results had before the field."""
    from dataclasses import asdict

    from capture.dit.model import Guidance, to_pixels
    from core.keys import stable_hash
    from core.probe_results import PROBE_VERSION, probe_key

    pipe = dit.tokenizer
    for scale in (1.0, 4.5):
        x = sample_rows(pipe, CLEAN, 0, STEPS, guidance=scale)
        np.testing.assert_array_equal(to_pixels(x), pipe.sample([CLEAN], [0], STEPS, guidance=Guidance(cfg=scale)))
    default = DitPatchingParams(steps=STEPS)
    old = {k: v for k, v in asdict(default).items() if k != "guidance"}
    assert probe_key("r", "dit_patching", default) == stable_hash(
        {"revision": "r", "probe": "dit_patching", "params": old, "version": PROBE_VERSION})
    monkeypatch.setattr(registry, "load", lambda name: dit)
    store = Store(tmp_path / "cache", size_limit=2**30)
    try:
        plain = run_probe("dit_patching", "tiny-dit", dataclasses.replace(default, layers=(0,)), store)
        off = run_probe("dit_patching", "tiny-dit", dataclasses.replace(default, layers=(0,), guidance=1.0), store)
        assert off.key != plain.key
        np.testing.assert_array_equal(off.array("clean_image"),
                                      pipe.sample([CLEAN], [0], STEPS, guidance=Guidance(cfg=1.0))[0])
        assert not np.array_equal(off.array("clean_image"), plain.array("clean_image"))
    finally:
        store.close()


def test_probe_stores_and_analytics_reads_it(dit, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "load", lambda name: dit)
    store = Store(tmp_path / "cache", size_limit=2**30)
    L = dit.meta.n_layers
    try:
        for direction in ("denoise", "noise"):
            p = DitPatchingParams(clean=CLEAN, corrupted=CORRUPTED, steps=STEPS, direction=direction, layers=(0, L - 1))
            result = run_probe("dit_patching", "tiny-dit", p, store)
            assert run_probe("dit_patching", "tiny-dit", p, store).key == result.key
            read = read_dit_patching(store=store, revision=result.record["revision"], model="tiny-dit", **p.__dict__)
            assert read.clean == 0.0 and read.corrupted > 0
            patched = read.patched
            assert np.isnan(patched[1:-1]).all() and np.isfinite(patched[[0, L - 1]]).all()
            source, dest = (CLEAN, CORRUPTED) if direction == "denoise" else (CORRUPTED, CLEAN)
            _, _, direct, _ = dit_patching_sweep(dit, source, dest, CLEAN, 0, STEPS,
                                                 [(l, h) for l in (0, L - 1) for h in range(dit.meta.n_heads)])
            np.testing.assert_allclose(patched[[0, L - 1]], direct[[0, L - 1]], atol=1e-6)
            gap = read.clean - read.corrupted
            want = (direct - read.corrupted) / gap if direction == "denoise" else (read.clean - direct) / gap
            np.testing.assert_allclose(read.effect[[0, L - 1]], want[[0, L - 1]], atol=1e-4)
            pictures = read.result
            assert pictures.array("clean_image").shape == (32, 32, 3)
            assert not np.array_equal(pictures.array("clean_image"), pictures.array("corrupted_image"))
    finally:
        store.close()


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text.endswith(".") and "\n" not in text, text
    return text


def test_bad_input_is_one_sentence(dit, smollm2, tmp_path, monkeypatch):
    pipe = dit.tokenizer
    with pytest.raises(InputError) as exc:
        prompt_pair(pipe, "a red circle", CORRUPTED)
    assert "same number of tokens" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        prompt_pair(pipe, CLEAN, " " + CLEAN)
    assert "same" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        prompt_pair(pipe, CLEAN + " and" * 20, CORRUPTED + " and" * 20)
    assert "longer than" in one_sentence(exc)
    store = Store(tmp_path / "cache", size_limit=2**30)
    try:
        with pytest.raises(InputError) as exc:
            run_probe("dit_patching", "smollm2", DitPatchingParams(steps=STEPS), store)
        assert "not shapes-dit" in one_sentence(exc)
        monkeypatch.setattr(registry, "load", lambda name: dit)
        for bad in ({"metric": "psnr"}, {"direction": "sideways"}, {"steps": 0}, {"layers": (9,)}, {"guidance": 31.0}):
            with pytest.raises(InputError) as exc:
                run_probe("dit_patching", "tiny-dit", DitPatchingParams(**bad), store)
            one_sentence(exc)
    finally:
        store.close()


def test_cli_runs_dit_patching(dit, tmp_path, capsys, monkeypatch):
    import json

    from headscope import cli

    store = Store(tmp_path / "cache", size_limit=2**30)
    monkeypatch.setattr("capture.api.default_store", lambda: store)
    monkeypatch.setattr(registry, "load", lambda name: dit)
    try:
        assert cli.main(["probe", "dit_patching", "--steps", str(STEPS), "--layers", "0", "--patch-pooled",
                         "--batch", "2", "--guidance", "1.5", "--json"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["arrays"] == ["patched", "clean_image", "corrupted_image"]
        assert record["params"]["patch_pooled"] is True and record["model"] == "shapes-dit"
        assert record["params"]["guidance"] == 1.5
        assert cli.main(["probe", "dit_patching", "--corrupted", "a blue circle"]) == 2
        assert "error: The clean prompt is" in capsys.readouterr().err
    finally:
        store.close()
