"""LLaVA (and the embedded shapes-vlm): one grid of patches over the picture as the model saw it
(resized, and centre-cropped where its image processor crops), with capture.vlm.model.VlmProcessor.
With "full" feature selection the tower's CLS token comes first, with no place on the picture."""
from __future__ import annotations

from capture.vlm.families.family import Family
from capture.vlm.places import Places, grid
from capture.vlm.tower import TowerView


def places(processor, outputs, size) -> Places:
    """The processor's patch grid over the picture as the model saw it (`size`: its width, height)."""
    return Places.of([grid(*processor.grid, (0.0, 0.0, float(size[0]), float(size[1])))])


def tower(model, inputs):
    """The vision tower on the picture: CLS first, then the patch grid."""
    tower_module = model.model.vision_tower
    return TowerView(tower_module, inputs.pixel_values)


LLAVA = Family(label="LLaVA", processor="LlavaProcessor", places=places, tower=tower, shares_prefix=True)
