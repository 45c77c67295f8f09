"""Activation patching of a VLM's language-model heads between two pictures (probes.vlm_patching, issue 24
item 4) on tiny random models: a LLaVA (DINOv2 tower, Llama LM, tests/conftest.save_tiny_llava) and a
Qwen2-VL (tests/models/tiny_vlms.py: 3-D rotary positions, dynamic resolution).

Exactness, as for text (tests/models/test_attribution.py): patching every head of every LM layer from the
clean picture's run into the corrupted one's gives the clean metric, patching none the corrupted one, the
batched sweep equals one-head-at-a-time passes; patching the image (or text) rows only equals an
independent hook on the output projection that writes those rows alone.  Stored through run_probe and read back torch-free
(analytics.patching_kinds).  Bad input is one sentence each: pictures of other token counts, a picture
that does not exist, an answer that is not one token, the same picture twice, a text model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_vlms
from analytics.patching_kinds import read_vlm_patching
from cache.store import Store
from capture import registry
from conftest import one_head_at_a_time, save_tiny_llava
from core.errors import InputError
from core.probe_results import VlmPatchingParams
from probes.patch_runs import answer_of
from probes.runner import run_probe
from probes.vlm_patching import picture_pair, vlm_head_outputs, vlm_metric, vlm_patching_sweep

QUESTION = "what colour is the circle?"
EXACT = 1e-5  # metric equality across batch shapes (float32 matmuls of different widths)


def sharpened(handle, factor: float = 8.0):
    """The random LM's and projector's weights scaled up, so two pictures give clearly different metrics (at
    the default 0.02 init a tiny random LM's logits hardly move)."""
    with torch.no_grad():
        for name, param in handle.model.named_parameters():
            if "norm" not in name and ("language_model" in name or "projector" in name or "merger" in name):
                param.mul_(factor)
    return handle


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    if request.param == "llava":
        folder = save_tiny_llava(folder, image_size=28, lm_layers=3)
        target, foil = "red", "yellow"
    else:
        folder = tiny_vlms.save("qwen2_vl", folder)
        target, foil = " red", " yellow"
    handle = sharpened(registry.load(str(folder)))
    params = VlmPatchingParams(clean_image="scene-3", corrupted_image="scene-4", question=QUESTION, target=target,
                               foil=foil)
    return str(folder), handle, params


def pair(handle, p):
    clean, corrupted = picture_pair(handle, p.question, p.clean_image, p.corrupted_image)
    return clean, corrupted, answer_of(handle.tokenizer.tokenizer, p)


def test_patching_every_head_gives_the_clean_metric_and_none_the_corrupted(tiny):
    _folder, handle, p = tiny
    clean, corrupted, answer = pair(handle, p)
    z_clean, clean_value = vlm_head_outputs(handle, clean, answer)
    corrupted_value = vlm_metric(handle, corrupted, answer)
    assert abs(clean_value - corrupted_value) > 1e-3  # the picture matters
    H = handle.meta.n_heads
    every = {l: (torch.ones(1, H, dtype=torch.bool), z) for l, z in enumerate(z_clean)}
    assert vlm_metric(handle, corrupted, answer, every) == pytest.approx(clean_value, abs=EXACT)
    none = {l: (torch.zeros(1, H, dtype=torch.bool), z) for l, z in enumerate(z_clean)}
    assert vlm_metric(handle, corrupted, answer, none) == pytest.approx(corrupted_value, abs=EXACT)
    for metric in ("prob",):  # the other metric too
        prob = answer_of(handle.tokenizer.tokenizer, VlmPatchingParams(target=p.target, metric=metric))
        _, clean_prob = vlm_head_outputs(handle, clean, prob)
        assert vlm_metric(handle, corrupted, prob, every) == pytest.approx(clean_prob, abs=1e-7)


def test_batched_sweep_equals_one_head_at_a_time(tiny):
    _folder, handle, p = tiny
    clean, corrupted, answer = pair(handle, p)
    clean_value, corrupted_value, batched = vlm_patching_sweep(handle, clean, corrupted, answer)
    z_clean, _ = vlm_head_outputs(handle, clean, answer)
    single = one_head_at_a_time(handle.meta, lambda patches: vlm_metric(handle, corrupted, answer, patches), z_clean)
    np.testing.assert_allclose(batched, single, atol=EXACT)
    _, _, by_one = vlm_patching_sweep(handle, clean, corrupted, answer, batch_size=1)
    np.testing.assert_allclose(by_one, single, atol=EXACT)
    assert corrupted_value == pytest.approx(vlm_metric(handle, corrupted, answer), abs=EXACT)
    assert clean_value == pytest.approx(vlm_metric(handle, clean, answer), abs=EXACT)
    assert np.isfinite(batched).all() and np.ptp(batched) > 0


@pytest.mark.parametrize("positions", ["image", "text"])
def test_patching_some_rows_equals_a_hook_that_patches_only_those_rows(tiny, positions):
    """The sweep at the image (or text) rows, against an independent reference: a forward pre-hook on the
    head's output projection that writes the clean z into those rows only."""
    from capture.engine.handle import attention_layers
    from probes.vlm_patching import answer_logits, patched_rows

    _folder, handle, p = tiny
    clean, corrupted, answer = pair(handle, p)
    rows = patched_rows(clean, positions)
    assert rows and len(rows) < clean.input_ids.shape[1]
    _, _, batched = vlm_patching_sweep(handle, clean, corrupted, answer, rows=rows)
    z_clean, _ = vlm_head_outputs(handle, clean, answer)
    outs = [out for _attn, out in attention_layers(handle.model.model.language_model)]
    meta = handle.meta
    assert len(outs) == meta.n_layers
    for l in range(meta.n_layers):
        for h in range(meta.n_heads):
            def write(_module, args, l=l, h=h):
                x = args[0].clone()
                cols = slice(h * meta.head_dim, (h + 1) * meta.head_dim)
                x[:, rows, cols] = z_clean[l][:, rows, h].reshape(1, len(rows), -1)
                return (x, *args[1:])

            hook = outs[l].register_forward_pre_hook(write)
            try:
                with torch.inference_mode():
                    want = float(answer.score(answer_logits(handle, corrupted))[0])
            finally:
                hook.remove()
            assert batched[l, h] == pytest.approx(want, abs=EXACT), (l, h)
    assert np.ptp(batched) > 0  # the hooks acted


def test_probe_stores_and_analytics_reads_it(tiny, tmp_path, monkeypatch):
    folder, handle, p = tiny
    monkeypatch.setattr(registry, "load", lambda name: handle)  # the sharpened model, not a fresh load
    store = Store(tmp_path / "cache", size_limit=2**30)
    L, H = handle.meta.n_layers, handle.meta.n_heads
    measured = [0, L - 1]
    try:
        for direction in ("denoise", "noise"):
            q = VlmPatchingParams(**{**p.__dict__, "direction": direction, "layers": tuple(measured)})
            result = run_probe("vlm_patching", folder, q, store)
            again = run_probe("vlm_patching", folder, q, store)
            assert again.key == result.key
            read = read_vlm_patching(store=store, revision=result.record["revision"], model=folder, **q.__dict__)
            patched = read.patched
            assert patched.shape == (L, H)
            assert np.isnan(patched[1:-1]).all() and np.isfinite(patched[measured]).all()
            clean, corrupted, answer = pair(handle, p)
            source, dest = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
            _, _, direct = vlm_patching_sweep(handle, source, dest, answer, [(l, h) for l in measured for h in range(H)])
            np.testing.assert_allclose(patched[measured], direct[measured], atol=1e-5)
            effect = read.effect
            gap = read.clean - read.corrupted
            want = (direct - read.corrupted) / gap if direction == "denoise" else (read.clean - direct) / gap
            np.testing.assert_allclose(effect[measured], want[measured], atol=1e-4)
            span = result.record["image_span"]
            assert span[1] > span[0] and len(result.record["tokens"]) == result.record["n_tokens"]
    finally:
        store.close()


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text.endswith(".") and "\n" not in text, text
    return text


def test_bad_input_is_one_sentence(tiny):
    _folder, handle, p = tiny
    with pytest.raises(InputError) as exc:
        picture_pair(handle, QUESTION, "scene-3", "no-such-picture")
    assert "no sample image" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        picture_pair(handle, QUESTION, "scene-3", "scene-3")
    assert "same picture" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        answer_of(handle.tokenizer.tokenizer, VlmPatchingParams(target="red yellow green blue"))
    assert "not one" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        answer_of(handle.tokenizer.tokenizer, VlmPatchingParams(target=p.target, foil=p.target))
    one_sentence(exc)
    if handle.meta.family.startswith("qwen"):  # dynamic resolution: a 451 x 300 photo is more tokens than a scene
        with pytest.raises(InputError) as exc:
            picture_pair(handle, QUESTION, "scene-3", "cat")
        assert "same size" in one_sentence(exc)


def test_text_models_and_bad_parameters_are_refused(smollm2, tmp_path):
    store = Store(tmp_path / "cache", size_limit=2**30)
    try:
        with pytest.raises(InputError) as exc:
            run_probe("vlm_patching", "smollm2", VlmPatchingParams(), store)
        assert "vision-language model" in one_sentence(exc)
        with pytest.raises(InputError) as exc:
            run_probe("vlm_patching", "smollm2", VlmPatchingParams(direction="sideways"), store)
        one_sentence(exc)
        with pytest.raises(InputError) as exc:
            run_probe("vlm_patching", "smollm2", VlmPatchingParams(positions="corner"), store)
        assert "positions all, image or text" in one_sentence(exc)
    finally:
        store.close()


def test_cli_runs_vlm_patching(tiny, tmp_path, capsys, monkeypatch):
    import json

    from headscope import cli

    folder, handle, p = tiny
    store = Store(tmp_path / "cache", size_limit=2**30)
    monkeypatch.setattr("capture.api.default_store", lambda: store)
    monkeypatch.setattr(registry, "load", lambda name: handle)
    try:
        assert cli.main(["probe", "vlm_patching", "--model", folder, "--target", p.target, "--foil", p.foil,
                         "--layers", "0", "--batch", "2", "--json"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["arrays"] == ["patched"] and record["params"]["clean_image"] == "scene-3"
        assert record["summary"]["direction"] == "denoise" and record["probe"] == "vlm_patching"
        assert cli.main(["probe", "vlm_patching", "--model", folder, "--corrupted-image", "nowhere"]) == 2
        assert "error: There is no sample image called 'nowhere'" in capsys.readouterr().err
    finally:
        store.close()
