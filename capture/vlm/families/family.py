"""What differs between the vision-language families (`Family`), read by capture.vlm.chat and the adapter."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Family:
    label: str  # as people name it
    processor: str  # the transformers processor class (built without its video processor)
    places: Callable  # (ChatProcessor, processor outputs, (width, height)) -> capture.vlm.places.Places
    tower: Callable | None = None  # (model, VlmInputs) -> capture.vlm.tower.TowerView (the view its maps are of) or None
    layout: str = "tril"
    fills: dict = field(default_factory=dict)  # per-token input -> its value for a generated token (else 0)
    markers: tuple = ()  # special tokens around / between the image tokens (the "image_block" span)
    needs_template: bool = True
    shares_prefix: bool = False


__all__ = ["Family"]
