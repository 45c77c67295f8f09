"""AuraFlow: HeadScope's processor for its joint and single blocks, and the family.

`AuraFlowTransformer2DModel` (fal 2024, AuraFlow v0.1-0.3) runs MM-DiT blocks (joint attention over
[text tokens, image tokens], separate projections per stream) and then single blocks (one attention over
the same [text, image] sequence), LayerNorm-ed q and k, a learned position embedding on the image (no
rotary embedding); the recorded maps are softmax(q kᵀ · scale).  All are "joint" layers, MM-DiT first.
`AuraProcessor` is `AuraFlowAttnProcessor2_0` step for step (the same `F.scaled_dot_product_attention`
call when nothing is edited).

Text: the transformer puts 8 learned register tokens before the 256 T5 (UMT5) states the pipeline gives it
(`extra_text`: labelled "<register i>", a segment of their own, no words); the pipeline zeroes the padding's
states but the attention does not mask them.

Sampling: classifier-free guidance as [unconditional, conditional] batch rows (the conditional recorded).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from capture.dit.attend import Attend, Frame
from capture.dit.families import Family


class AuraProcessor:
    """AuraFlowAttnProcessor2_0 with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int):
        self.attend = Attend(layer, "joint", n_heads)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args, **kwargs):
        batch = hidden_states.shape[0]
        head_dim = attn.to_k.out_features // attn.heads
        query = attn.to_q(hidden_states).view(batch, -1, attn.heads, head_dim)  # [batch, image, head, head_dim]
        key = attn.to_k(hidden_states).view(batch, -1, attn.heads, head_dim)
        value = attn.to_v(hidden_states).view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:  # an MM-DiT block: the text stream's projections go first
            text_query = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            text_key = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            text_value = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [batch, head, n, d]

        def plain() -> torch.Tensor:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, scale=attn.scale, is_causal=False)
            return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)

        hidden = self.attend(Frame(), query, key, value, None, attn.scale, plain)  # [batch, n, head * head_dim]
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](hidden))
        n_text = encoder_hidden_states.shape[1]
        image_out = attn.to_out[1](attn.to_out[0](hidden[:, n_text:]))
        return image_out, attn.to_add_out(hidden[:, :n_text])


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

__all__ = ["AuraProcessor", "FAMILY"]
