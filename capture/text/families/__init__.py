"""Per-family attention forwards, for the models whose attention does not go through transformers'
attention interface (their modules compute softmax attention inline, so "headscope" cannot be set as
their implementation): Falcon and BLOOM, both with ALiBi (Press et al. 2022, "Train Short, Test Long").

Each family module gives `forward`, bound to every attention module of its class in place of the
model's own, which computes queries, keys and values exactly as the model does and hands them to
capture.engine.attention.headscope_attention with the ALiBi bias; and `native`, the model's own
attention arithmetic, which that function runs when nothing is recorded or edited (generation stays
bit-identical to the plain model).  The tests hold the maps against eager `output_attentions`.
"""
from __future__ import annotations

import types

from capture.text.families import bloom, falcon

FAMILIES = {"FalconAttention": falcon, "BloomAttention": bloom}


def install(model) -> int:
    """Bind HeadScope's forward to every attention module of a family listed in FAMILIES; returns how many."""
    count = 0
    for module in model.modules():
        family = FAMILIES.get(type(module).__name__)
        if family is not None:
            family.check(module)
            module.forward = types.MethodType(family.forward, module)
            module.headscope_native = family.native
            count += 1
    return count
