"""PixArt-α / PixArt-Σ: the family.

`PixArtTransformer2DModel` (Chen et al. 2023, 2024) has, per block, an image self-attention and a
cross-attention from the image to T5's token states (120 tokens for α, 300 for Σ); the pipeline masks
the padding tokens out of the cross-attention.  HeadScope's layer l is block l: its self-attention
map (image tokens only) and its cross-attention maps (kind "cross": the word maps).  Edits whose keys
are text tokens act on the cross-attention, the others on the self-attention.  The processors are
capture.dit.attention.HeadScopeProcessor's.  Sampling: [unconditional, conditional] rows when the
guidance scale is above 1; no caption cleaning, no aspect-ratio binning.
"""
from __future__ import annotations

from capture.dit.families import Family

FAMILY = Family(name="pixart", transformer="PixArtTransformer2DModel",
                pipelines=("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
                text_first=False, cfg=True, masks_padding=True,
                encoders=(("t5", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * int(pipe.transformer.config.patch_size),
                max_side=lambda pipe, default: 2 * default,
                call_kwargs={"clean_caption": False, "use_resolution_binning": False})

__all__ = ["FAMILY"]
