"""The pointing game: does a saliency map's peak fall on the object it should find?

Zhang et al., "Top-down Neural Attention by Excitation Backprop" (ECCV 2016): a hit when the maximum of
the map lies inside a ground-truth box of the object asked about.  Here the map is on a patch grid
(a GIFT saliency, analytics.vlm.gaze): the peak patch's pixel centre is tested against the boxes of
every object the question asks about (core.scenes QA.objects -> SceneObject.box).  The baseline is
the same test for a uniformly random patch, taken exactly: the share of patch centres inside the
boxes.  Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def patch_centres(grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(y, x)  # [rows, cols] each: pixel centres of the patches of a picture of size (height, width)."""
    rows, cols = grid
    ph, pw = size[0] / rows, size[1] / cols
    r, c = np.mgrid[0:rows, 0:cols]
    return (r + 0.5) * ph, (c + 0.5) * pw


def in_box(grid: tuple[int, int], size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """bool  # [rows, cols]: patches whose centre lies in box (x0, y0, x1, y1), x1 / y1 exclusive."""
    y, x = patch_centres(grid, size)
    x0, y0, x1, y1 = box
    return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


@dataclass(frozen=True)
class Pointing:
    """hits: the saliency peak's patch centre is in one of the asked objects' boxes, per question;
    chance: the same for a uniformly random patch (exact expectation), per question."""

    hits: np.ndarray
    chance: np.ndarray

    @property
    def hit_rate(self) -> float:
        return float(np.mean(self.hits)) if len(self.hits) else float("nan")

    @property
    def chance_rate(self) -> float:
        return float(np.mean(self.chance)) if len(self.chance) else float("nan")


def pointing(saliencies: Sequence[np.ndarray], boxes: Sequence[Sequence[tuple[int, int, int, int]]],
             size: tuple[int, int]) -> Pointing:
    """The pointing game: saliencies  # [rows, cols] each, with the boxes of the objects its question asks
    about, on pictures of `size` (height, width) pixels."""
    hits, chance = [], []
    for s, object_boxes in zip(saliencies, boxes):
        s = np.asarray(s, dtype=np.float32)
        inside = np.zeros(s.shape, bool)
        for box in object_boxes:
            inside |= in_box(s.shape, size, box)
        peak = np.unravel_index(int(np.argmax(s)), s.shape)
        hits.append(bool(inside[peak]))
        chance.append(float(inside.mean()))
    return Pointing(hits=np.asarray(hits), chance=np.asarray(chance))


__all__ = ["Pointing", "in_box", "patch_centres", "pointing"]
