"""Vision-language families beyond LLaVA (capture/vlm/families, capture/vlm/chat.py): tiny random models of
LLaVA-OneVision, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3 (SmolVLM), Gemma 3 and PaliGemma, each saved
with a processor built offline (tests/models/tiny_vlms.py), captured from their folders on a 451 x 300 photo
(not square, so Idefics3 and the LLaVA any-resolution models cut it into tiles).

Held, per family: the captured token ids are the family's own processor's chat template plus greedy
`generate`; every language-model layer's maps equal eager `output_attentions` over those tokens (Gemma 3's
bidirectional image block and PaliGemma's prefix-LM included: entries above the diagonal); the image
span covers the image-token positions; every image token's box lies in the picture and the boxes of one
view tile it; VAR and image masking change the maps as specified; the VLM analytics run; bad input is
one sentence.  And a LLaVA folder written by transformers' own LlavaProcessor.save_pretrained
(processor_config.json, no preprocessor_config.json) is preprocessed as that processor does.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_vlms
from cache.store import Store
from capture import images, registry
from capture.api import run
from core.errors import InputError, ModelUnavailable
from core.types import RunSpec

QUESTION = "what colour is the circle?"
PICTURE = "cat"  # 451 x 300 px


@dataclasses.dataclass
class Tiny:
    family: str
    folder: Path
    store: Store
    capture: object


@pytest.fixture(scope="module", params=tiny_vlms.FAMILIES)
def tiny(request, tmp_path_factory):
    folder = tiny_vlms.save(request.param, tmp_path_factory.mktemp(request.param))
    store = Store(tmp_path_factory.mktemp(f"cache-{request.param}"), size_limit=2**30)
    capture = run(RunSpec(model=str(folder), prompt=QUESTION, image=PICTURE, max_new_tokens=3), store)
    yield Tiny(request.param, folder, store, capture)
    store.close()


def reference_inputs(tiny: Tiny) -> dict:
    """The family's transformers processor (tests/models/tiny_vlms.reference) on the picture and the question."""
    processor = tiny_vlms.reference(tiny.family, tiny.folder)
    picture = images.load_image(PICTURE)
    if processor.chat_template:
        messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": QUESTION}]}]
        out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
    else:
        out = processor(images=[picture], text=QUESTION, return_tensors="pt")
    out.pop("labels", None)
    return out, processor.tokenizer


def image_token_id(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return config.get("image_token_id", config.get("image_token_index"))


def test_tokens_and_maps_equal_the_processor_generate_and_eager(tiny):
    capture = tiny.capture
    out, tok = reference_inputs(tiny)
    eager = tiny_vlms.eager(tiny.folder)
    with torch.inference_mode():
        ids = eager.generate(**out, max_new_tokens=3, do_sample=False, eos_token_id=[tok.eos_token_id],
                             pad_token_id=tok.pad_token_id)
    assert capture.output.token_ids == ids[0].tolist()
    answer = ids.shape[1] - out["input_ids"].shape[1]
    inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    for name, fill in (("token_type_ids", 1 if tiny.family == "paligemma" else 0), ("mm_token_type_ids", 0)):
        if name in inputs:  # a generated token: text (Gemma 3, Qwen), the causal suffix (PaliGemma)
            inputs[name] = torch.cat([inputs[name], inputs[name].new_full((1, answer), fill)], 1)
    with torch.inference_mode():
        ref = eager(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, output_attentions=True).attentions
    assert len(ref) == capture.meta.n_layers == 2 and capture.meta.modality == "vlm"
    for layer in range(capture.meta.n_layers):
        np.testing.assert_allclose(capture.attention(layer).astype(np.float32), ref[layer][0].numpy(), atol=2e-3,
                                   rtol=0)
    views = {"gemma3": ("vision_tower", out["pixel_values"]), "paligemma": ("vision_tower", out["pixel_values"]),
             "llava_onevision": ("vision_tower", out["pixel_values"][0, :1]),  # the base view
             "llava_next": ("vision_tower", out["pixel_values"][0, :1]),
             "idefics3": ("vision_model", out["pixel_values"][0, -1:])}  # the global view
    if tiny.family in views:  # the tower's own maps: its eager output_attentions on that view
        from analytics import vlm

        tower, pixels = views[tiny.family]
        with torch.inference_mode():
            tower_ref = getattr(eager.model, tower)(pixel_values=pixels, output_attentions=True).attentions
        np.testing.assert_allclose(vlm.stored_vision_maps(capture).astype(np.float32),
                                   torch.stack([a[0] for a in tower_ref]).numpy(), atol=2e-3, rtol=0)
    maps = capture.attention(0).astype(np.float32)  # [head, query, key]
    image, prompt = capture.spans["image"], capture.spans["prompt"]
    if tiny.family == "gemma3":  # image tokens see each other both ways; nothing else sees ahead
        assert capture.layout == "full" and maps[:, image.start, image.start + 1:image.stop].min() > 1e-3
        assert np.abs(np.triu(maps[:, image.stop:, image.stop:], 1)).max() == 0
        assert np.abs(maps[:, :image.start, image.start:]).max() == 0
    elif tiny.family == "paligemma":  # the picture and the prompt see each other; the answer is causal
        assert capture.layout == "full" and maps[:, 0, 1:prompt.stop].min() > 1e-3
        assert np.abs(np.triu(maps[:, prompt.stop:, prompt.stop:], 1)).max() == 0
        assert np.abs(maps[:, :prompt.stop, prompt.stop:]).max() == 0
    else:
        assert capture.layout == "tril"


def test_image_span_tokens_and_boxes(tiny):
    capture = tiny.capture
    ids = capture.output.token_ids
    positions = [i for i, t in enumerate(ids) if t == image_token_id(tiny.folder)]
    stored = tiny.store.get_array(capture.key, "image_positions").tolist()
    assert stored == positions and capture.spans["image"] == range(positions[0], positions[-1] + 1)
    views = {k: v for k, v in capture.spans.items() if k.startswith("image:")}
    if tiny.family == "idefics3":  # tile markers lie between the tiles: the views hold the image tokens
        assert sorted(i for v in views.values() for i in v) == positions and len(views) == 5
        assert capture.tokens[views["image:tile0"].start] == "tile0(0,0)"
        assert capture.tokens[views["image:global"].stop - 1] == "global(1,1)"
    else:
        assert len(capture.spans["image"]) == len(positions)
    if tiny.family in ("llava_onevision", "llava_next"):
        assert set(views) == {"image:base", "image:tiles"}
        assert capture.tokens[views["image:tiles"].stop - 1] == "img:newline"
    picture = capture.image()
    assert picture.shape == (300, 451, 3)  # the original picture: the boxes are in its pixels
    boxes = tiny.store.get_array(capture.key, "image_boxes")  # [image token, 4]
    placed = np.isfinite(boxes).all(1)
    assert placed.sum() >= len(boxes) - 4 and [capture.tokens[p] for p in np.asarray(positions)[~placed]] == \
        ["img:newline"] * int((~placed).sum())
    b = boxes[placed]
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= 451 + 1e-3).all() and (b[:, 3] <= 300 + 1e-3).all()
    assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    groups = [np.arange(len(boxes))] if not views else []
    for name, span in views.items():  # each view's image tokens, in order
        groups.append(np.array([k for k, p in enumerate(positions) if p in span]))
    for group in groups:
        view = boxes[group][np.isfinite(boxes[group]).all(1)]
        region = (view[:, 0].min(), view[:, 1].min(), view[:, 2].max(), view[:, 3].max())
        area = (view[:, 2] - view[:, 0]) * (view[:, 3] - view[:, 1])
        assert area.sum() == pytest.approx((region[2] - region[0]) * (region[3] - region[1]), rel=1e-4)  # no gaps ...
        x0 = np.maximum(view[:, None, 0], view[None, :, 0])
        x1 = np.minimum(view[:, None, 2], view[None, :, 2])
        y0 = np.maximum(view[:, None, 1], view[None, :, 1])
        y1 = np.minimum(view[:, None, 3], view[None, :, 3])
        overlap = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        assert (overlap - np.diag(np.diag(overlap))).max() < 1e-3  # ... and no overlaps
    whole = boxes[groups[-1]] if tiny.family not in ("llava_onevision", "llava_next") else boxes[groups[0]]
    area = (whole[:, 2] - whole[:, 0]) @ (whole[:, 3] - whole[:, 1])  # the one or global or base view ...
    assert area == pytest.approx(451 * 300, rel=1e-4)  # ... covers the whole picture


def test_var_and_image_masking_change_the_maps_as_specified(tiny):
    from capture.vlm import presets
    from probes import vlm as vlm_probes

    base = tiny.capture
    spec = base.spec
    image, prompt = base.spans["image"], base.spans["prompt"]
    n = prompt.stop  # compare the prompt's rows and keys (the answers may differ)
    mask = vlm_probes.for_capture("mask", base, heads=[(1, 2)])
    masked = run(dataclasses.replace(spec, intervention=mask), tiny.store)
    m = masked.attention(1).astype(np.float32)[:, :n, :n]
    a0 = base.attention(1).astype(np.float32)[:, :n, :n]
    assert np.abs(m[2][:, image.start:image.stop]).max() == 0  # head 2 of layer 1 no longer sees the picture
    rows = [r for r in range(n) if r < image.start or r >= image.stop]  # image rows see only the picture: empty
    np.testing.assert_allclose(m[2][rows].sum(-1), 1.0, atol=3e-3)
    np.testing.assert_allclose(m[[0, 1, 3]], a0[[0, 1, 3]], atol=1e-3)  # the other heads: as they were
    sink = 0 if image.start > 0 else image.stop  # PaliGemma's picture comes first: its <bos> instead
    var = presets.var(base.meta, [(0, 1)], sinks=[sink], image=image)
    after = run(dataclasses.replace(spec, intervention=var), tiny.store)
    b0 = base.attention(0)[1].astype(np.float64)[:n, :n]
    b1 = after.attention(0)[1].astype(np.float64)[:n, :n]
    np.testing.assert_allclose(b1[:image.stop], b0[:image.stop], atol=1e-3)  # the picture's rows: as they were
    edited = range(image.stop, n)
    np.testing.assert_allclose(b1[edited, sink], 0.6 * b0[edited, sink], atol=2e-3)
    gained = b1[edited, image.start:image.stop].sum(-1) - b0[edited, image.start:image.stop].sum(-1)
    np.testing.assert_allclose(gained, 0.4 * b0[edited, sink], atol=3e-3)  # to the image, nowhere else


def test_vlm_analytics_tower_and_vhd_run_on_every_family(tiny):
    from analytics import METRICS, vlm
    from analytics.vlm_picture import PictureLayout
    from capture.vlm import presets
    from probes import vlm as vlm_probes

    capture = tiny.capture
    for name, metric in METRICS.items():
        if "vlm" not in metric.modalities or name in ("vlm_vhd", "dla"):  # probes run on request (VHD: below;
            continue  # DLA of the answer: tests/models/test_dla_vlm.py, every family)
        scores = metric.compute(capture)
        assert np.isfinite(scores).all(), name
        if metric.kind == "head":
            assert scores.shape == (2, 4), name
    layout = PictureLayout.of(capture)
    found = vlm.gaze(capture)
    assert found.saliency.shape == layout.raster and found.g.shape[1:] == layout.raster
    assert len(found.token_saliency) == len(layout.positions) and found.token_saliency.max() <= 1
    painted_total = layout.paint(np.ones(len(layout.positions))).sum()
    assert painted_total == pytest.approx(np.isfinite(layout.boxes).all(1).sum(), rel=1e-4)  # mass is kept
    vlm_probes.for_capture("gift", capture)  # a random model's saliency may be all zero: GIFT boosts the question
    ramp = np.linspace(0.1, 1.0, len(found.positions))  # a saliency on every image token: GIFT edits their keys
    gift = presets.gift(capture.meta, ramp, found.positions, top_k=len(ramp))
    keys = [int(e.keys.split(":")[0]) for e in gift.edits if e.keys != "span:question" and (e.layer, e.head) == (1, 0)]
    assert sorted(keys) == layout.positions.tolist()
    vlm.capture_sinks(capture)
    if tiny.family.startswith("qwen"):
        with pytest.raises(Exception, match="no vision-tower maps"):
            vlm.stored_vision_maps(capture)
    else:
        tower = vlm.stored_vision_maps(capture)  # [layer, head, token, token]
        grid = vlm.tower_grid(capture)
        np.testing.assert_allclose(tower.astype(np.float32).sum(-1), 1.0, atol=5e-3)
        assert vlm.vision_cls_maps(tower[-1], grid).shape == (tower.shape[1], *grid)
    divergence = vlm_probes.vhd(capture, store=tiny.store)
    assert divergence.shape == (2, 4, len(capture.spans["answer"])) and (divergence >= 0).all()


def test_batched_answers_and_the_accuracy_batch(tiny):
    from capture.vlm import presets
    from capture.vlm.answers import answers_with
    from probes import vlm_accuracy

    handle = registry.load(str(tiny.folder))
    specs = [dataclasses.replace(tiny.capture.spec, prompt=q) for q in (QUESTION, "what colour is the square?")]
    specs.append(dataclasses.replace(specs[1], intervention=presets.mask_image(handle.meta, [(0, 1), (1, 3)])))
    together = answers_with(handle, specs)
    assert together == answers_with(handle, specs, batch=1)
    assert together[0] == tiny.capture.output.text
    result = vlm_accuracy.accuracy_change(str(tiny.folder), "var", n_scenes=1, per_scene=2, max_new_tokens=2)
    assert len(result.rows) == 2


def test_modality_and_bad_input(tiny, tmp_path):
    assert registry.modality(str(tiny.folder)) == "vlm"  # these ran as text models before
    processor = registry.load(str(tiny.folder)).tokenizer
    with pytest.raises(InputError, match="uint8"):
        processor.encode(np.zeros((20, 20, 3), np.float32), QUESTION)
    from PIL import Image

    with pytest.raises(InputError, match="mode I;16"):
        processor.encode(Image.new("I;16", (20, 20)), QUESTION)
    with pytest.raises(InputError, match="megapixels"):
        processor.encode(Image.new("1", (8000, 6000)), QUESTION)
    with pytest.raises(InputError, match="No image given"):
        run(RunSpec(model=str(tiny.folder), prompt=QUESTION, image=None), tiny.store)
    if tiny.family == "qwen2_vl":  # an aspect ratio past 200: Qwen's resize refuses it
        with pytest.raises(InputError, match="cannot read this picture"):
            processor.encode(Image.new("RGB", (3000, 10)), QUESTION)
    if tiny.family != "paligemma":  # PaliGemma's processor writes its prompt; the others need a template
        bare = tmp_path / "no-template"
        shutil.copytree(tiny.folder, bare)
        (bare / "chat_template.jinja").unlink()
        settings = json.loads((bare / "tokenizer_config.json").read_text())
        settings.pop("chat_template", None)
        (bare / "tokenizer_config.json").write_text(json.dumps(settings))
        with pytest.raises(ModelUnavailable, match="no chat template"):
            registry.load(str(bare))


def test_an_unknown_vision_language_family_is_refused(tmp_path):
    from transformers import Blip2Config

    Blip2Config().save_pretrained(tmp_path)
    assert registry.modality(str(tmp_path)) == "vlm"
    with pytest.raises(ModelUnavailable, match="cannot place on the picture"):
        registry.load(str(tmp_path))


def test_a_llava_folder_saved_by_its_processor_is_preprocessed_as_it(tmp_path):
    """transformers 5 saves LlavaProcessor's image processor inside processor_config.json (no
    preprocessor_config.json): HeadScope reads it there (it used to fall back to defaults)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from conftest import save_tiny_llava

    folder = save_tiny_llava(tmp_path / "llava", image_size=56, lm_layers=2)
    (folder / "preprocessor_config.json").unlink()
    from capture.vlm.model import base_tokenizer

    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %} ASSISTANT:{% endfor %}")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                            image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=base_tokenizer(), patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)  # the tower's CLS token, dropped by "default"
    processor.save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    handle = registry.load(str(folder))
    picture = images.load_image(PICTURE)
    ours = handle.tokenizer.encode(picture, QUESTION)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": QUESTION}]}]
    ref = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert ours.input_ids[0].tolist() == ref["input_ids"][0].tolist()
    np.testing.assert_allclose(ours.pixel_values.numpy(), ref["pixel_values"].numpy(), atol=1e-5)
    assert ours.shown.shape == (56, 56, 3)  # the centre crop the model sees


def test_the_gaze_page_takes_every_family(tiny, monkeypatch):
    """The Gaze page (AppTest) on each family's folder: saliency, answer map, filmstrip, φ, tower."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", str(tiny.folder))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "app.py"), default_timeout=300)
    at.query_params.update({"page": "gaze", "model": str(tiny.folder), "image": PICTURE, "prompt": QUESTION})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Gaze" and not at.warning, [w.value for w in at.warning]
    assert len(at.get("plotly_chart")) >= 6  # saliency, answer map, filmstrip, heads (2), φ ...
    if not tiny.family.startswith("qwen"):
        assert at.slider(key="gaze_tower_layer").max == 1  # the tiny towers have 2 layers
