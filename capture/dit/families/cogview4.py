"""CogView 4: HeadScope's processor for its joint attention, and the family.

`CogView4Transformer2DModel` (Zhipu AI 2025, CogView4-6B) runs joint attention over [text tokens, image
tokens] with one set of projections for both streams, LayerNorm-ed q and k, and rotary position embeddings on
the image tokens only; the recorded maps are softmax(rot(q) rot(k)ᵀ / √d), the text's q and k unrotated, as
the model computes them. Each block is one "joint" layer. `CogView4Processor` is `CogView4AttnProcessor` step
for step (the same `F.scaled_dot_product_attention` call when nothing is edited).

Text: GLM-4's second-to-last hidden states.  The pipeline pads the prompt's tokens on the left to a
multiple of 16 with the padding token, and the transformer reads the padding unmasked: the token axis
starts with that run (a padding span, as T5's trailing one is for Flux), then GLM's "[gMASK]<sop>" and the
prompt (`read_ids` says the length before the run).

Sampling: classifier-free guidance as a second transformer call per step for the empty negative prompt,
the conditional call first (recorded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from capture.dit.attend import Attend, Frame
from capture.dit.families import Family


class CogView4Processor:
    """CogView4AttnProcessor with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int):
        self.attend = Attend(layer, "joint", n_heads)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        from diffusers.models.embeddings import apply_rotary_emb

        dtype = encoder_hidden_states.dtype
        batch, n_text, _ = encoder_hidden_states.shape
        n_image = hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [batch, text + image, dim]
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)  # [batch, head, n, head_dim]
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:  # the image tokens only, in place as diffusers does
            query[:, :, n_text:, :] = apply_rotary_emb(query[:, :, n_text:, :], image_rotary_emb,
                                                      use_real_unbind_dim=-2)
            key[:, :, n_text:, :] = apply_rotary_emb(key[:, :, n_text:, :], image_rotary_emb, use_real_unbind_dim=-2)
        if attention_mask is not None:  # [batch, text] 0 / 1 -> [batch, 1, n, n] 0 / 1, added to the logits
            mix = torch.ones((batch, n_text + n_image), device=query.device)
            mix[:, :n_text] = attention_mask.float().to(query.device)
            mix = mix.unsqueeze(2)
            attention_mask = ((mix @ mix.transpose(1, 2)) > 0).unsqueeze(1).to(query.dtype)

        def plain() -> torch.Tensor:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
            return out.transpose(1, 2).flatten(2, 3)

        hidden = self.attend(Frame(), query, key, value, attention_mask, attn.scale, plain)  # [batch, n, head * dim]
        hidden = attn.to_out[1](attn.to_out[0](hidden.type_as(query)))
        encoder_hidden_states, hidden_states = hidden.split([n_text, hidden.size(1) - n_text], dim=1)
        return hidden_states, encoder_hidden_states


def _read_ids(pipe, prompt: str) -> list[int]:
    """The ids the transformer reads for `prompt`: GLM's, left-padded to a multiple of 16 (module docstring)."""
    ids = pipe.tokenizer(prompt, max_length=1024, truncation=True,  # the pipeline's max_sequence_length
                         add_special_tokens=True)["input_ids"]
    return [pipe.tokenizer.pad_token_id] * ((16 - len(ids) % 16) % 16) + list(ids)


FAMILY = Family(name="cogview4", transformer="CogView4Transformer2DModel",
                pipelines=("CogView4Pipeline",),
                text_first=True, cfg=False, separate_cfg=True, pads_left=True,
                encoders=(("glm", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * int(pipe.transformer.config.patch_size),
                max_side=lambda pipe, default: 2 * default, read_ids=_read_ids)

__all__ = ["CogView4Processor", "FAMILY"]
