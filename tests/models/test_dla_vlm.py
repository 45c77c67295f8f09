"""Direct logit attribution of a VLM's answer (probes.dla on a VLM capture; Elhage et al. 2021): the language
model's heads, MLPs and embedding (the image tokens' projected features included) decomposed at the position
that predicts the answer's first token.  Checked on tiny random LLaVA and Qwen2-VL folders against the model's
own logits from an independent forward, and on shapes-vlm against the patching code's metric of the same
question and picture; a VLM whose language model DLA does not know is one sentence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_vlms
from analytics.attribution import DLA
from cache.store import Store
from capture import images, registry
from capture.api import run
from capture.vlm.inputs import placed
from conftest import save_tiny_llava
from core.errors import InputError
from core.probe_results import VlmPatchingParams
from core.types import RunSpec
from probes.patch_runs import answer_of
from probes.runner import run_probe
from probes.vlm_patching import picture_pair, vlm_metric

QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "idefics3", "gemma3",
                                        "paligemma"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-dla-{request.param}")
    folder = save_tiny_llava(folder, image_size=28, lm_layers=3) if request.param == "llava" else \
        tiny_vlms.save(request.param, folder)
    store = Store(tmp_path_factory.mktemp("store"))
    yield str(folder), store
    store.close()


def test_dla_of_the_answer_sums_to_the_models_own_logit(tiny):
    folder, store = tiny
    capture = run(RunSpec(model=folder, image="scene-3", prompt=QUESTION, max_new_tokens=2), store=store)
    answer = capture.spans["answer"]
    dla = DLA(run_probe("dla", folder, {"capture": capture.key}, store=store))
    at = dla.answer_position
    assert at == answer.start - 1  # where the answer's first token is predicted
    terms = dla.terms()
    assert terms["target"] == capture.output.token_ids[answer.start]
    total = dla.heads().sum() + terms["mlps"].sum() + terms["embed"] + terms["bias"]
    assert total == pytest.approx(terms["logit"], abs=1e-4 * (1 + abs(terms["logit"])))
    assert dla.result.summary["residual_error"] < 1e-5
    # the model's own logit of that token, from a forward of our own on the capture's inputs
    handle = registry.load(folder)
    picture = handle.tokenizer.encode(images.load_image("scene-3"), QUESTION)
    with torch.inference_mode():
        logits = handle.model(**placed(picture.answered(list(capture.output.token_ids)), handle.model),
                              use_cache=False).logits[0].float()  # [token, vocab]
    assert terms["logit"] == pytest.approx(float(logits[at, terms["target"]]), abs=1e-4)
    assert dla.heads().shape == (handle.meta.n_layers, handle.meta.n_heads)


def test_dla_of_shapes_vlm_agrees_with_the_patching_codes_metric(tmp_path):
    """shapes-vlm on scene 3, ' red' - ' yellow' at the last prompt token: DLA's logit difference is the metric
    probes.vlm_patching computes for the same question and picture (another code path)."""
    store = Store(tmp_path / "store")
    capture = run(RunSpec(model="shapes-vlm", image="scene-3", prompt=QUESTION), store=store)
    dla = DLA(run_probe("dla", "shapes-vlm", {"capture": capture.key, "target": "red", "foil": "yellow"},
                        store=store))
    handle = registry.load("shapes-vlm")
    p = VlmPatchingParams(clean_image="scene-3", corrupted_image="scene-4", question=QUESTION)
    clean, _ = picture_pair(handle, QUESTION, "scene-3", "scene-4")
    metric = vlm_metric(handle, clean, answer_of(handle.tokenizer.tokenizer, p))
    assert dla.answer_position == capture.n_tokens - 1  # no answer generated: the last token
    assert dla.terms()["logit"] == pytest.approx(metric, abs=1e-3)
    assert np.isfinite(dla.heads()).all()


def test_a_vlm_whose_language_model_dla_does_not_know_is_one_sentence(tiny, monkeypatch):
    folder, store = tiny
    capture = run(RunSpec(model=folder, image="scene-3", prompt=QUESTION), store=store)
    monkeypatch.setattr("probes.dla.TEXT_FAMILIES", ("gpt2",))
    with pytest.raises(InputError, match="also as a VLM's language model"):
        run_probe("dla", folder, {"capture": capture.key}, store=store, force=True)


def test_gaze_page_attributes_the_answer_to_heads():
    """Gaze, tab 'Which heads wrote it': the button runs DLA on the page's capture; the map is read where the
    answer's first token is predicted, onto that token."""
    from capture import default_store, revision
    from conftest import open_app
    from core.probe_results import DLAParams, probe_key

    at = open_app({"page": "gaze", "model": "shapes-vlm", "image": "scene-3", "prompt": QUESTION})
    capture = at.session_state["capture"]
    answer = capture.spans["answer"]
    default_store().evict(probe_key(revision("shapes-vlm"), "dla", DLAParams(capture=capture.key)))
    at.run()
    at.button(key="gaze_dla_run").click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    caption = next(c.value for c in at.caption if "direct term in the logit of" in c.value)
    assert f"logit of {capture.tokens[answer.start]!r} at token {answer.start - 1}" in caption
    dla = DLA(run_probe("dla", "shapes-vlm", {"capture": capture.key}))
    assert f"{dla.terms(answer.start - 1)['logit']:.4g}" in caption


def test_head_atlas_shows_dla_of_a_vlm_capture():
    from capture import default_store, revision
    from conftest import component_data, open_app
    from core.probe_results import DLAParams, probe_key

    at = open_app({"page": "atlas", "model": "shapes-vlm", "image": "scene-3", "prompt": QUESTION,
                   "metric": "entropy"})
    capture = at.session_state["capture"]
    default_store().evict(probe_key(revision("shapes-vlm"), "dla", DLAParams(capture=capture.key)))
    at.selectbox(key="atlas_metric").set_value("dla").run()
    at.button(key="atlas_run_missing").click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    dla = DLA(run_probe("dla", "shapes-vlm", {"capture": capture.key}))
    grids = [p for p in component_data(at, "headscope_picture") if p["rows"] == capture.meta.n_layers]
    assert grids and np.allclose(np.asarray(grids[0]["values"], dtype=float), dla.heads(), atol=1e-4)
