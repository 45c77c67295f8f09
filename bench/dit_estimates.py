"""What a DiT capture of a released model would take (the README's table of estimates), from capture.dit.write's
`estimate`, the function that refuses a capture before it runs.

Each row is a released transformer's shape (its diffusers config: layers, heads, head width, how the picture's
1,024² or 512² pixels become patches) and the text a ten-word prompt gives it: the positions the transformer
reads and the columns of the word maps (the prompt's tokens, the chat template's or system message's where the
pipeline adds one, and one column per padding run).  Nothing is loaded or run.
  full    every step's full maps of every layer (the "full" layout)
  kept    the default "split" capture on disk, in GB (the cache's default budget is 20 GB, HEADSCOPE_CACHE_GB)
  memory  its maps in flight, above the loaded pipeline, in GB

    .venv/bin/python bench/dit_estimates.py
"""
from __future__ import annotations

from typing import NamedTuple

from common import table

from capture.dit.write import estimate


class Shape(NamedTuple):
    """A released transformer's shape and a ten-word prompt's text on its axis."""

    name: str
    layers: int
    heads: int
    head_dim: int
    patch_px: int  # pixels per patch side (VAE factor x patch size)
    text: int  # text positions the transformer reads
    columns: int  # word-map columns of a "split" capture
    cross_heads: int = 0  # a cross-attention family's cross heads (PixArt, Sana)
    word_layers: int | None = None  # layers whose picture reads the text (None: all)
    refiners: int = 0  # image-only and caption-only refiner layers each (Lumina 2, Z-Image)


SHAPES = {
    "SD3-medium": Shape("SD3-medium", 24, 24, 64, 16, 77 + 256, 26),  # CLIP-L/G 12 + pad, T5 12 + pad
    "Flux-dev": Shape("Flux-dev", 19 + 38, 24, 128, 16, 512, 14),  # T5 13 + pad
    "PixArt-Σ": Shape("PixArt-Σ", 28, 16, 72, 16, 300, 14, cross_heads=16),
    "Sana-1600M": Shape("Sana-1600M", 20, 70, 32, 32, 300, 14, cross_heads=20),
    "Qwen-Image": Shape("Qwen-Image", 60, 24, 128, 16, 18, 18),  # the prompt and the template's closing, unpadded
    "Lumina-Image 2.0": Shape("Lumina-Image 2.0", 2 + 2 + 26, 24, 96, 16, 46, 46, word_layers=26, refiners=2),
    "Z-Image": Shape("Z-Image", 2 + 2 + 30, 30, 128, 16, 32, 21, word_layers=30, refiners=2),  # 20 + a pad run
    "FLUX.2 [dev]": Shape("FLUX.2 [dev]", 8 + 48, 48, 128, 16, 512, 52),  # system message 40, prompt 11, pad
}
ROWS = [("SD3-medium", 512, 28), ("SD3-medium", 1024, 28), ("Flux-dev", 1024, 4), ("Flux-dev", 1024, 28),
        ("PixArt-Σ", 1024, 20), ("Sana-1600M", 1024, 20), ("Qwen-Image", 1024, 50), ("Qwen-Image", 1024, 20),
        ("Lumina-Image 2.0", 1024, 30), ("Z-Image", 1024, 9), ("Z-Image", 1024, 50), ("FLUX.2 [dev]", 1024, 28),
        ("FLUX.2 [dev]", 1024, 50)]


def sides(shape: Shape, n_image: int) -> list[int] | None:
    """Each layer's map side in the full layout: the refiners' part of the axis, else the whole."""
    if not shape.refiners:
        return None
    joint = shape.layers - 2 * shape.refiners
    return [n_image] * shape.refiners + [shape.text] * shape.refiners + [n_image + shape.text] * joint


def size(nbytes: int) -> str:
    """Bytes as the table says them: TB from 1 TB, else GB."""
    return f"{nbytes / 2**40:.1f} TB" if nbytes >= 2**40 else f"{nbytes / 2**30:.0f} GB"


def main() -> None:
    rows = []
    for name, px, steps in ROWS:
        s = SHAPES[name]
        n_image = (px // s.patch_px) ** 2
        cross = bool(s.cross_heads)
        full = estimate("full", s.layers, s.heads, s.head_dim, n_image, s.text, s.columns, steps, cross, s.cross_heads,
                        sides=sides(s, n_image))
        split = estimate("split", s.layers, s.heads, s.head_dim, n_image, s.text, s.columns, steps, cross,
                         s.cross_heads, word_layers=s.word_layers)
        turbo = " (Turbo's steps)" if (name, steps) == ("Z-Image", 9) else ""
        rows.append([f"{name}, {px:,}², {steps}{turbo}", size(full.disk_bytes),
                     f"{split.disk_bytes / 2**30:.1f} GB", f"{split.memory_bytes / 2**30:.1f} GB"])
    print(table(["pipeline, picture, steps", "full maps of every step", "kept (disk)", "memory above the pipeline"],
                rows))


if __name__ == "__main__":
    main()
