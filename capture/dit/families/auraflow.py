"""AuraFlow: the family.

`AuraFlowTransformer2DModel` (fal 2024, AuraFlow v0.1-0.3) runs MM-DiT blocks (joint attention over
[text tokens, image tokens], separate projections per stream) and then single blocks (one attention over
the same [text, image] sequence), LayerNorm-ed q and k, a learned position embedding on the image (no
rotary embedding); the recorded maps are softmax(q kᵀ · scale).  All are "joint" layers, MM-DiT first,
driven by capture.dit.attention.HeadScopeProcessor with `text_first` (`AuraFlowAttnProcessor2_0` is SD3's
joint processor with the text first).

Text: the transformer puts 8 learned register tokens before the 256 T5 (UMT5) states the pipeline gives it
(`extra_text`: labelled "<register i>", a segment of their own, no words); the pipeline zeroes the padding's
states but the attention does not mask them.

Sampling: classifier-free guidance as [unconditional, conditional] batch rows (the conditional recorded).
"""
from __future__ import annotations

import math

from capture.dit.families import Family


def _unit(pipe) -> int:
    return pipe.vae_scale_factor * int(pipe.transformer.config.patch_size)


def _max_side(pipe, default: int) -> int:
    """The side of the learned position embedding's square grid (`pos_embed_max_size` patches in all)."""
    return math.isqrt(int(pipe.transformer.config.pos_embed_max_size)) * _unit(pipe)


def _registers(pipe) -> list[str]:
    return [f"<register {i}>" for i in range(pipe.transformer.register_tokens.shape[1])]


FAMILY = Family(name="auraflow", transformer="AuraFlowTransformer2DModel",
                pipelines=("AuraFlowPipeline",),
                text_first=True, cfg=True,
                encoders=(("t5", "text_encoder", "tokenizer"),),
                extra_text=_registers, unit_of=_unit, max_side=_max_side)

__all__ = ["FAMILY"]
