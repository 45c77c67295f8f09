"""A VLM's vision tower's own attention maps, on one view of the picture.

Each family names the view (`Family.tower` -> `TowerView`: the tower module, that view's pixels and its
index in the batch of views the tower runs on inside the model's forward).  The maps are
[layer, head, token, token] float16: the tower's prefix tokens (CLS) first, then the patches row-major.
Interventions act on the language model only, so these maps are the same with or without one.

Two ways to the same maps:
- `TowerView.recording()`, around the capture's recorded pass: the tower already runs there (SDPA), on
  every view; its attention function (`tower_attention`, registered with transformers as
  "headscope_tower" and set on the tower once, only where the tower ran SDPA, directly or through
  HeadScope's "headscope") computes each layer's output with that same function, exactly as before, and, while a recording is open, also the softmax weights of the
  one view, as eager attention computes them (scores in the tower's dtype, softmax in float32).  The
  tower does not run a second time, and the other views' weights are never materialised.
- `TowerView.maps()`: the tower run once more, alone on the view, with eager attention and
  `output_attentions` (the fallback: a tower that does not run SDPA, or a pass that did not reach it).
DINOv2-S at 112 px: 12 x 6 maps of 65 x 65.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from capture.engine.device import to_host

IMPLEMENTATION = "headscope_tower"
_SLOT = "_headscope_tower_slot"  # instance-dict attribute of each tower submodule -> its _Slot


class _Slot:
    """The recording (if any) a tower's attention layers append to; one per tower."""
    __slots__ = ("layers", "pick", "native")

    def __init__(self, native):
        self.native = native  # the attention function the tower ran before (SDPA, or HeadScope's passing it on)
        self.layers: list[torch.Tensor] | None = None  # per layer [head, token, token] float16 while recording
        self.pick = 0


def tower_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function of a tower: the output of the function it ran before (SDPA); while
    its tower records, also the picked view's eager softmax weights (query, key  # [view, head, token, head_dim])."""
    slot = module.__dict__[_SLOT]
    out, _ = slot.native(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if slot.layers is not None:
        pick = slot.pick
        q, k = query[pick], key[pick]  # [head, token, head_dim]
        if k.shape[0] != q.shape[0]:
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        weights = torch.matmul(q, k.transpose(-1, -2)) * scale
        if attention_mask is not None:
            mask = attention_mask[pick if attention_mask.shape[0] > 1 else 0]
            weights = weights.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else weights + mask
        slot.layers.append(torch.softmax(weights, dim=-1, dtype=torch.float32).to(torch.float16))
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, tower_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _slot(tower) -> _Slot | None:
    """The tower's recording slot, installing "headscope_tower" on first use; None where the tower does not
    run SDPA, directly or through HeadScope's "headscope" (which passes a tower's layers on to their SDPA):
    its outputs would change."""
    slot = tower.__dict__.get(_SLOT)
    if slot is not None:
        return slot if tower.config._attn_implementation == IMPLEMENTATION else None
    previous = tower.config._attn_implementation
    if previous not in ("sdpa", "headscope"):  # both build their masks with transformers' sdpa_mask, as ours
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _register()
    slot = _Slot(ALL_ATTENTION_FUNCTIONS[previous])
    tower.set_attn_implementation(IMPLEMENTATION)
    for module in tower.modules():
        module.__dict__[_SLOT] = slot
    return slot


def _patch(tower) -> int:
    patch = tower.config.patch_size
    return patch if isinstance(patch, int) else patch[0]


@dataclass
class TowerView:
    """One view of the picture through a VLM's tower: the module, the view's pixels  # [1, 3, height, width]
    and its index among the views the tower runs on in the model's forward."""
    module: torch.nn.Module
    pixels: torch.Tensor
    pick: int = 0

    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the pixels the tower ran on, not the config's image_size (a DINOv2 config says
        518 px; shapes-vlm feeds it 112)."""
        height, width = self.pixels.shape[-2:]
        return height // _patch(self.module), width // _patch(self.module)

    def maps(self) -> np.ndarray:
        """maps  # [layer, head, token, token] float16: the tower run alone on the view, eager."""
        return tower_maps(self.module, self.pixels)[0]

    @contextlib.contextmanager
    def recording(self) -> Iterator[list]:
        """Records the view's maps while the model's own forward runs the tower; yields a list that holds
        them  # [layer, head, token, token] float16 after the block (empty where the tower could not
        record: then `maps()`)."""
        result: list[np.ndarray] = []
        slot = _slot(self.module)
        if slot is None:
            yield result
            return
        slot.layers, slot.pick = [], self.pick
        try:
            yield result
            layers = slot.layers
        finally:
            slot.layers = None
        if layers and len(layers) == getattr(self.module.config, "num_hidden_layers", len(layers)):
            result.append(to_host(torch.stack(layers)))


def tower_maps(tower, pixel_values: torch.Tensor) -> tuple[np.ndarray, tuple[int, int]]:
    """(maps  # [layer, head, token, token] float16, (rows, cols)) of `tower` (a PreTrainedModel) run
    alone on `pixel_values` # [1, 3, height, width] (moved to its device, in its dtype) with eager attention
    and output_attentions."""
    inputs = {"pixel_values": pixel_values.to(device=tower.device, dtype=tower.dtype)}
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            maps = tower(**inputs, output_attentions=True).attentions  # per layer [1, head, token, token]
    finally:
        tower.set_attn_implementation(previous)
    return to_host(torch.stack([m[0] for m in maps]).to(torch.float16)), TowerView(tower, pixel_values).grid()


def patch_grid(vision_config) -> tuple[int, int]:
    """(rows, cols) of patches of a square tower input (image_size // patch_size a side)."""
    size = vision_config.image_size if isinstance(vision_config.image_size, int) else vision_config.image_size[0]
    patch = vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0]
    return size // patch, size // patch


__all__ = ["TowerView", "tower_maps", "patch_grid", "tower_attention"]
