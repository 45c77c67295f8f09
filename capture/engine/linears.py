"""oneDNN-packed linear layers for the recorded passes (issue 2: a capture within eager's time).

torch runs a float32 `nn.Linear` on the CPU through MKL's sgemm, which lays the weight out for its
kernel again on every call.  oneDNN can take the weight laid out once, ahead of time: the path
torch.compile's CPU backend takes for frozen weights (`torch.ops.mkldnn._reorder_linear_weight`,
then `_linear_pointwise`).  On this 2-core AVX-512 machine SmolLM2's shapes run 10-25% faster that
way at every row count measured (1 to 2,048 rows), its lm_head on one row twice as fast, and a
128-token recorded pass about 15% faster (bench/capture.py).

The numbers differ from torch's by float32 rounding only (another order of summation: ~1e-4 on
outputs of size ~20).  So the recorded passes use it, whose maps are compared with eager's to a
float tolerance, but generation does not: an empty intervention must give plain `generate`'s tokens
bit for bit, and a near tie could flip.

The packed copy costs memory, one more copy of the linear weights (SmolLM2: about 540 MB with its
tied lm_head), made on a model's first recorded pass in ~0.2 s and kept with the model.  A model is
packed only if that copy fits in PACKED_SHARE of the capture memory budget and HEADSCOPE_PACKED_MB
(default 2,048); HEADSCOPE_PACKED=0 turns it off.  Backward passes (gradient head importance) and
anything not float32 on the CPU take torch's own path.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Iterator

import torch
from torch import nn

from capture.engine import memory

PACKED_SHARE = 0.25  # of capture.engine.memory.available_bytes(): the most a packed copy may take
DEFAULT_MB = 2048
ROWS_HINT = 128  # the row count oneDNN lays the weight out for (measured: 1 to 2,048 rows run as fast)

# model -> {linear: (packed weight, the weight's version when packed)}, or {} when it is not packed
_packed: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def supported() -> bool:
    """True where torch has oneDNN's packed linear (CPU builds with MKLDNN) and it is not turned off."""
    return (os.environ.get("HEADSCOPE_PACKED", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def budget_bytes() -> int:
    """The most memory a model's packed copy may take."""
    try:
        configured = int(float(os.environ.get("HEADSCOPE_PACKED_MB", DEFAULT_MB)) * 2**20)
    except ValueError:
        configured = DEFAULT_MB * 2**20
    return min(configured, int(memory.available_bytes() * PACKED_SHARE))


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
            and m.weight.device.type == "cpu"]


def bytes_to_pack(model: nn.Module) -> int:
    """Memory the model's next recorded pass will take for packing (0 once packed, or if it will not be)."""
    if model in _packed or not supported():
        return 0
    need = sum(m.weight.numel() * 4 for m in _linears(model))
    return need if need <= budget_bytes() else 0


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the model's packed copy (0 before its first recorded pass, or when it is not packed)."""
    return sum(weight.numel() * weight.element_size() for weight, _version in _packed.get(model, {}).values())


def _layout(module: nn.Linear) -> tuple[torch.Tensor, int]:
    """(the weight laid out for oneDNN, the weight's version it was laid out from)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), ROWS_HINT), module.weight._version


def _pack(model: nn.Module) -> dict:
    """The model's packed linears, packed on first use (or {} when not supported or over budget)."""
    if not supported():
        return {}
    if model not in _packed:
        _packed[model] = {m: _layout(m) for m in _linears(model)} if bytes_to_pack(model) else {}
    packs = _packed[model]
    for module, (_weight, version) in list(packs.items()):
        if module.weight._version != version:  # edited in place since: lay it out again
            packs[module] = _layout(module)
    return packs


def _packed_forward(module: nn.Linear, packs: dict):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return nn.Linear.forward(module, x)
        return torch.ops.mkldnn._linear_pointwise(x, packs[module][0], module.bias, "none", [], "")
    return forward


@contextlib.contextmanager
def packed(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's float32 linear layers run on oneDNN with packed weights.

    Call it with the model's handle lock held (capture.api does): the layers' `forward` is swapped
    on the module instances, so every forward of this model in the block takes the packed path.
    Hooks still run (the module's __call__ is unchanged)."""
    packs = _pack(model)
    for module in packs:
        module.forward = _packed_forward(module, packs)
    try:
        yield
    finally:
        for module in packs:
            del module.forward
