"""Z-Image: HeadScope's processor for its layers, and the family.

`ZImageTransformer2DModel` (Tongyi-MAI 2025, "Z-Image: An Efficient Image Generation Foundation Model with
Single-Stream Diffusion Transformer"; S3-DiT) refines its two streams apart before it joins them, as Lumina 2
does (capture.dit.families.lumina2):

- `noise_refiner`: self-attention over the image tokens alone;
- `context_refiner`: self-attention over the caption alone;
- `layers`: one stream, self-attention over [image, caption] with RMS-normed q and k and 3-axis rotary
  embeddings (the caption's positions first, then the image's frame, rows and columns).

Inside the transformer each part is padded to a multiple of 32 tokens with a learned state of its own
(`x_pad_token`, `cap_pad_token`), unmasked: the caption's padding run is a "padding" span at the end of the
text (`pad_to`), and a picture whose patch count is no multiple of 32 is refused (`image_multiple`), as its
padding would sit between the patches and the words.

HeadScope's layers are all of them, in that order (the capture's notes say which is which): the refiners are
"self" layers on the image's and the caption's part of the token axis (capture.dit.attend.part_frame), the joint
layers "joint" (image first).  `ZImageProcessor` is `ZSingleStreamAttnProcessor` step for step and calls the
same `dispatch_attention_fn` when nothing is edited.

Text: Qwen3's second-to-last hidden states of its chat template around the prompt (thinking on: no thinking
tags), padded to `max_sequence_length` (512); the pipeline hands the transformer the unpadded states
(`select`, `read_ids`).

Sampling: classifier-free guidance as batch rows, the conditional first (`cond_first`): [prompt, ""], each
caption padded to its own multiple of 32, the shorter row masked at the end; the recorded conditional row is
never the shorter (the same template around a longer text).  The pipeline guides as c + g (c - u), g = 5 by
default and no guidance at g = 0 (`cfg_from`, `cond_weight`); Z-Image-Turbo's model card samples at g = 0 and 9
steps: a run asks for them with RunSpec(guidance=0, steps=9) (the sidebar, a link, `--guidance 0 --steps 9`).
"""
from __future__ import annotations

import torch

from capture.dit.attend import Attend, part_frame
from capture.dit.families import Family, refined, unpadded

MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: the transformer pads the image and the caption each to a multiple of it


class ZImageProcessor:
    """ZSingleStreamAttnProcessor with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int, part: str | None = None):
        self.attend = Attend(layer, "joint" if part is None else "self", n_heads)
        self.part = part  # a refiner's part of the token axis, "caption" or "image" (capture.dit.attend.part_frame)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [batch, n, head, head_dim]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotated(query, freqs_cis), _rotated(key, freqs_cis)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:  # [batch, n] -> [batch, 1, 1, n]
            attention_mask = attention_mask[:, None, None, :]

        def plain() -> torch.Tensor:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
            return out.flatten(2, 3)

        hidden = self.attend(part_frame(self.part), query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             attention_mask, query.shape[-1] ** -0.5, plain)  # [batch, n, head * head_dim]
        output = attn.to_out[0](hidden.to(dtype))
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output

    # diffusers' dispatcher reads these from the processor (None: the default attention backend)
    _attention_backend = None
    _parallel_config = None


def _rotated(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding of x  # [batch, n, head, head_dim] by freqs_cis  # [batch, n, head_dim / 2]
    complex, in float32, as ZSingleStreamAttnProcessor does."""
    with torch.amp.autocast("cuda", enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def _read_ids(pipe, prompt: str) -> list[int]:
    """The ids of the caption the joint layers read for `prompt`, its padding to a multiple of 32 included."""
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    ids = list(pipe.tokenizer(text, max_length=512, truncation=True)["input_ids"])  # the pipeline's default length
    return ids + [pipe.tokenizer.pad_token_id] * ((-len(ids)) % MULTIPLE)


def _caption_length(args: tuple, kwargs: dict) -> int:
    """The conditional row's caption as the joint layers read it: padded to a multiple of 32."""
    captions = kwargs.get("cap_feats", args[2] if len(args) > 2 else None)  # one [tokens, dim] tensor per row
    return -(-len(captions[0]) // MULTIPLE) * MULTIPLE


FAMILY = Family(name="zimage", transformer="ZImageTransformer2DModel",
                pipelines=("ZImagePipeline",),
                text_first=False, cfg=True, cond_first=True, cfg_from=0.0, cond_weight=lambda g: 1.0 + g,
                encoders=(("qwen3", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * 2,  # 2 x 2 patches of latents
                max_side=lambda pipe, default: 2 * default,
                select=unpadded, read_ids=_read_ids, read_text=_caption_length,
                pad_to=MULTIPLE, image_multiple=MULTIPLE, default_side=1024,  # the pipeline's default height
                note=lambda pipe: refined("Z-Image", pipe.transformer.config.n_refiner_layers,
                                          pipe.transformer.config.n_layers))

__all__ = ["FAMILY", "ZImageProcessor"]
