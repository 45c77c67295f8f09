"""Sana: HeadScope's processor for its linear self-attention, the map it implies, and the family.

`SanaTransformer2DModel` (Xie et al. 2024, "SANA: Efficient High-Resolution Image Synthesis with Linear
Diffusion Transformers") replaces softmax self-attention by ReLU linear attention: with φ = ReLU,

    out_i = Σ_j (φ(q_i)·φ(k_j)) v_j / (Σ_j φ(q_i)·φ(k_j) + 1e-15)

computed as (V φ(K)ᵀ) φ(q_i) so that no n x n matrix is ever formed. The map HeadScope records for it is
the one this output implies (capture.dit.attend.linear_map), A_ij = φ(q_i)·φ(k_j) / (Σ_j' φ(q_i)·φ(k_j')
+ 1e-15), so that out_i = Σ_j A_ij v_j exactly as the model computes it (up to the float rounding of the
other association order). Rows sum to 1, except a row whose φ(q_i) is all zeros in a head (every
component of q_i negative): the model gives that token a zero output there, and its row of the map is
all zeros too. Unlike softmax there are no logits, so `logit` and `window` edits do not apply; `mix` and
`redistribute` act on A (materialised block by block, only when an edit asks for it) and `scale` on the
head outputs.

The cross-attention (image queries, Gemma text keys, softmax, its own head count) is recorded as the
layer's "cross" maps: the word maps.  Sana's text encoder is Gemma 2, which the pipeline feeds a long
"complex human instruction" before the prompt and then keeps the first token and the last
`max_sequence_length` - 1 (`select`): the labels are those of the kept tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from capture.dit.attend import LINEAR_EPSILON, Attend, Frame
from capture.dit.families import Family

class SanaLinearProcessor:
    """SanaLinearAttnProcessor2_0 with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int, routed: bool):
        self.attend = Attend(layer, "self", n_heads, routed)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        original_dtype = hidden_states.dtype
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))  # [batch, head, head_dim, n]
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)  # [batch, head, n, head_dim]
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))  # [batch, head, head_dim, n]
        query = F.relu(query)
        key = F.relu(key)
        query, key, value = query.float(), key.float(), value.float()

        def plain() -> torch.Tensor:
            padded = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
            scores = torch.matmul(padded, key)
            hidden = torch.matmul(scores, query)
            hidden = hidden[:, :, :-1] / (hidden[:, :, -1:] + LINEAR_EPSILON)
            return hidden.flatten(1, 2).transpose(1, 2)

        hidden_states = self.attend(Frame(), query.transpose(2, 3), key, value.transpose(2, 3), None, 1.0, plain,
                                    kernel="linear")
        hidden_states = hidden_states.to(original_dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


def _select(ids: list[int], pipe, call: dict) -> list[int]:
    """The pipeline's `select_index`: the first token and the last max_sequence_length - 1."""
    length = int(call["max_sequence_length"])
    return [ids[0]] + list(ids[len(ids) - length + 1:])


FAMILY = Family(name="sana", transformer="SanaTransformer2DModel",
                pipelines=("SanaPipeline",),
                text_first=False, cfg=True, masks_padding=True,
                encoders=(("gemma", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * int(pipe.transformer.config.patch_size),
                max_side=lambda pipe, default: 4 * default,  # Sana samples up to 4K
                call_kwargs={"clean_caption": False, "use_resolution_binning": False}, select=_select)

__all__ = ["FAMILY", "SanaLinearProcessor"]
