"""Reading a picture back with the scene generator's knowledge: which requested objects a (generated)
picture shows, by colour, cell and outline.

The DiT evaluation (training/eval_dit.py, HeadHunter's reward in probes/headhunter.py) checks generated
32 x 32 pictures against their captions with `check_image`; the DiT grounding (analytics/dit.py) takes
each caption object's pixels from `colour_masks` and `largest_component`.  Scenes are drawn by
core.scenes on a neutral (grey) background, so a pixel's chroma max(RGB) - min(RGB) is 0 there and
large on every shape: a coloured pixel belongs to the palette colour nearest to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.scenes import COLOURS, SHAPES, ObjectSpec, parse_caption, position_cell, shape_mask

CHROMA_MIN = 60  # a pixel with max(RGB) - min(RGB) above this is part of a shape, not the background


def chroma(image: np.ndarray) -> np.ndarray:
    """[H, W] int: max(RGB) - min(RGB), 0 on the neutral background."""
    rgb = np.asarray(image, dtype=np.int16)
    return rgb.max(-1) - rgb.min(-1)


def nearest_colour(image: np.ndarray) -> np.ndarray:
    """[H, W] int: index into COLOURS of the closest palette colour of each pixel (by RGB distance)."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)  # [colour, 3]
    rgb = np.asarray(image, dtype=np.float32)[..., None, :]  # [H, W, 1, 3]
    return np.argmin(((rgb - palette) ** 2).sum(-1), axis=-1)


def colour_masks(image: np.ndarray, chroma_min: int = CHROMA_MIN) -> dict[str, np.ndarray]:
    """colour name -> [H, W] bool: the coloured (non-background) pixels closest to that colour."""
    coloured = chroma(image) > chroma_min
    nearest = nearest_colour(image)
    return {name: coloured & (nearest == i) for i, name in enumerate(COLOURS)}


def cell_of(y: float, x: float, size: int) -> tuple[int, int]:
    cell = size / 3
    return min(2, max(0, int(y // cell))), min(2, max(0, int(x // cell)))


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose outline (fitted to the mask's centroid and area) overlaps `mask` best (IoU)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return ""
    size = mask.shape[0]
    area = len(ys)
    best, best_iou = "", -1.0
    for shape in SHAPES:
        # radius of a template with the same area as the mask
        unit = shape_mask(shape, 64, (32.0, 32.0), 20.0).sum() / 400.0  # area per radius^2
        radius = float(np.sqrt(area / unit))
        if shape == "triangle":  # the triangle's centroid sits below its nominal centre
            cy = ys.mean() + 0.5 - 0.317 * radius
        else:
            cy = ys.mean() + 0.5
        template = shape_mask(shape, size, (cy, xs.mean() + 0.5), radius)
        iou = (template & mask).sum() / max(1, (template | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def components(mask: np.ndarray) -> np.ndarray:
    """[H, W] int labels of the 4-connected components of a bool mask (0 = background): each pixel
    takes the smallest index in its component, by min-propagation (vectorised; O(diameter) rounds)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        best = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        best = np.where(mask, best, big)
        if np.array_equal(best, labels):
            return np.where(mask, labels, 0)
        labels = best


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (an empty mask stays empty)."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    labels = components(mask)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return labels == ids[np.argmax(counts)]


@dataclass
class ObjectCheck:
    """How well a generated picture shows one requested object."""

    requested: ObjectSpec
    colour_ok: bool  # a blob of the requested colour is there
    position_ok: bool  # ... and its centroid lies in the requested cell
    shape_ok: bool  # ... and its outline classifies as the requested shape
    found_shape: str = ""
    found_cell: tuple[int, int] | None = None
    pixels: int = 0


def check_image(image: np.ndarray, caption: str, min_pixels: int | None = None) -> list[ObjectCheck]:
    """Read a (generated) picture against its caption, object by object, with the palette's knowledge."""
    size = image.shape[0]
    min_pixels = max(4, round(0.006 * size * size)) if min_pixels is None else min_pixels
    masks = colour_masks(image)
    out = []
    for spec in parse_caption(caption):
        blob = largest_component(masks[spec.colour])
        n = int(blob.sum())
        if n < min_pixels:
            out.append(ObjectCheck(spec, False, False, False, pixels=n))
            continue
        ys, xs = np.nonzero(blob)
        cell = cell_of(ys.mean() + 0.5, xs.mean() + 0.5, size)
        shape = classify_shape(blob)
        out.append(ObjectCheck(spec, True, cell == position_cell(spec.position), shape == spec.shape,
                               shape, cell, n))
    return out


__all__ = ["CHROMA_MIN", "chroma", "nearest_colour", "colour_masks", "cell_of", "classify_shape", "components",
           "largest_component", "ObjectCheck", "check_image"]
