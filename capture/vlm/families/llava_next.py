"""LLaVA-NeXT and LLaVA-OneVision: any resolution.  The processor picks the best of the model's grid
pinpoints for the picture, resizes the picture into it (aspect kept) and pads it centred, cuts that canvas
into tiles of the tower's input size, and adds the whole picture resized to one tile (the base view).
The model sees the base view's g x g patch tokens, then one grid over all tiles together (row-major over
the canvas) with the padding's rows or columns taken off (`unpad_image`), LLaVA-OneVision's shrunk by
bilinear interpolation when it exceeds anyres_max_N times the base (`vision_aspect_ratio`), each row
ended by a learned newline token that has no place on the picture.  Views: "base" and "tiles".
Causal mask.  Geometry as transformers' `pack_image_features`, `unpad_image` and the image processor's
`get_patch_output_size` compute it, in pixels of the original picture."""
from __future__ import annotations

import math

import numpy as np

from capture.vlm.families.family import Family
from capture.vlm.places import NO_PLACE, Places, View, grid
from capture.vlm.tower import TowerView, patch_grid


def _kept(grid_h: int, grid_w: int, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rows and columns of the tiles' grid that `unpad_image` keeps for a height x width picture."""
    if width / height > grid_w / grid_h:
        new_height = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_height) // 2
        return (pad, grid_h - pad), (0, grid_w)
    new_width = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_width) // 2
    return (0, grid_h), (pad, grid_w - pad)


def tiles_view(config, size) -> View:
    """The tiles' tokens of a width x height picture: kept cells (row-major), a newline after each row."""
    from transformers.image_processing_utils import select_best_resolution

    width, height = (int(s) for s in size)
    tile = config.vision_config.image_size
    g, _ = patch_grid(config.vision_config)
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    grid_h, grid_w = best_h // tile * g, best_w // tile * g
    (r0, r1), (c0, c1) = _kept(grid_h, grid_w, height, width)
    rows, cols = r1 - r0, c1 - c0
    limit = getattr(config, "vision_aspect_ratio", None)
    if limit:  # OneVision: "anyres_max_9" shrinks the grid to about 9 base views
        ratio = math.sqrt(rows * cols / (int(limit.strip("anyres_max_")) * g * g))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    # where the resized picture lies on the canvas (the image processor's get_patch_output_size + centred pad)
    if best_w / width < best_h / height:
        new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    ys = (r0 + np.arange(rows + 1) * (r1 - r0) / rows) * best_h / grid_h  # canvas pixels
    xs = (c0 + np.arange(cols + 1) * (c1 - c0) / cols) * best_w / grid_w
    ys = np.clip((ys - top) * height / new_h, 0, height)  # picture pixels
    xs = np.clip((xs - left) * width / new_w, 0, width)
    boxes, cells = [], []
    for r in range(rows):
        for c in range(cols):
            boxes.append((xs[c], ys[r], xs[c + 1], ys[r + 1]))
            cells.append((r, c))
        boxes.append(NO_PLACE)
        cells.append(None)
    return View("tiles", np.asarray(boxes, np.float32), tuple(cells))


def places(processor, outputs, size) -> Places:
    g, _ = patch_grid(processor.config.vision_config)
    base = grid(g, g, (0.0, 0.0, float(size[0]), float(size[1])), "base")
    return Places.of([base, tiles_view(processor.config, size)])


def tower(model, inputs):
    """The tower on the base view (the whole picture resized to one tile)."""
    tower_module = model.model.vision_tower
    return TowerView(tower_module, inputs.pixel_values[0, :1], pick=0)  # the first view the tower runs


LLAVA_NEXT = Family(label="LLaVA-NeXT", processor="LlavaNextProcessor", places=places, tower=tower)
ONEVISION = Family(label="LLaVA-OneVision", processor="LlavaOnevisionProcessor", places=places, tower=tower)
