"""Reading a DiT capture back (torch-free: pages and analytics may import it).

A DiT capture (capture/dit/adapter.py) stores, under its key:

    T007   layer 7's maps at every recorded sampling step  # [step, head, query, key] float16
           (read as a memory map: one step of one head reads only those bytes)
    L007   layer 7's maps averaged over the recorded steps  # [head, query, key] float16
           (what `Capture.attention(7)` returns, so every generic view works on a DiT capture)
    overviewNNNN, generated (the image  # [H, W, 3] uint8), meta

Axis order of every map: the image tokens "patch(r,c)" row by row (span "image"), then the text
tokens (span "text": "[CLS]", the words, "[SEP]", then "[PAD]"s; sub-spans "prompt" for [CLS] ..
[SEP] and "padding").  `Output.recorded_steps[i]` is the sampling step of index i of the T arrays,
`Output.timesteps[i]` its scheduler timestep (1000 = pure noise).
"""
from __future__ import annotations

import numpy as np

from core.errors import CorruptEntry
from core.types import Capture


def steps_name(layer: int) -> str:
    return f"T{layer:03d}"


IMAGE_NAME = "generated"


def is_dit(capture: Capture) -> bool:
    return capture.meta.modality == "dit"


def generated_image(capture: Capture) -> np.ndarray | None:
    """image  # [H, W, 3] uint8 that the run sampled, or None."""
    if capture.store is None:
        return None
    try:
        return np.asarray(capture.store.get_array(capture.key, IMAGE_NAME))
    except CorruptEntry:
        return None


def n_steps(capture: Capture) -> int:
    return len(capture.output.recorded_steps)


def step_attention(capture: Capture, index: int, layer: int) -> np.ndarray:
    """attn  # [head, query, key] float16 of `layer` at recorded step index `index` (0 .. n_steps-1)."""
    if not 0 <= index < n_steps(capture):
        raise IndexError(f"step index {index} out of range 0..{n_steps(capture) - 1}")
    stored = capture.store.get_array(capture.key, steps_name(layer))
    return np.asarray(stored[index])


def all_steps(capture: Capture, layer: int) -> np.ndarray:
    """attn  # [step, head, query, key] float16 of one layer (a memory map)."""
    return capture.store.get_array(capture.key, steps_name(layer))


def image_to_text(capture: Capture, index: int | None = None) -> np.ndarray:
    """a  # [step, layer, head, image, text] float32: image-token queries over text-token keys, every
    layer; index None = every recorded step, else that one step (step axis of length 1)."""
    image, text = capture.spans["image"], capture.spans["text"]
    steps = range(n_steps(capture)) if index is None else [index]
    out = np.empty((len(steps), capture.meta.n_layers, capture.meta.n_heads, len(image), len(text)), np.float32)
    for layer in range(capture.meta.n_layers):
        stored = all_steps(capture, layer)
        for i, s in enumerate(steps):
            out[i, layer] = stored[s][:, image.start:image.stop, text.start:text.stop]
    return out


def text_tokens(capture: Capture) -> list[str]:
    text = capture.spans["text"]
    return capture.tokens[text.start:text.stop]


__all__ = ["steps_name", "IMAGE_NAME", "is_dit", "generated_image", "n_steps", "step_attention", "all_steps",
           "image_to_text", "text_tokens"]
