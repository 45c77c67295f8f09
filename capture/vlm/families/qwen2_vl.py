"""Qwen2-VL and Qwen2.5-VL: dynamic resolution.  The picture is resized (aspect kept, each side a multiple
of 28 px, pixel count within the processor's min_pixels..max_pixels), cut into 14 px patches, and each
2 x 2 block of patches is merged into one token: a grid of (height / 28) x (width / 28) tokens, row-major,
over the whole picture.  Positions are M-RoPE (3-D), computed by the model from mm_token_type_ids and
image_grid_thw; the mask is causal.  The vision tower attends over the packed patches of all images at
once (Qwen2.5-VL: in windows), not as a ViT over one view, so its maps are not recorded."""
from __future__ import annotations

from capture.vlm.families.family import Family
from capture.vlm.places import Places, grid


def places(processor, outputs, size) -> Places:
    _t, height, width = (int(x) for x in outputs["image_grid_thw"][0])  # in 14 px patches
    merge = int(processor.processor.image_processor.merge_size)
    return Places.of([grid(height // merge, width // merge, (0.0, 0.0, float(size[0]), float(size[1])))])


MARKERS = ("<|vision_start|>", "<|vision_end|>")
QWEN2_VL = Family(label="Qwen2-VL", processor="Qwen2VLProcessor", places=places, markers=MARKERS)
QWEN2_5_VL = Family(label="Qwen2.5-VL", processor="Qwen2_5_VLProcessor", places=places, markers=MARKERS)
