"""Loading a vision-language model with its processor (modality "vlm").

Any image-text-to-text model transformers ships loads through `AutoModelForImageTextToText`; HeadScope
captures the families it can place on the picture (capture.vlm.families: LLaVA, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM, Gemma 3, PaliGemma) and refuses the others
with one sentence, never running them as text models.  LLaVA keeps capture.vlm.model.VlmProcessor; the
others get their own transformers processor built from the folder's parts (capture.vlm.chat).  Only the
language model's attention layers are HeadScope's (layer 0 .. n-1 of the LM); the vision tower runs
plain SDPA.  The model runs where capture.engine.device says, in its dtype (float32 on the CPU); inputs
follow it (capture.vlm.inputs.placed).  Torch-free on import (the registry imports it).
"""
from __future__ import annotations

from capture.engine.handle import ModelHandle, prepare
from core.errors import ModelUnavailable

# the families capture.vlm.families places on the picture, by config model_type
VLM_TYPES = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "paligemma"}
NOT_IMAGE_TEXT = {"clip", "siglip", "siglip2", "owlvit", "owlv2", "align", "altclip", "chinese_clip", "x_clip",
                  "groupvit", "blip_2_qformer"}  # image + text encoders, not models that answer about a picture


def is_vlm_config(model_type: str, has_vision: bool, has_text: bool) -> bool:
    """A config of a model that reads a picture and writes text: one HeadScope knows, or any composite of a
    vision and a text config that is not a contrastive image-text encoder (refused at load)."""
    return model_type in VLM_TYPES or (has_vision and has_text and model_type not in NOT_IMAGE_TEXT)


def is_vlm(config) -> bool:
    return is_vlm_config(config.model_type, getattr(config, "vision_config", None) is not None,
                         getattr(config, "text_config", None) is not None)


def language_model(model):
    """The language model inside an image-text-to-text model (`text_model` in Idefics3)."""
    inner = model.model
    return getattr(inner, "language_model", None) or inner.text_model


def load_vlm(name: str, source: str, config, kwargs: dict) -> ModelHandle:
    """A vision-language model with its processor in the handle's `tokenizer` slot; modality "vlm"."""
    from transformers import AutoModelForImageTextToText

    from capture.engine import device
    from capture.text.load import weight_bytes
    from capture.vlm.chat import ChatProcessor
    from capture.vlm.families import family_of
    from capture.vlm.model import VlmProcessor

    family = family_of(config.model_type)
    if config.model_type == "smolvlm":
        raise ModelUnavailable(f"{name} is a SmolVLM2 model, whose processor needs the num2words package, which "
                               "HeadScope does not install; SmolVLM (v1, model_type idefics3) loads.")
    if family is None:
        raise ModelUnavailable(f"{name} is a {config.model_type} model, a vision-language family HeadScope cannot "
                               "place on the picture yet; it captures LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, "
                               "Qwen2.5-VL, Idefics3 / SmolVLM, Gemma 3 and PaliGemma.")
    if config.model_type == "llava":
        processor = VlmProcessor.from_pretrained(source, config, **kwargs)
    else:
        processor = ChatProcessor.from_pretrained(source, config, family, name, kwargs)
    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=False, attn_implementation="sdpa",
                                                        **device.placement(weight_bytes(source, config)), **kwargs)
    return prepare(name, model, processor, modality="vlm", grid=processor.grid, layers_of=language_model(model))
