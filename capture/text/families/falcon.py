"""Falcon's attention through HeadScope (transformers' FalconAttention computes attention inline).

The forward below is FalconAttention.forward's SDPA branch, the one a Falcon model loaded by
transformers runs (SDPA is its default): fused query_key_value projection split into heads (multi-query,
grouped "new decoder architecture" or one key per head), rotary embeddings unless the model uses ALiBi,
the cache update, then attention with scaling 1 / sqrt(head_dim) and the model's mask, and the `dense`
output projection.  With ALiBi (falcon-rw) the model folds alibi / sqrt(head_dim) into that mask
(FalconModel.forward), so the bias arrives with the mask.

Deviation noted: with ALiBi, transformers' eager branch (used for `output_attentions`) adds the bias to
the scores *and* finds it in the mask again, so eager maps of ALiBi Falcon differ from what the SDPA
model computes; HeadScope records what the model computes (the SDPA branch).  Rotary Falcon (7B, 40B,
180B) has no such difference: its maps equal eager's.
"""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

from capture.engine.attention import headscope_attention

native = sdpa_attention_forward  # FalconAttention's own SDPA call, with scale 1 / sqrt(head_dim)


def check(module: torch.nn.Module) -> None:
    """Every Falcon configuration is served."""


def forward(self, hidden_states: torch.Tensor, alibi: torch.Tensor | None, attention_mask: torch.Tensor,
            position_ids=None, layer_past=None, use_cache: bool = False, output_attentions: bool = False,
            position_embeddings=None, **kwargs):
    """hidden_states  # [batch, query, hidden] -> (output  # [batch, query, hidden], None)."""
    fused_qkv = self.query_key_value(hidden_states)  # [batch, query, (head + 2 kv_head) * head_dim]
    n_kv = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query, key, value = self._split_heads(fused_qkv)  # [batch, query, head | kv_head, head_dim]
    batch, n_q = query.shape[:2]
    query = query.transpose(1, 2).reshape(batch, self.num_heads, n_q, self.head_dim)  # [batch, head, query, head_dim]
    key = key.transpose(1, 2).reshape(batch, n_kv, n_q, self.head_dim)  # [batch, kv_head, query, head_dim]
    value = value.transpose(1, 2).reshape(batch, n_kv, n_q, self.head_dim)
    if alibi is None:
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out, _ = headscope_attention(self, query, key, value, attention_mask, scaling=self.inv_norm_factor)
    out = out.reshape(batch, n_q, self.num_heads * self.head_dim)  # [batch, query, head * head_dim]
    return self.dense(out), None
