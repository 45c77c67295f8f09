"""Shared look of every figure: colour scales per quantity and a layout legible on light and dark themes."""
from __future__ import annotations

ATTENTION_SCALE = "Viridis"  # attention weights, everywhere
DIVERGING_SCALE = "RdBu_r"  # differences (after - before), centred on 0
METRIC_SCALE = "Cividis"  # head-level metrics on layer x head grids
LOG_FLOOR = -4.0  # log10 colour scale floor: weights below 1e-4 look the same



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
