"""Stable Diffusion 3 / 3.5 (MM-DiT): the family.

`SD3Transformer2DModel` (Esser et al. 2024) runs joint attention over [image tokens, text tokens]; the
text is CLIP-L and CLIP-G's token states side by side (one CLIP segment, `tokenizer_max_length`
tokens) followed by T5's (`max_sequence_length`, 256 by default; zeros when the pipeline has no T5).
SD3.5 adds a second, image-only self-attention to its first blocks (`dual_attention_layers`), which
HeadScope counts as a layer of its own right after its block's joint attention; its maps cover the
image tokens only.  The processors are capture.dit.attention.HeadScopeProcessor's.  Sampling: the
pipeline runs [unconditional, conditional] rows when its guidance scale is above 1 (the recorded row is
the conditional one).  The largest side is the positional embedding's (`pos_embed_max_size` patches).
"""
from __future__ import annotations

from capture.dit.families import Family


def _unit(pipe) -> int:
    return pipe.vae_scale_factor * int(pipe.transformer.config.patch_size)


def _max_side(pipe, default: int) -> int:
    patches = pipe.transformer.config.pos_embed_max_size
    return int(patches) * _unit(pipe) if patches else 2 * default


FAMILY = Family(name="sd3", transformer="SD3Transformer2DModel",
                pipelines=("StableDiffusion3Pipeline",),
                text_first=False, cfg=True,
                encoders=(("clip", "text_encoder", "tokenizer"), ("t5", "text_encoder_3", "tokenizer_3")),
                unit_of=_unit, max_side=_max_side,
                missing=lambda pipe, segment: int(pipe.tokenizer_max_length) if segment == "t5" else 0)

__all__ = ["FAMILY"]
