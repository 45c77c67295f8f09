"""Image tokens on the picture: a VLM capture's image tokens, their boxes, and values painted onto the
picture (pure numpy).

A capture stores, per image token, its position in the sequence and its box (x0, y0, x1, y1) in pixels of
the stored picture (capture/vlm/adapter.py: "image_positions", "image_boxes"; NaN for a token with no
place, such as LLaVA-NeXT's row-end newlines).  Captures made before the boxes were stored, and
hand-made stand-ins, have one grid (`meta.grid`) over the picture in the "image" span, row-major.

`PictureLayout.paint` turns a value per image token into a raster over the whole picture, the grid
the analytics and figures draw: each token's value is spread evenly over its box (so a raster cell
gets the value times the share of the token's box it covers), and where views overlap (Idefics3's tiles
and global view, LLaVA-OneVision's base view and tiles) their contributions add.  The raster's cells are
the smallest boxes (rows = picture height / the smallest box height, likewise columns, at most
MAX_RASTER a side); on a one-grid picture it is that grid and painting is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_RASTER = 96  # raster cells a side at most


def _grid_boxes(grid: tuple[int, int], height: float, width: float) -> np.ndarray:
    """[rows * cols, 4] boxes of a row-major grid over a height x width picture."""
    rows, cols = grid
    xs, ys = np.linspace(0, width, cols + 1), np.linspace(0, height, rows + 1)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1).astype(np.float32)


def _overlap(lo: np.ndarray, hi: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[token, cell]: the length of [lo, hi) inside each cell [edges[k], edges[k + 1])."""
    return np.clip(np.minimum(hi[:, None], edges[None, 1:]) - np.maximum(lo[:, None], edges[None, :-1]), 0, None)


@dataclass(frozen=True)
class PictureLayout:
    """positions  # [image token] their sequence positions; boxes  # [image token, 4] in picture pixels (NaN:
    no place); size (height, width) of the picture; raster (rows, cols); weights  # [image token, rows * cols]
    the share of each token's box in each raster cell."""

    positions: np.ndarray
    boxes: np.ndarray
    size: tuple[int, int]
    raster: tuple[int, int]
    weights: np.ndarray

    @classmethod
    def build(cls, positions, boxes: np.ndarray, size: tuple[int, int], raster: tuple[int, int] | None = None):
        boxes = np.asarray(boxes, np.float64)
        height, width = size
        placed = np.isfinite(boxes).all(1)
        if raster is None:
            sides = boxes[placed]
            rows = int(round(height / max(float((sides[:, 3] - sides[:, 1]).min()), 1e-9))) if placed.any() else 1
            cols = int(round(width / max(float((sides[:, 2] - sides[:, 0]).min()), 1e-9))) if placed.any() else 1
            raster = (min(max(rows, 1), MAX_RASTER), min(max(cols, 1), MAX_RASTER))
        safe = np.where(placed[:, None], boxes, 0.0)
        oy = _overlap(safe[:, 1], safe[:, 3], np.linspace(0, height, raster[0] + 1))  # [token, rows]
        ox = _overlap(safe[:, 0], safe[:, 2], np.linspace(0, width, raster[1] + 1))  # [token, cols]
        area = np.maximum((safe[:, 2] - safe[:, 0]) * (safe[:, 3] - safe[:, 1]), 1e-12)
        weights = (oy[:, :, None] * ox[:, None, :]).reshape(len(boxes), -1) / area[:, None]
        weights[~placed] = 0.0
        return cls(np.asarray(positions, np.int64), boxes.astype(np.float32), (int(height), int(width)),
                   tuple(raster), weights.astype(np.float32))

    @classmethod
    def of(cls, capture) -> "PictureLayout":
        """The layout of a VLM capture: its stored boxes, else one grid (`meta.grid`) over its "image" span."""
        picture = capture.image() if hasattr(capture, "image") else None
        store = getattr(capture, "store", None)
        boxes = positions = None
        if store is not None:
            try:
                positions = np.asarray(store.get_array(capture.key, "image_positions"))
                boxes = np.asarray(store.get_array(capture.key, "image_boxes"))
            except Exception:  # noqa: BLE001 - a capture made before the boxes were stored
                boxes = positions = None
        grid = capture.meta.grid
        if boxes is None:
            if grid is None:
                raise ValueError(f"{capture.meta.name}: this capture has neither image-token boxes nor a patch grid.")
            image = capture.spans["image"]
            size = picture.shape[:2] if picture is not None else grid
            return cls.build(np.arange(image.start, image.stop), _grid_boxes(grid, *size), size, tuple(grid))
        size = picture.shape[:2] if picture is not None else \
            (float(np.nanmax(boxes[:, 3])), float(np.nanmax(boxes[:, 2])))
        return cls.build(positions, boxes, size, tuple(grid) if grid is not None and len(boxes) == grid[0] * grid[1]
                         else None)

    @property
    def keys(self):
        """The image tokens' positions, as a slice when they are consecutive (cheap to index)."""
        p = self.positions
        if len(p) and p[-1] - p[0] + 1 == len(p):
            return slice(int(p[0]), int(p[-1]) + 1)
        return p

    def image_keys(self, rows: np.ndarray) -> np.ndarray:
        """rows  # [..., key] -> [..., image token]: the attention on the image tokens, in token order."""
        return np.asarray(rows, dtype=np.float32)[..., self.keys]

    def paint(self, values: np.ndarray) -> np.ndarray:
        """values  # [..., image token] -> [..., rows, cols]: spread over each token's box on the raster."""
        values = np.asarray(values, dtype=np.float32)
        return (values @ self.weights).reshape(values.shape[:-1] + self.raster)

    def peak(self, values: np.ndarray) -> np.ndarray:
        """values  # [image token] -> [rows, cols]: each raster cell takes the largest value among the tokens
        whose boxes reach it (a score, such as φ, is not spread like attention mass); 0 where none does."""
        values = np.asarray(values, dtype=np.float32)
        reach = self.weights > 0  # [image token, cell]
        cells = np.where(reach, values[:, None], -np.inf).max(0) if len(values) else np.zeros(reach.shape[1])
        return np.where(np.isfinite(cells), cells, 0.0).astype(np.float32).reshape(self.raster)

    def cells(self, token: int) -> list[tuple[int, int]]:
        """The raster cells image token `token` (an index into positions) covers at least half of."""
        share = self.weights[token].reshape(self.raster)  # a cell inside the box holds the largest share
        top = float(share.max())
        return [] if top <= 0 else [(int(r), int(c)) for r, c in zip(*np.nonzero(share >= 0.5 * top - 1e-9))]

    def index(self, position: int) -> int | None:
        """The image-token index of sequence position `position` (None: not an image token)."""
        found = np.flatnonzero(self.positions == position)
        return int(found[0]) if len(found) else None


__all__ = ["PictureLayout", "MAX_RASTER"]
