"""Flux (FLUX.1 dev / schnell): HeadScope's processor for its double- and single-stream blocks, and the family.

`FluxTransformer2DModel` (Black Forest Labs 2024) runs 19 double-stream blocks (joint attention over
[text tokens, image tokens], separate projections per stream, like SD3 but text first) and then 38
single-stream blocks (one attention over the same [text, image] sequence, no output projection of its
own: the head outputs go straight into `proj_out` together with the MLP branch).  Both are recorded and
edited as "joint" layers, double-stream first: layer l < 19 is double block l, layer 19 + j single
block j.  Rotary position embeddings are applied to q and k before attention, so the recorded maps are
softmax(rot(q) rot(k)ᵀ / √d), as the model computes them.

`FluxProcessor` is `diffusers.models.transformers.transformer_flux.FluxAttnProcessor` step for step and
calls the same `dispatch_attention_fn` when nothing is edited, so images are bit-identical; a `scale`
edit on a single-stream block acts on its head outputs before `proj_out`.

Sampling: guidance-distilled (the guidance scale is an input of the transformer, not a second branch):
one transformer row per step, recorded as row 0; no classifier-free guidance.
"""
from __future__ import annotations

import torch

from capture.dit.attend import Attend, Frame
from capture.dit.families import Family


class FluxProcessor:
    """FluxAttnProcessor with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int):
        self.attend = Attend(layer, "joint", n_heads)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))  # [batch, tokens, head, head_dim]
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        hidden_states = rotated_attention(self, attn, query, key, value, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    # diffusers' dispatcher reads these from the processor (None: the default attention backend)
    _attention_backend = None
    _parallel_config = None


def rotated_attention(processor, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, image_rotary_emb) -> torch.Tensor:
    """query, key, value  # [batch, tokens, head, head_dim], normed -> hidden  # [batch, tokens, head * head_dim]:
    the rotary embedding applied to q and k, then `processor.attend` (plain: diffusers' `dispatch_attention_fn`
    with the processor's backend), as FLUX.1's and FLUX.2's processors do."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

    def plain() -> torch.Tensor:
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                    backend=processor._attention_backend, parallel_config=processor._parallel_config)
        return out.flatten(2, 3)

    return processor.attend(Frame(), query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                            attention_mask, attn.head_dim ** -0.5, plain)


FAMILY = Family(name="flux", transformer="FluxTransformer2DModel",
                pipelines=("FluxPipeline",),
                text_first=True, cfg=False,
                encoders=(("t5", "text_encoder_2", "tokenizer_2"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * 2,  # 8 x the 2 x 2 packing of latents
                max_side=lambda pipe, default: 2 * default)

__all__ = ["FAMILY", "FluxProcessor", "rotated_attention"]
