"""The hub path for vision models: tiny random ViT, DeiT, DINOv2 (+registers), CLIP / SigLIP towers and
an image classifier, each built here (config + from_config + save_pretrained + preprocessor_config.json)
and loaded through registry.load(folder) like any local model folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from capture import embedded, images, registry
from capture.api import run
from core.types import RunSpec

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, num_channels=3)
VIT_PREP = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "ViTImageProcessor"}
CLIP_PREP = {"do_resize": True, "size": {"shortest_edge": 32}, "resample": 3, "do_center_crop": True,
             "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": [0.4815, 0.4578, 0.4082], "image_std": [0.2686, 0.2613, 0.2758],
             "image_processor_type": "CLIPImageProcessor"}

# name -> (config class, model class, extra config, preprocessor, expected prefix tokens, spans)
CASES = {
    "vit": ("ViTConfig", "ViTModel", {}, VIT_PREP, ["CLS"], {"cls", "patches"}),
    "deit": ("DeiTConfig", "DeiTModel", {}, VIT_PREP, ["CLS", "DIST"], {"cls", "distill", "patches"}),
    "dinov2": ("Dinov2Config", "Dinov2Model", {"mlp_ratio": 2}, CLIP_PREP, ["CLS"], {"cls", "patches"}),
    "dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {"mlp_ratio": 2, "num_register_tokens": 4},
                   CLIP_PREP, ["CLS", "reg0", "reg1", "reg2", "reg3"], {"cls", "registers", "patches"}),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", {"projection_dim": 16}, CLIP_PREP, ["CLS"], {"cls", "patches"}),
    "siglip_vision": ("SiglipVisionConfig", "SiglipVisionModel", {}, VIT_PREP, [], {"patches"}),
    "vit_classifier": ("ViTConfig", "ViTForImageClassification",
                       {"num_labels": 7, "id2label": {i: f"class{i}" for i in range(7)},
                        "label2id": {f"class{i}": i for i in range(7)}}, VIT_PREP, ["CLS"], {"cls", "patches"}),
}


def _config(cls_name: str, extra: dict):
    cls = getattr(transformers, cls_name)
    kwargs = dict(TINY, **extra)
    if cls_name.startswith("Dinov2"):
        kwargs.pop("intermediate_size")
    return cls(**kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny model saved as a local folder, as someone with the hub would have it."""
    torch.manual_seed(0)
    out = {}
    for name, (config_cls, model_cls, extra, prep, _, _) in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        model = getattr(transformers, model_cls)(_config(config_cls, extra)).eval()
        model.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(prep))
        out[name] = folder
    clip = tmp_path_factory.mktemp("clip_full")  # a full CLIP (text + image): HeadScope loads its image tower
    config = transformers.CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=64, vocab_size=99),
                                     vision_config=dict(TINY), projection_dim=16)
    transformers.CLIPModel(config).eval().save_pretrained(clip)
    (clip / "preprocessor_config.json").write_text(json.dumps(CLIP_PREP))
    out["clip_full"] = clip
    return out


def _eager(handle, pixels: np.ndarray) -> list[np.ndarray]:
    model = handle.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(pixel_values=torch.from_numpy(pixels)[None], output_attentions=True)
    finally:
        model.set_attn_implementation("headscope")
    return [a[0].numpy() for a in out.attentions]


@pytest.mark.parametrize("name", list(CASES))
def test_vision_model_from_a_folder(name, folders, store):
    _, _, _, _, prefix, span_names = CASES[name]
    handle = registry.load(str(folders[name]))
    meta = handle.meta
    assert meta.modality == "vision" and not meta.causal and meta.grid == (4, 4)
    assert (meta.n_layers, meta.n_heads) == (2, 4)
    capture = run(RunSpec(model=str(folders[name]), image="cat"), store=store)
    assert capture.tokens[: len(prefix)] == prefix
    assert capture.tokens[len(prefix)] == "patch(0,0)" and capture.tokens[-1] == "patch(3,3)"
    assert set(capture.spans) == span_names and capture.spans["patches"] == range(len(prefix), len(prefix) + 16)
    assert capture.image().shape == (32, 32, 3) and capture.meta.grid == (4, 4)
    pixels, _ = images.preprocess(images.load_image("cat"), handle.tokenizer)
    for layer, eager in enumerate(_eager(handle, pixels)):  # captured maps equal eager output_attentions
        np.testing.assert_allclose(capture.attention(layer).astype(np.float32), eager, atol=1e-3)
    if name == "vit_classifier":
        classes = capture.output.classes
        assert len(classes) == 5 and all(label.startswith("class") for label, _ in classes)
        probs = [p for _, p in classes]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        again = run(RunSpec(model=str(folders[name]), image="cat"), store=store)  # from the cache
        assert again.from_cache and again.output.classes == classes
    else:
        assert capture.output.classes == []


def test_full_clip_loads_its_image_tower(folders):
    handle = registry.load(str(folders["clip_full"]))
    assert type(handle.model).__name__ == "CLIPVisionModel"
    assert handle.meta.modality == "vision" and len(handle.attention_modules) == 2


@pytest.mark.parametrize("prep", [
    VIT_PREP, CLIP_PREP, embedded.DINOV2_PREPROCESSOR,
    dict(CLIP_PREP, size={"shortest_edge": 40}, crop_size={"height": 48, "width": 48}),  # crop larger: padded
])
def test_preprocessing_equals_transformers_image_processor(prep, tmp_path):
    """Our PIL + numpy preprocessing against transformers' own (PIL backend) image processor."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(prep))
    reference = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    ours = images.ImagePrep.from_pretrained(str(tmp_path))
    rgba = images.load_image("coffee").convert("RGBA")
    for picture in (images.load_image("cat"), images.load_image("rocket").rotate(90, expand=True),
                    images.load_image("astronaut").convert("L").convert("RGB"), rgba.convert("RGB")):
        expected = reference(images=picture, return_tensors="np")["pixel_values"][0]
        got, shown = images.preprocess(picture, ours)
        assert got.shape == expected.shape and shown.shape == got.shape[1:] + (3,)
        np.testing.assert_allclose(got, expected, atol=1e-5)
