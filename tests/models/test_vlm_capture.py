"""VLM captures (capture/vlm/adapter.py): a tiny random LLaVA (DINOv2 tower, Llama LM, an 8 x 8 patch grid
as shapes-vlm's) saved as a folder, and the trained shapes-vlm when its weights exist.

Held: the recorded maps of every LM layer equal transformers' eager `output_attentions` of the same
LLaVA forward; spans and token labels are right; the answer equals `vlm_model.answer`; the picture the
model saw is stored with the capture.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from capture import images, registry
from capture.api import run
from capture.vlm import model as vlm_model
from conftest import save_tiny_llava
from core.types import RunSpec

QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A tiny random LLaVA folder: 112 px pictures, 14 px patches (64 image tokens), 3 LM layers x 4 heads (GQA 2)."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-vlm"), image_size=112, lm_layers=3)


def eager_maps(folder, capture, tower: bool = False) -> list[np.ndarray]:
    """transformers' eager output_attentions of the LM over the capture's tokens: [head, n, n] per layer
    (with `tower`: of the vision tower over the picture instead)."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32,
                                                          attn_implementation="eager")
    processor = registry.load(str(folder)).tokenizer
    pixels, _ = processor.pixels(images.load_image(capture.spec.image))
    pixels = torch.from_numpy(pixels)[None]
    ids = torch.tensor([capture.output.token_ids])
    with torch.inference_mode():
        if tower:
            out = eager.model.vision_tower(pixels, output_attentions=True)
        else:
            out = eager(input_ids=ids, pixel_values=pixels, output_attentions=True)
    return [a[0].numpy() for a in out.attentions]


def check_capture(capture, handle, question=QUESTION):
    meta = capture.meta
    assert meta.modality == "vlm" and meta.grid == handle.meta.grid
    rows, cols = meta.grid
    image = capture.spans["image"]
    assert len(image) == rows * cols
    assert capture.tokens[image.start] == "patch(0,0)" and capture.tokens[image.stop - 1] == f"patch({rows - 1},{cols - 1})"
    assert capture.tokens[image.start + cols + 2] == "patch(1,2)"
    question_text = "".join(capture.tokens[i] for i in capture.spans["question"]).replace("␣", " ")
    assert question_text.strip() == question
    assert capture.spans["prompt"].stop == capture.spans["answer"].start == capture.spans["response"].start
    assert capture.spans["answer"].stop == capture.n_tokens
    picture = capture.image()
    assert picture is not None and picture.shape[2] == 3 and picture.dtype == np.uint8


def check_tower_maps(folder, capture) -> None:
    """The vision tower's stored maps equal its eager output_attentions; CLS maps cover the patch grid."""
    from analytics import vlm

    tower = vlm.stored_vision_maps(capture)  # [layer, head, token, token]
    ref = np.stack(eager_maps(folder, capture, tower=True))
    assert tower.shape == ref.shape and tower.shape[-1] == 1 + 64  # CLS + 8 x 8 patches
    np.testing.assert_allclose(tower.astype(np.float32), ref, atol=2e-3, rtol=0)
    np.testing.assert_allclose(tower.astype(np.float32).sum(-1), 1.0, atol=5e-3)
    assert vlm.tower_grid(capture) == (8, 8)  # the grid of the pixels the tower saw, not its config's 518 px
    cls = vlm.vision_cls_maps(tower[-1], vlm.tower_grid(capture))
    assert cls.shape == (tower.shape[1], 8, 8)
    np.testing.assert_array_equal(cls[1, 2, 3], tower[-1, 1, 0, 1 + 2 * 8 + 3].astype(np.float32))  # head 1, patch (2, 3)


def test_tiny_vlm_capture_equals_eager(tiny_vlm, store):
    handle = registry.load(str(tiny_vlm))
    spec = RunSpec(model=str(tiny_vlm), prompt=QUESTION, image="scene-3", max_new_tokens=4)
    capture = run(spec, store)
    assert capture.meta.n_layers == 3 and capture.n_tokens == len(capture.output.token_ids)
    assert capture.output.text == vlm_model.answer(handle, images.scene_picture(3), QUESTION, max_new_tokens=4)
    if capture.output.text:  # a random model may stop at once; the answer span is then empty
        check_capture(capture, handle)
    ref = eager_maps(tiny_vlm, capture)
    for layer in range(capture.meta.n_layers):
        ours = capture.attention(layer).astype(np.float32)
        np.testing.assert_allclose(ours, ref[layer], atol=2e-3, rtol=0)  # fp16 storage
    assert np.array_equal(capture.image(), images.scene_picture(3))  # 112 px scene: shown as it is
    check_tower_maps(tiny_vlm, capture)
    again = run(spec, store)
    assert again.from_cache and again.tokens == capture.tokens and again.spans == capture.spans


def test_tiny_vlm_sample_photo_and_prefill_only(tiny_vlm, store):
    capture = run(RunSpec(model=str(tiny_vlm), prompt="is there a cat?", image="cat"), store)
    assert "answer" not in capture.spans and capture.output.text == ""
    assert capture.image().shape == (112, 112, 3)
    assert capture.spans["prompt"].stop == capture.n_tokens


def test_vlm_input_errors(tiny_vlm, store):
    from core.errors import InputError

    with pytest.raises(InputError, match="question is empty"):
        run(RunSpec(model=str(tiny_vlm), prompt="  ", image="scene-1"), store)
    with pytest.raises(InputError, match="no sample image"):
        run(RunSpec(model=str(tiny_vlm), prompt="what?", image="nothing-here"), store)


@pytest.fixture(scope="module")
def shapes_vlm():
    if not vlm_model.trained_path().is_file():
        pytest.skip("no trained shapes-vlm in assets/models/shapes-vlm (python -m training.shapes_vlm)")
    return registry.load("shapes-vlm")


def test_shapes_vlm_capture_equals_eager(shapes_vlm, store):
    spec = RunSpec(model="shapes-vlm", prompt=QUESTION, image="scene-0", max_new_tokens=vlm_model.MAX_NEW_TOKENS)
    capture = run(spec, store)
    assert (capture.meta.n_layers, capture.meta.n_heads, capture.meta.grid) == (30, 9, (8, 8))
    assert capture.output.text == vlm_model.answer(shapes_vlm, images.scene_picture(0), QUESTION)
    check_capture(capture, shapes_vlm)
    ref = eager_maps(vlm_model.assembled_folder(), capture)
    for layer in range(capture.meta.n_layers):
        np.testing.assert_allclose(capture.attention(layer).astype(np.float32), ref[layer], atol=2e-3, rtol=0)
    check_tower_maps(vlm_model.assembled_folder(), capture)


def test_every_vlm_metric_runs_on_a_vlm_capture(tiny_vlm, store):
    from analytics import METRICS

    capture = run(RunSpec(model=str(tiny_vlm), prompt=QUESTION, image="scene-5", max_new_tokens=3), store)
    hidden = store.get_array(capture.key, "hidden")
    assert hidden.shape == (3, capture.n_tokens, 32) and hidden.dtype == np.float16
    names = [name for name, m in METRICS.items() if "vlm" in m.modalities]
    assert {"vlm_visual_mass", "vlm_image_centric", "vlm_gaze_shift", "vlm_visual_sink", "sink_alpha",
            "entropy", "massive_sink"} <= set(names)
    for name in names:
        if name in ("vlm_vhd", "dla"):  # on request: test_vhd_on_a_tiny_vlm; DLA: tests/models/test_dla_vlm.py
            continue
        scores = METRICS[name].compute(capture)
        want = (3, 4) if METRICS[name].kind == "head" else None
        assert np.isfinite(scores).all(), name
        if want:
            assert scores.shape == want, name
    # the other multi-pass probes run text through the LM alone: they do not serve VLMs; DLA runs on the
    # capture's own inputs (its picture included)
    assert sorted(n for n in names if METRICS[n].multi_pass) == ["dla", "massive_sink"]


def test_vhd_on_a_tiny_vlm(tiny_vlm, store):
    from analytics import METRICS
    from core.errors import ProbeMissing
    from probes import vlm as probes_vlm

    capture = run(RunSpec(model=str(tiny_vlm), prompt=QUESTION, image="scene-4", max_new_tokens=3), store)
    with pytest.raises(ProbeMissing):
        METRICS["vlm_vhd"].compute(capture)
    ids, answer = probes_vlm.text_only_ids(capture)
    assert len(ids) == capture.n_tokens - 65 and ids[answer.start:] == capture.output.token_ids[-len(answer):]
    vhd = probes_vlm.vhd(capture)
    assert vhd.shape == (3, 4, len(capture.spans["answer"])) and (vhd >= 0).all() and vhd.max() > 0
    assert METRICS["vlm_vhd"].compute(capture).shape == (3, 4)


def test_scene_references_name_procedural_pictures():
    from core import scenes
    from core.errors import InputError
    from state import ViewState

    picture = images.load_image("scene-42")
    assert picture.size == (112, 112)
    assert np.array_equal(np.asarray(picture), scenes.make_scene(42, scenes.VLM).image)
    assert images.canonical_image("scene-42") == "scene-42"
    state, warnings = ViewState.from_params({"image": "scene-42"})
    assert state.image == "scene-42" and not warnings
    with pytest.raises(InputError):
        images.load_image("scene-x")


def test_gaze_saliency_beats_a_random_patch_on_held_out_scenes(shapes_vlm):
    """The pointing game (analytics.pointing) on 12 held-out scenes x 2 single-object questions."""
    from probes import vlm_accuracy as vlm_batch

    found = vlm_batch.gaze_pointing("shapes-vlm", n_scenes=12, per_scene=2)
    assert len(found.hits) == 24
    assert found.hit_rate >= 2 * found.chance_rate, (found.hit_rate, found.chance_rate)


def test_shapes_vlm_visual_sinks_and_image_centric_heads(shapes_vlm, store):
    from analytics import vlm

    capture = run(RunSpec(model="shapes-vlm", prompt=QUESTION, image="scene-3", max_new_tokens=8), store)
    sinks = vlm.capture_sinks(capture)
    assert sinks.dims and 0 in sinks.tokens  # SmolLM2's first token is a massive-activation sink
    hv = vlm.head_vision(capture, sinks.visual)
    assert hv.centric_heads().any()  # the answer to a colour question reads the picture somewhere


def test_full_feature_selection_keeps_the_vision_cls_apart(tmp_path, store):
    """A LLaVA with vision_feature_select_strategy "full" (CLS kept): span "image" is the patches only."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = vlm_model.base_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=5,
                         vision_feature_select_strategy="full")
    torch.manual_seed(0)
    LlavaForConditionalGeneration._from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": 28, "width": 28}, "do_center_crop": False}))
    capture = run(RunSpec(model=str(tmp_path), prompt=QUESTION, image="scene-1", max_new_tokens=2), store)
    cls, image = capture.spans["image_cls"], capture.spans["image"]
    assert len(cls) == 1 and cls.stop == image.start and len(image) == 4
    assert capture.tokens[cls.start] == "img:CLS" and capture.tokens[image.start] == "patch(0,0)"
    ref = eager_maps(tmp_path, capture)
    np.testing.assert_allclose(capture.attention(1).astype(np.float32), ref[1], atol=2e-3, rtol=0)


def test_small_picture_arrays_are_kept_in_the_index(tiny_vlm, store):
    """A small pass's arrays under 32 KB (here the token positions, boxes, residual stream and grid; the
    layers where they are that small, as in the tiny families) go in their index rows
    (cache.store.Store.put_array(..., inline=True)): no file each, read back as read-only arrays with
    the same values; larger ones (the 37 KB picture) keep their .npy files; evicting removes all."""
    from capture.vlm.adapter import BOXES, HIDDEN, POSITIONS, VISION, VISION_GRID

    capture = run(RunSpec(model=str(tiny_vlm), prompt=QUESTION, image="scene-3", max_new_tokens=2, seed=21), store)
    files = {p.name.split("-")[0] for p in (store.directory / "index" / capture.key).glob("*.npy")}
    names = ["L000", "L001", "L002", "image", POSITIONS, BOXES, HIDDEN, VISION, VISION_GRID]
    sizes = {name: store.get_array(capture.key, name).nbytes for name in names}
    assert {name for name in names if sizes[name] >= 2**15} == files - {f for f in files if f.startswith("ov")}
    assert {POSITIONS, BOXES, HIDDEN, VISION_GRID}.isdisjoint(files) and "image" in files  # 37 KB: a file
    positions = store.get_array(capture.key, POSITIONS)
    assert not positions.flags.writeable and positions.dtype == np.int32
    assert list(positions) == list(capture.spans["image"])
    assert store.get_array(capture.key, BOXES).shape == (64, 4)
    assert tuple(store.get_array(capture.key, VISION_GRID)) == (8, 8)
    assert store.get_array(capture.key, VISION).shape[-1] == 65 and store.get_array(capture.key, HIDDEN).shape[0] == 3
    store.evict(capture.key)
    assert not list((store.directory / "index" / capture.key).glob("*.npy"))
