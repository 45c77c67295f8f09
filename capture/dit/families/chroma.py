"""Chroma (lodestones' Chroma1, from FLUX.1-schnell): the family.

`ChromaTransformer2DModel` is Flux's transformer with its modulation computed by a small approximator
network instead of per-block projections: the same double- and single-stream blocks and the same
`FluxAttention` modules, so HeadScope records and edits them with capture.dit.families.flux's
processor, double-stream layers first.  The text is T5's alone (512 tokens), first in the joint
sequence; the pipeline masks T5's padding but one token, with a 0 / 1 mask that the attention adds to
its logits (as diffusers computes it: the recorded maps are the model's).

Sampling: real classifier-free guidance as a second transformer call per step, the conditional call
first, then the negative prompt's (`separate_cfg`); HeadScope records the conditional call.
"""
from __future__ import annotations

from capture.dit.families import Family

FAMILY = Family(name="chroma", transformer="ChromaTransformer2DModel",
                pipelines=("ChromaPipeline",),
                text_first=True, cfg=False, separate_cfg=True, joint_mask=True,
                encoders=(("t5", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * 2,  # the 2 x 2 packing of latents, as Flux
                max_side=lambda pipe, default: 2 * default)

__all__ = ["FAMILY"]
