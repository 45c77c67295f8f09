"""Gemma 3 and PaliGemma: a SigLIP tower over the picture resized to a fixed square (896 / 224 px), one
grid of image tokens over the whole picture (Gemma 3: 64 x 64 patches average-pooled to 16 x 16 = 256
tokens; PaliGemma: one token per 14 px patch).

Masks (the reason both record "full" maps): Gemma 3's image tokens attend to each other bidirectionally
(token_type_ids 1 marks them; a generated token is text, 0); PaliGemma is a prefix-LM: the picture and the
prompt attend to each other bidirectionally (token_type_ids 0), the answer causally (1).  Gemma 3's
pan-and-scan crops are refused (capture.vlm.chat): HeadScope places one view of the picture."""
from __future__ import annotations

import math

from capture.vlm.families.family import Family
from capture.vlm.places import Places, grid
from capture.vlm.tower import TowerView


def _square(count: int, size) -> Places:
    side = math.isqrt(count)
    return Places.of([grid(side, side, (0.0, 0.0, float(size[0]), float(size[1])))])


def gemma3_places(processor, outputs, size) -> Places:
    return _square(int(processor.processor.image_seq_length), size)


def paligemma_places(processor, outputs, size) -> Places:
    return _square(int(processor.processor.image_seq_length), size)


def tower(model, inputs):
    """The SigLIP tower on the picture: the patch grid (no CLS token)."""
    tower_module = model.model.vision_tower
    return TowerView(tower_module, inputs.pixel_values)


GEMMA3 = Family(label="Gemma 3", processor="Gemma3Processor", places=gemma3_places, tower=tower, layout="full",
                fills={"token_type_ids": 0}, markers=("<start_of_image>", "<end_of_image>"))
PALIGEMMA = Family(label="PaliGemma", processor="PaliGemmaProcessor", places=paligemma_places, tower=tower,
                   layout="full", fills={"token_type_ids": 1}, needs_template=False)
