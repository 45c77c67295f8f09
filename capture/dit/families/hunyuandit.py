"""HunyuanDiT: the family.

`HunyuanDiT2DModel` (Tencent 2024, "Hunyuan-DiT: A Powerful Multi-Resolution Diffusion Transformer with
Fine-Grained Chinese Understanding") runs, in each of its 40 blocks (long skip connections joining the
second half to the first), an image self-attention with rotary position embeddings on q and k and a
cross-attention from the image to the text whose queries (only) are rotated, q and k LayerNorm-ed in both.
The processors are capture.dit.attention.HeadScopeProcessor's (`HunyuanAttnProcessor2_0` step for step):
each block's self-attention is a "self" layer over the image tokens, its cross-attention recorded with it
as the word maps.

Text: the transformer joins two encoders' states into one text axis for the cross-attention: a bilingual
CLIP text encoder (a BERT, 77 tokens) and mT5 (256 tokens), in that order (`text_inputs`); the padding of
each is replaced by a learned padding state, not masked, so the maps cover it (`lengths`: the pipeline's
fixed 77 and 256).

Sampling: classifier-free guidance as [unconditional, conditional] batch rows (the conditional recorded); no
resolution binning (`use_resolution_binning=False`), so a picture is sampled at the size asked for.  The
pipeline assumes a VAE of 8 pixels a latent: the picture side is a multiple of 16 px.
"""
from __future__ import annotations

from capture.dit.families import Family


def _unit(pipe) -> int:
    return pipe.vae_scale_factor * int(pipe.transformer.config.patch_size)


FAMILY = Family(name="hunyuandit", transformer="HunyuanDiT2DModel",
                pipelines=("HunyuanDiTPipeline",),
                text_first=False, cfg=True,
                encoders=(("bert", "text_encoder", "tokenizer"), ("t5", "text_encoder_2", "tokenizer_2")),
                text_inputs=("encoder_hidden_states", "encoder_hidden_states_t5"), lengths={"bert": 77, "t5": 256},
                unit_of=_unit, max_side=lambda pipe, default: 2 * default,
                call_kwargs={"use_resolution_binning": False})

__all__ = ["FAMILY"]
