"""Idefics3 (SmolVLM): the picture is resized (longest edge to the processor's size, then each side up to
a multiple of the tile size, so the whole picture is stretched onto a canvas of whole tiles), cut into
rows x cols tiles, and shown again whole, resized to one tile (the global view).  Each view goes
through the tower alone; pixel shuffle (scale 2 in SmolVLM, 3 in Idefics3-8B) folds s x s patches into
one token: a k x k grid a view, row-major.  The prompt holds the tiles row by row, each after
<fake_token_around_image><row_r_col_c>, then the global view after <global-img>, so the tile markers
lie between the image tokens (the "image" span runs from the first image token to the last; the
per-view spans "image:tile<i>" and "image:global" hold the image tokens only).  Causal mask."""
from __future__ import annotations

import math

from capture.vlm.families.family import Family
from capture.vlm.places import Places, grid
from capture.vlm.tower import TowerView


def places(processor, outputs, size) -> Places:
    width, height = (float(s) for s in size)
    k = math.isqrt(int(processor.processor.image_seq_len))
    image_processor = processor.processor.image_processor
    _n, rows, cols = image_processor.get_number_of_image_patches(int(size[1]), int(size[0]), {}) \
        if image_processor.do_image_splitting else (1, 0, 0)
    views = [grid(k, k, (c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows),
                  f"tile{r * cols + c}") for r in range(rows) for c in range(cols)]
    return Places.of(views + [grid(k, k, (0.0, 0.0, width, height), "global" if views else "")])


def tower(model, inputs):
    """The tower on the global view (the last of the views)."""
    tower_module = model.model.vision_model
    pixels = inputs.pixel_values[0, -1:]  # [1, 3, tile, tile]
    return TowerView(tower_module, pixels, pick=-1)  # the last of the (real) views the tower runs


ROW_COL = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
IDEFICS3 = Family(label="Idefics3", processor="Idefics3Processor", places=places, tower=tower,
                  markers=("<fake_token_around_image>", "<global-img>") + ROW_COL)
