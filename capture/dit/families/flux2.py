"""FLUX.2 [klein]: HeadScope's processor for its single-stream blocks, and the family.

`Flux2Transformer2DModel` (Black Forest Labs 2025) keeps FLUX.1's layout: double-stream blocks (joint
attention over [text tokens, image tokens], separate projections per stream), then single-stream blocks
over the same sequence, rotary position embeddings on four axes applied to q and k before attention.  A
double-stream block's attention is FLUX.1's step for step, so capture.dit.families.flux.FluxProcessor
drives it.  A single-stream block (`Flux2ParallelSelfAttention`) projects q, k, v and the MLP's input in
one matrix and sends the head outputs and the MLP's through one output projection: `Flux2SingleProcessor`
is `Flux2ParallelSelfAttnProcessor` step for step, and a `scale` edit acts on the head outputs before
that projection.  All are "joint" layers, double-stream first.

Text: the pipeline renders the prompt in Qwen3's chat template (thinking off) and pads it to
`max_sequence_length` (512); the transformer reads all of it, its padding unmasked (the labels are the very
tokens; the padding run is a span, as T5's is for FLUX.1).  Its states are three of Qwen3's hidden
layers side by side.

Sampling: the [klein] base models use classifier-free guidance as a second transformer call per step
for the empty negative prompt, the conditional call first (recorded); the step-distilled ones
(`is_distilled` in the pipeline's config) make one call.  FLUX.2 [dev]'s `Flux2Pipeline` (Mistral 3 text
encoder, guidance distilled) is refused: HeadScope has not been checked on it.
"""
from __future__ import annotations

import torch

from capture.dit.attend import Attend
from capture.dit.families import Family
from capture.dit.families.flux import rotated_attention


class Flux2SingleProcessor:
    """Flux2ParallelSelfAttnProcessor with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int):
        self.attend = Attend(layer, "joint", n_heads)

    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)  # [batch, tokens, 3 * inner + MLP input]
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [batch, tokens, head, head_dim]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        hidden = rotated_attention(self, attn, query, key, value, attention_mask, image_rotary_emb)
        return attn.to_out(torch.cat([hidden, attn.mlp_act_fn(mlp_hidden)], dim=-1))

    # diffusers' dispatcher reads these from the processor (None: the default attention backend)
    _attention_backend = None
    _parallel_config = None


FAMILY = Family(name="flux2", transformer="Flux2Transformer2DModel",
                pipelines=("Flux2KleinPipeline",),
                text_first=True, cfg=False, separate_cfg=True,
                guides=lambda pipe: not getattr(pipe.config, "is_distilled", False),
                encoders=(("qwen3", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * 2,  # the 2 x 2 packing of latents, as FLUX.1
                max_side=lambda pipe, default: 2 * default)

__all__ = ["FAMILY", "Flux2SingleProcessor"]
