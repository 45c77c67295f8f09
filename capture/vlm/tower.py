"""A VLM's vision tower run alone on one view of the picture, for its own attention maps.

`tower_maps` runs a transformers ViT-like tower (CLIP, SigLIP, DINOv2, Idefics3's) once more with eager
attention and `output_attentions`, and returns maps  # [layer, head, token, token] float16: the tower's
prefix tokens (CLS) first, then the patches row-major.  Interventions act on the language model only, so
these maps are the same with or without one.  DINOv2-S at 112 px: 12 x 6 maps of 65 x 65, ~10 ms.
"""
from __future__ import annotations

import numpy as np
import torch

from capture.engine.device import to_host


def tower_maps(tower, pixel_values: torch.Tensor) -> tuple[np.ndarray, tuple[int, int]]:
    """(maps  # [layer, head, token, token] float16, (rows, cols)) of `tower` (a PreTrainedModel) on
    `pixel_values` # [1, 3, height, width] (moved to its device, in its dtype): the grid is the one of the
    pixels it ran on, not the config's image_size (a DINOv2 config says 518 px; shapes-vlm feeds it 112)."""
    inputs = {"pixel_values": pixel_values.to(device=tower.device, dtype=tower.dtype)}
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            maps = tower(**inputs, output_attentions=True).attentions  # per layer [1, head, token, token]
    finally:
        tower.set_attn_implementation(previous)
    patch = tower.config.patch_size if isinstance(tower.config.patch_size, int) else tower.config.patch_size[0]
    height, width = pixel_values.shape[-2:]
    return to_host(torch.stack([m[0] for m in maps]).to(torch.float16)), (height // patch, width // patch)


def patch_grid(vision_config) -> tuple[int, int]:
    """(rows, cols) of patches of a square tower input (image_size // patch_size a side)."""
    size = vision_config.image_size if isinstance(vision_config.image_size, int) else vision_config.image_size[0]
    patch = vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0]
    return size // patch, size // patch


__all__ = ["tower_maps", "patch_grid"]
