"""Loading a vision encoder or image classifier with its image preprocessing (modality "vision")."""
from __future__ import annotations

from capture.engine.handle import ModelHandle, prepare

# vision encoders loaded through AutoModel / AutoModelForImageClassification
VISION_TYPES = {"vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "siglip_vision_model"}
# full image-text models whose image tower HeadScope loads on its own
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


def is_vision(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return (config.model_type in VISION_TYPES or config.model_type in VISION_TOWERS
            or any(a.endswith("ForImageClassification") for a in archs))




def load_vision(name: str, source: str, config, kwargs: dict) -> ModelHandle:
    """A vision encoder or image classifier, with its preprocessing; modality "vision"."""
    import torch
    import transformers

    from capture.images import ImagePrep

    archs = getattr(config, "architectures", None) or []
    if config.model_type in VISION_TOWERS:
        auto = getattr(transformers, VISION_TOWERS[config.model_type])
    elif any(a.endswith("ForImageClassification") for a in archs):
        auto = transformers.AutoModelForImageClassification
    else:
        auto = transformers.AutoModel
    model = auto.from_pretrained(source, trust_remote_code=False, dtype=torch.float32,
                                 attn_implementation="sdpa", **kwargs)
    vision = model.config
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    prep = ImagePrep.from_pretrained(source, image_size=image_size, **kwargs)
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    fixed = prep.fixed_size()
    grid = (fixed[0] // patch, fixed[1] // patch) if fixed else None
    return prepare(name, model, prep, modality="vision", grid=grid)
