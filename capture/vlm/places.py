"""Where each image token of a VLM prompt sits on the picture (numpy only).

Every family turns a picture into image tokens its own way: one grid over the picture resized (LLaVA,
Gemma 3's pooled 16 x 16, PaliGemma, Qwen2-VL's merged 2 x 2 patches at dynamic resolution), tiles plus
a global view (Idefics3 / SmolVLM), a base view plus an any-resolution grid with a newline token ending
each row (LLaVA-NeXT / OneVision).  `Places` is what they have in common: per image token, in prompt
order, its box (x0, y0, x1, y1) in pixels of the picture stored with the capture (NaN for a token with
no place, such as a row-end newline), the view it belongs to and its (row, col) cell in that view.
The capture stores the boxes and the tokens' positions ("image_boxes", "image_positions"), which the
analytics (analytics.vlm_picture) paint onto the picture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_PLACE = (float("nan"),) * 4


@dataclass(frozen=True)
class View:
    """One view's image tokens: name ("" when the picture has one view), boxes  # [token, 4] float32,
    cells: (row, col) per token, None for a token with no place."""

    name: str
    boxes: np.ndarray
    cells: tuple


def grid(rows: int, cols: int, region: tuple[float, float, float, float], name: str = "") -> View:
    """A rows x cols grid of tokens, row-major, tiling `region` (x0, y0, x1, y1) of the picture."""
    x0, y0, x1, y1 = region
    xs = np.linspace(x0, x1, cols + 1)
    ys = np.linspace(y0, y1, rows + 1)
    r, c = np.divmod(np.arange(rows * cols), cols)
    boxes = np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1).astype(np.float32)
    return View(name, boxes, tuple(zip(r.tolist(), c.tolist())))


@dataclass(frozen=True)
class Places:
    """The image tokens of one prompt: boxes  # [image token, 4] float32 in picture pixels (NaN: no place),
    views: (name, token count) in token order, cells: (row, col) in its view per token (None: no place)."""

    boxes: np.ndarray
    views: tuple
    cells: tuple

    @classmethod
    def of(cls, views: list[View]) -> "Places":
        return cls(boxes=np.concatenate([v.boxes for v in views]).astype(np.float32),
                   views=tuple((v.name, len(v.boxes)) for v in views),
                   cells=tuple(cell for v in views for cell in v.cells))

    def __len__(self) -> int:
        return len(self.boxes)

    def labels(self) -> list[str]:
        """A label per image token: "patch(r,c)" on a one-view picture, "<view>(r,c)" with several views,
        "img:newline" for a token with no place."""
        out = []
        for (name, count), start in zip(self.views, np.cumsum([0] + [n for _, n in self.views])):
            for cell in self.cells[start:start + count]:
                out.append("img:newline" if cell is None else f"{name or 'patch'}({cell[0]},{cell[1]})")
        return out

    def spans(self, positions: list[int]) -> dict[str, range]:
        """"image:<view>" for each view of a picture with several (the tokens of one view are
        consecutive), given the image tokens' positions in the prompt."""
        if len(self.views) < 2:
            return {}
        out, start = {}, 0
        for name, count in self.views:
            if count:
                out[f"image:{name}"] = range(positions[start], positions[start + count - 1] + 1)
            start += count
        return out


__all__ = ["Places", "View", "grid", "NO_PLACE"]
