"""Qwen-Image: HeadScope's processor for its double-stream blocks, and the family.

`QwenImageTransformer2DModel` (Qwen team 2025, "Qwen-Image Technical Report") is an MM-DiT of 60
double-stream blocks: joint attention over [text tokens, image tokens] with separate projections per
stream, RMS-normed q and k, and rotary position embeddings on both streams (MSRoPE: the text continues
the image's diagonal), so the recorded maps are softmax(rot(q) rot(k)ᵀ / √d), as the model computes
them.  Each block is one "joint" layer.

`QwenProcessor` is `QwenDoubleStreamAttnProcessor2_0` step for step and calls the same
`dispatch_attention_fn` when nothing is edited, so images are bit-identical (the CPU's one-pass
recording of a one-row call aside: capture.dit.attend).

Text: Qwen2.5-VL's last hidden states of a chat template around the prompt; the pipeline drops the
template's first `prompt_template_encode_start_idx` tokens (its system prompt and "<|im_start|>user\\n")
and keeps the rest unpadded: the prompt's tokens and the template's closing "<|im_end|>\\n<|im_start|>
assistant\\n" (`select`, `read_ids`).

Sampling: real classifier-free guidance as a second transformer call per step, the conditional call
first, and only with a negative prompt: HeadScope passes the model card's `negative_prompt=" "` at the
pipeline's `true_cfg_scale` (4 by default) and records the conditional call.
"""
from __future__ import annotations

import torch

from capture.dit.attend import Attend, Frame
from capture.dit.families import Family


class QwenProcessor:
    """QwenDoubleStreamAttnProcessor2_0 with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int):
        self.attend = Attend(layer, "joint", n_heads)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("Qwen-Image's attention takes a text stream and builds its own mask")
        if encoder_hidden_states_mask is not None:  # [batch, text] bool -> [batch, 1, 1, text + image]
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        n_text = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))  # [batch, image, head, head_dim]
        img_key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))  # [batch, text, head, dim]
        txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        query = torch.cat([txt_query, img_query], dim=1)  # [batch, text + image, head, head_dim]
        key = torch.cat([txt_key, img_key], dim=1)
        value = torch.cat([txt_value, img_value], dim=1)

        def plain() -> torch.Tensor:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
            return out.flatten(2, 3)

        hidden = self.attend(Frame(), query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             attention_mask, head_dim ** -0.5, plain)  # [batch, text + image, head * head_dim]
        img_out = attn.to_out[0](hidden[:, n_text:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(hidden[:, :n_text].contiguous())

    # diffusers' dispatcher reads these from the processor (None: the default attention backend)
    _attention_backend = None
    _parallel_config = None


def _drop(pipe) -> int:
    return int(pipe.prompt_template_encode_start_idx)


def _read_ids(pipe, prompt: str) -> list[int]:
    """The ids of the text positions the transformer reads for `prompt` (module docstring)."""
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt), truncation=True,
                         max_length=int(pipe.tokenizer_max_length) + _drop(pipe))["input_ids"]
    return list(ids[_drop(pipe):])


FAMILY = Family(name="qwenimage", transformer="QwenImageTransformer2DModel",
                pipelines=("QwenImagePipeline",),
                text_first=True, cfg=False,
                separate_cfg=True, guidance_arg="true_cfg_scale",
                encoders=(("qwen", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * 2,  # the 2 x 2 packing of latents, as Flux
                max_side=lambda pipe, default: 2 * default,
                call_kwargs={"negative_prompt": " "},
                select=lambda ids, pipe, call: ids[_drop(pipe):], read_ids=_read_ids)

__all__ = ["FAMILY", "QwenProcessor"]
