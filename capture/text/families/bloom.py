"""BLOOM's attention through HeadScope (transformers' BloomAttention computes attention inline).

BLOOM adds ALiBi (Press et al. 2022) to the scaled scores: scores = alibi + (q kᵀ) / sqrt(head_dim),
then the causal mask, softmax in float32.  The forward below computes queries, keys and values as
BloomAttention does (fused query_key_value, per-head layout, cache update) and hands the bias to
capture.engine.attention.headscope_attention as `alibi`  # [batch, head, 1, key], which
capture.engine.call adds with the mask; `native` is BloomAttention's own arithmetic (baddbmm), run when
nothing is recorded or edited, so generation is bit-identical to the plain model.

Not served: `pretraining_tp > 1` with `slow_but_exact` (the output projection split into slices), a
training-time option no released checkpoint enables.
"""
from __future__ import annotations

import torch
from transformers.models.bloom.modeling_bloom import dropout_add

from capture.engine.attention import headscope_attention
from core.errors import ModelUnavailable


def check(module: torch.nn.Module) -> None:
    if module.pretraining_tp > 1 and module.slow_but_exact:
        raise ModelUnavailable("This BLOOM model splits its output projection (pretraining_tp with slow_but_exact), "
                               "which HeadScope does not serve; set slow_but_exact to false in its config.json.")


def native(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, alibi: torch.Tensor, scaling: float | None = None,
           dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """BloomAttention's arithmetic: query  # [batch, head, query, head_dim]; key, value  # [batch, head, key,
    head_dim]; alibi  # [batch, head, 1, key] -> attn_output  # [batch, query, head, head_dim]."""
    batch, n_heads, n_q, head_dim = query.shape
    q = query.reshape(batch * n_heads, n_q, head_dim)
    k = key.reshape(batch * n_heads, -1, head_dim).transpose(-1, -2)
    v = value.reshape(batch * n_heads, -1, head_dim)
    scores = alibi.reshape(batch * n_heads, 1, -1).baddbmm(batch1=q, batch2=k, beta=module.beta,
                                                           alpha=module.inv_norm_factor)
    weights = scores.view(batch, n_heads, n_q, -1)  # [batch, head, query, key]
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    context = torch.bmm(probs.view(batch * n_heads, n_q, -1), v)  # [batch * head, query, head_dim]
    return context.view(batch, n_heads, n_q, head_dim).transpose(1, 2).contiguous(), None


def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
            attention_mask: torch.Tensor, layer_past=None, use_cache: bool = False, output_attentions: bool = False,
            **kwargs):
    """hidden_states  # [batch, query, hidden] -> (output + residual  # [batch, query, hidden], None)."""
    batch, n_q, _ = hidden_states.shape
    fused_qkv = self.query_key_value(hidden_states)  # [batch, query, 3 * hidden]
    query, key, value = self._reshape(fused_qkv)  # [batch, head, query, head_dim]
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    bias = alibi.view(batch, self.num_heads, 1, -1)  # [batch, head, 1, key]
    out, _ = headscope_attention(self, query, key, value, attention_mask, scaling=self.inv_norm_factor, alibi=bias)
    out = out.reshape(batch, n_q, self.num_heads * self.head_dim)  # [batch, query, head * head_dim]
    return dropout_add(self.dense(out), residual, self.hidden_dropout, self.training), None
