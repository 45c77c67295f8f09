"""Lumina-Image 2.0: HeadScope's processor for its layers, and the family.

`Lumina2Transformer2DModel` (Qin et al. 2025, "Lumina-Image 2.0: A Unified and Efficient Image Generative
Framework"; the Unified Next-DiT) refines its two streams apart before it joins them:

- `noise_refiner`: self-attention over the image tokens alone;
- `context_refiner`: self-attention over the caption alone (Gemma's padded states, the padding masked);
- `layers`: self-attention over [caption, image] - the caption cut to its unpadded length (the count of its
  mask), so the joint sequence holds no padding - with RMS-normed q and k, 3-axis rotary embeddings on both
  (the caption's positions along the first axis, the image's rows and columns on the other two) and grouped
  query attention (`num_kv_heads` key / value heads, repeated for the query heads).

HeadScope's layers are all of them, in that order (the capture's notes say which is which): the image refiners
are "self" layers on the image's part of the token axis, the caption refiners on the text's, their maps cut to
the caption's unpadded tokens (the padding beyond is masked: no weight reaches it, and its rows are dropped by
the model), the joint layers "joint" (text first).  Every map is softmax(rot(q) rot(k)ᵀ / √d) over the very
tokens the model attends to, every query head's (capture.dit.attend.part_frame).  `Lumina2Processor` is
`Lumina2AttnProcessor2_0` step for step, with the same `F.scaled_dot_product_attention` call when nothing is
edited.

Text: the pipeline prefixes the prompt with its system prompt and " <Prompt Start> " (`pipe.system_prompt`),
pads Gemma 2's tokens to `max_sequence_length` (256) and reads the second-to-last hidden states; the transformer
reads the unpadded ones (`read_text`, `read_ids`).  The system prompt is a "system" span on the token axis: the
model attends to it, the word maps leave it out.

Sampling: classifier-free guidance as a second transformer call per step for the empty negative prompt (its text:
one token), the conditional call first (recorded); the pipeline then rescales the guided prediction to the
conditional one's norm (`cfg_normalization`, on by default), so SoftPAG's perturbed term is rescaled with it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from capture.dit.attend import Attend, part_frame
from capture.dit.families import Family, refined, unpadded

MARKER = " <Prompt Start> "  # what the pipeline puts between its system prompt and the prompt


class Lumina2Processor:
    """Lumina2AttnProcessor2_0 with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int, part: str | None = None):
        self.attend = Attend(layer, "joint" if part is None else "self", n_heads)
        self.part = part  # a refiner's part of the token axis, "caption" or "image" (capture.dit.attend.part_frame)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                 base_sequence_length: int | None = None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        batch, n, _ = hidden_states.shape
        query = attn.to_q(hidden_states)  # [batch, n, head * head_dim]
        key = attn.to_k(encoder_hidden_states)  # [batch, n, kv_head * head_dim]
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        dtype = query.dtype
        query = query.view(batch, -1, attn.heads, head_dim)  # [batch, n, head, head_dim]
        key = key.view(batch, -1, kv_heads, head_dim)  # [batch, n, kv_head, head_dim]
        value = value.view(batch, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:  # proportional attention, as diffusers' processor
            scale = math.sqrt(math.log(n, base_sequence_length)) * attn.scale
        repeat = attn.heads // kv_heads  # grouped-query attention: each key / value head serves `repeat` queries
        key = key.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)  # [batch, n, head, head_dim]
        value = value.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
        if attention_mask is not None:  # [batch, n] -> [batch, 1, 1, n] bool
            attention_mask = attention_mask.bool().view(batch, 1, 1, -1)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [batch, head, n, dim]

        def plain() -> torch.Tensor:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)
            return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)

        hidden = self.attend(part_frame(self.part), query, key, value, attention_mask, scale,
                             plain)  # [batch, n, head * head_dim]
        hidden = hidden.type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden))


def _prefix(pipe) -> str:
    return f"{pipe.system_prompt}{MARKER}"


def _read_ids(pipe, prompt: str) -> list[int]:
    """The ids of the text positions the transformer's joint layers read for `prompt`: unpadded."""
    return list(pipe.tokenizer(_prefix(pipe) + prompt, max_length=256, truncation=True)["input_ids"])


def _preamble(pipe, ids: list[int]) -> int:
    """How many of `ids` are the system prompt and its marker: the first ids that decode to the prefix (the
    marker's trailing space may go with the prompt's first word, or with the marker's last token); 0 where
    no run of them does (a template of another pipeline version: every token is then a word column)."""
    marker = _prefix(pipe).rstrip()
    for count in range(1, len(ids) + 1):
        text = pipe.tokenizer.decode(ids[:count], skip_special_tokens=True).rstrip()
        if len(text) >= len(marker):
            return count if text == marker else 0
    return 0


FAMILY = Family(name="lumina2", transformer="Lumina2Transformer2DModel",
                pipelines=("Lumina2Pipeline",),
                text_first=True, cfg=False, separate_cfg=True,
                encoders=(("gemma", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * int(pipe.transformer.config.patch_size),
                max_side=lambda pipe, default: 2 * default,
                select=unpadded, read_ids=_read_ids, preamble=_preamble,
                read_text=lambda _args, kwargs: int(kwargs["encoder_attention_mask"][0].sum()),
                note=lambda pipe: refined("Lumina 2", pipe.transformer.config.num_refiner_layers,
                                          pipe.transformer.config.num_layers))

__all__ = ["FAMILY", "Lumina2Processor"]
