"""One small class per modality: how a RunSpec becomes model inputs, a run and a Capture.

Every adapter follows the same contract (`Adapter.capture`): run the model (generation on the fast
path if asked), then one recorded pass over the final sequence, streaming each layer's maps to the
cache as soon as that layer is done.  `capture.run` picks the adapter from the model's modality.
"""
from __future__ import annotations

from typing import Callable

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)


class InputError(ValueError):
    """The input cannot be run; the message is one sentence meant for the user."""


def no_progress(_fraction: float, _message: str) -> None:
    """The default progress callback: report nothing."""


def adapter_for(modality: str):
    """The adapter class for a modality."""
    if modality == "text":
        from capture.adapters.llm import TextAdapter

        return TextAdapter
    if modality == "vision":
        from capture.adapters.vit import VisionAdapter

        return VisionAdapter
    if modality == "vlm":
        from capture.adapters.vlm import VlmAdapter

        return VlmAdapter
    if modality == "dit":
        from capture.adapters.dit import DitAdapter

        return DitAdapter
    raise InputError(f"HeadScope cannot capture {modality} models yet.")
