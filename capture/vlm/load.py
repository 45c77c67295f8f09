"""Loading a vision-language model with its processor (modality "vlm")."""
from __future__ import annotations

from capture.engine.handle import ModelHandle, prepare

# LLaVA-family vision-language models (image tokens spliced into a causal LM's prompt)
VLM_TYPES = {"llava"}


def is_vlm(config) -> bool:
    return config.model_type in VLM_TYPES


def load_vlm(name: str, source: str, config, kwargs: dict) -> ModelHandle:
    """A LLaVA-family model with its capture.vlm.model.VlmProcessor; modality "vlm".  Only the language
    model's attention layers are indexed (layer 0 .. n-1 of the LM); the vision tower runs plain SDPA."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from capture.vlm.model import VlmProcessor

    model = LlavaForConditionalGeneration.from_pretrained(source, trust_remote_code=False, dtype=torch.float32,
                                                          attn_implementation="sdpa", **kwargs)
    processor = VlmProcessor.from_pretrained(source, model.config, **kwargs)
    return prepare(name, model, processor, modality="vlm", grid=processor.grid,
                   layers_of=model.model.language_model)
