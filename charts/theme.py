"""Shared look of every figure: colour scales per quantity and a layout legible on light and dark themes."""
from __future__ import annotations

import html
from functools import lru_cache

import numpy as np

ATTENTION_SCALE = "Viridis"  # attention weights, everywhere
DIVERGING_SCALE = "RdBu_r"  # differences (after - before), centred on 0
METRIC_SCALE = "Cividis"  # head-level metrics on layer x head grids
LOG_FLOOR = -4.0  # log10 colour scale floor: weights below 1e-4 look the same



def plotly_text(text: str) -> str:
    """`text` shown literally in a Plotly label: Plotly reads a few HTML tags in labels, so a token such as
    "</s>" (T5's end) vanished and "<s>" (Llama's start) struck the labels after it through."""
    return html.escape(text, quote=False)


def plot_config(image_format: str = "png") -> dict:
    """Plotly toolbar settings: the camera button downloads the figure as PNG (2x) or SVG."""
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": image_format, "scale": 2 if image_format == "png" else 1},
    }


def base_layout(title: str = "", height: int = 480) -> dict:
    """Transparent backgrounds (the page theme shows through), room for tick labels, readable fonts."""
    return dict(
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=15)) if title else None,
        height=height,
        margin=dict(l=10, r=10, t=50 if title else 20, b=10),
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font=dict(size=12),
    )


def fading(scale: str = ATTENTION_SCALE, floor: float = 0.2, n: int = 11) -> list[list]:
    """A Plotly colour scale whose colours grow opaque with the value (alpha from `floor` at the bottom to 1 at
    the top): an overlay lets its picture through where the value is low (charts.pictures.blend does the same)."""
    lut = colour_table(scale, n)
    return [[i / (n - 1), f"rgba({r},{g},{b},{floor + (1 - floor) * i / (n - 1):.2f})"]
            for i, (r, g, b) in enumerate(lut)]


@lru_cache(maxsize=8)
def colour_table(scale: str = ATTENTION_SCALE, n: int = 256) -> np.ndarray:
    """lut  # [n, 3] uint8: `n` colours evenly along a Plotly colour scale, for pictures coloured on the
    server (lut[round(v * (n - 1))] is the colour Plotly would draw for v in [0, 1])."""
    from plotly.colors import get_colorscale, sample_colorscale, unlabel_rgb

    colours = sample_colorscale(get_colorscale(scale), list(np.linspace(0.0, 1.0, n)), colortype="rgb")
    return np.array([unlabel_rgb(c) for c in colours], dtype=np.float64).round().astype(np.uint8)
