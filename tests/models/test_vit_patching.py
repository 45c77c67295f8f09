"""Activation patching of a ViT image classifier's heads between two pictures, on the class logit
(probes.vit_patching, issue 24 item 4) on a tiny random ViTForImageClassification (2 layers x 4 heads, 32 px
pictures of 8 px patches, 5 classes).

Exactness, as for text: patching every head from the clean picture's run into the corrupted one's gives the
clean metric (the classifier reads the CLS token, the same embedding in both runs), none the corrupted one,
the batched sweep equals one-head-at-a-time passes.  Stored through run_probe and read back torch-free
(analytics.patching_kinds).  Bad input is one sentence each.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from analytics.patching_kinds import read_vit_patching
from cache.store import Store
from capture import registry
from capture.engine.handle import prepare
from capture.images import ImagePrep
from conftest import one_head_at_a_time
from core.errors import InputError
from core.probe_results import VitPatchingParams
from probes.runner import run_probe
from probes.vit_patching import answer_for, picture_pair, vit_head_outputs, vit_metric, vit_patching_sweep

EXACT = 1e-5
PARAMS = VitPatchingParams(clean_image="cat", corrupted_image="coffee", target="1", foil="3")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=32, patch_size=8, num_labels=5,
                                                initializer_range=0.2)).eval()
    prep = ImagePrep(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    return prepare("tiny-vit", model, prep, modality="vision")


def pair(handle, p=PARAMS):
    clean, corrupted = picture_pair(handle, p.clean_image, p.corrupted_image)
    return clean, corrupted, answer_for(handle, p, clean, corrupted)


def test_patching_every_head_gives_the_clean_metric_and_none_the_corrupted(vit):
    for p in (PARAMS, VitPatchingParams(metric="prob")):
        clean, corrupted, answer = pair(vit, p)
        z_clean, clean_value = vit_head_outputs(vit, clean, answer)
        corrupted_value = vit_metric(vit, corrupted, answer)
        assert abs(clean_value - corrupted_value) > 1e-4  # the picture matters
        H = vit.meta.n_heads
        every = {l: (torch.ones(1, H, dtype=torch.bool), z) for l, z in enumerate(z_clean)}
        assert vit_metric(vit, corrupted, answer, every) == pytest.approx(clean_value, abs=EXACT)
        none = {l: (torch.zeros(1, H, dtype=torch.bool), z) for l, z in enumerate(z_clean)}
        assert vit_metric(vit, corrupted, answer, none) == pytest.approx(corrupted_value, abs=EXACT)


def test_batched_sweep_equals_one_head_at_a_time(vit):
    clean, corrupted, answer = pair(vit)
    clean_value, corrupted_value, batched = vit_patching_sweep(vit, clean, corrupted, answer)
    z_clean, _ = vit_head_outputs(vit, clean, answer)
    single = one_head_at_a_time(vit.meta, lambda patches: vit_metric(vit, corrupted, answer, patches), z_clean)
    np.testing.assert_allclose(batched, single, atol=EXACT)
    _, _, by_one = vit_patching_sweep(vit, clean, corrupted, answer, batch_size=1)
    np.testing.assert_allclose(by_one, single, atol=EXACT)
    assert np.ptp(batched) > 0


def test_default_classes_are_each_pictures_top_class(vit):
    clean, corrupted, answer = pair(vit, VitPatchingParams())
    with torch.inference_mode():
        assert answer.target == int(vit.model(**clean).logits[0].argmax())
        assert answer.foil == int(vit.model(**corrupted).logits[0].argmax())


def test_probe_stores_and_analytics_reads_it(vit, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "load", lambda name: vit)
    store = Store(tmp_path / "cache", size_limit=2**30)
    try:
        for direction in ("denoise", "noise"):
            p = VitPatchingParams(**{**PARAMS.__dict__, "direction": direction, "layers": (1,)})
            result = run_probe("vit_patching", "tiny-vit", p, store)
            assert run_probe("vit_patching", "tiny-vit", p, store).key == result.key
            read = read_vit_patching(store=store, revision=result.record["revision"], model="tiny-vit", **p.__dict__)
            assert np.isnan(read.patched[0]).all() and np.isfinite(read.patched[1]).all()
            clean, corrupted, answer = pair(vit)
            source, dest = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
            _, _, direct = vit_patching_sweep(vit, source, dest, answer, [(1, h) for h in range(vit.meta.n_heads)])
            np.testing.assert_allclose(read.patched[1], direct[1], atol=1e-5)
            assert result.record["target"] == "LABEL_1" and result.record["foil"] == "LABEL_3"
    finally:
        store.close()


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text.endswith(".") and "\n" not in text, text
    return text


def test_bad_input_is_one_sentence(vit, smollm2):
    with pytest.raises(InputError) as exc:
        picture_pair(vit, "cat", "no-such-picture")
    assert "no sample image" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        picture_pair(vit, "cat", "cat")
    assert "same picture" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        pair(vit, VitPatchingParams(target="giraffe"))
    assert "not a class" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        pair(vit, VitPatchingParams(target="2", foil="2"))
    assert "same class" in one_sentence(exc)
    with pytest.raises(InputError) as exc:
        picture_pair(smollm2, "cat", "coffee")
    assert "ViT image classifier" in one_sentence(exc)


def test_pictures_of_other_sizes_are_refused(vit, monkeypatch):
    monkeypatch.setattr(vit, "tokenizer", ImagePrep(do_resize=False, do_center_crop=False))  # pictures as they are
    with pytest.raises(InputError) as exc:
        picture_pair(vit, "cat", "coffee")
    assert "same size" in one_sentence(exc)


def test_cli_runs_vit_patching(vit, tmp_path, capsys, monkeypatch):
    import json

    from headscope import cli

    store = Store(tmp_path / "cache", size_limit=2**30)
    monkeypatch.setattr("capture.api.default_store", lambda: store)
    monkeypatch.setattr(registry, "load", lambda name: vit)
    try:
        assert cli.main(["probe", "vit_patching", "--model", "tiny-vit", "--target", "1", "--foil", "3",
                         "--batch", "3", "--json"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["arrays"] == ["patched"] and record["probe"] == "vit_patching"
        assert cli.main(["probe", "vit_patching", "--model", "tiny-vit", "--target", "giraffe"]) == 2
        assert "error: 'giraffe' is not a class" in capsys.readouterr().err
    finally:
        store.close()
