"""One attention call as the explicit path sees it: its geometry, its mask, its scores block by block.

`AttentionCall` holds what transformers hands an attention function (query, key, value, mask, scaling,
softcap) and computes the scaled, soft-capped and masked scores of a block of query rows exactly as
transformers' eager path does, so the edits (capture.engine.edits) and the recorder
(capture.engine.recorder) see the numbers eager attention would.  A causal call without a mask is
masked implicitly (each row sees the keys up to its own position, no [query, key] mask is built), and
grouped-query attention runs without copying keys: the query heads of one KV head are stacked along
the rows.
"""
from __future__ import annotations

from functools import lru_cache

import torch

ROW_BLOCK = 256  # query rows per block: keeps one block's fp32 scores small and cache-friendly


def _additive_mask(attention_mask: torch.Tensor | None, causal: bool, n_q: int, n_k: int,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """mask  # [batch or 1, 1, query, key], 0 where visible and the dtype's minimum where not (as eager)."""
    min_value = torch.finfo(dtype).min
    if attention_mask is None:
        if not causal or n_q == 1:
            return None
        offset = n_k - n_q  # query i sits at absolute position offset + i
        visible = torch.arange(n_k)[None, :] <= (torch.arange(n_q)[:, None] + offset)
        attention_mask = visible[None, None]
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype)
        return torch.where(attention_mask, zero, torch.tensor(min_value, dtype=dtype))
    return attention_mask[..., :n_k]


class AttentionCall:
    """The geometry of one attention call, and its blocks of softmax-ready scores."""

    def __init__(self, module, query, key, value, attention_mask, scaling, kwargs):
        self.query, self.key, self.value = query, key, value
        self.batch, self.n_heads, self.n_q, self.head_dim = query.shape
        self.n_k = key.shape[2]
        self.n_kv = key.shape[1]
        self.group = self.n_heads // self.n_kv
        self.scaling = self.head_dim**-0.5 if scaling is None else scaling
        flag = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if flag is None else flag)
        self.causal = causal
        self.implicit_causal = causal and attention_mask is None and self.n_q > 1  # rows see keys up to their own position
        self.mask = None if self.implicit_causal else _additive_mask(attention_mask, causal, self.n_q, self.n_k, query.dtype)
        self.softcap = kwargs.get("softcap")
        self.offset = self.n_k - self.n_q  # absolute position of query row 0
        self.key_t = key.transpose(2, 3)  # [batch, kv_head, head_dim, key]

    def k_end(self, r1: int) -> int:
        return self.offset + r1 if self.implicit_causal else self.n_k  # causal rows never see later keys

    def scores(self, r0: int, r1: int) -> torch.Tensor:
        """scores  # [batch, head, rows, k_end], scaled, soft-capped and masked, as transformers' eager path."""
        rows, k_end = r1 - r0, self.k_end(r1)
        # GQA without copying keys: the `group` query heads of one KV head are stacked along the rows
        q_block = self.query[:, :, r0:r1].reshape(self.batch, self.n_kv, self.group * rows, self.head_dim)
        scores = torch.matmul(q_block, self.key_t[..., :k_end]).view(self.batch, self.n_heads, rows, k_end)
        scores.mul_(self.scaling)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.implicit_causal:
            scores[..., self.offset + r0 : k_end].masked_fill_(_upper(rows), float("-inf"))
        elif self.mask is not None:
            scores = scores + self.mask[:, :, r0:r1, :k_end]
        return scores

    def visible(self, r0: int, r1: int) -> torch.Tensor:
        """visible  # [batch or 1, 1, rows, k_end] bool: the keys the causal / padding mask lets each row see."""
        k_end = self.k_end(r1)
        if self.implicit_causal:
            return (torch.arange(k_end)[None, :] <= torch.arange(self.offset + r0, self.offset + r1)[:, None])[None, None]
        if self.mask is not None:
            return self.mask[:, :, r0:r1, :k_end] > torch.finfo(self.mask.dtype).min / 2
        return torch.ones(1, 1, r1 - r0, k_end, dtype=torch.bool)

    def positions(self, r0: int, r1: int) -> torch.Tensor:
        return torch.arange(self.offset + r0, self.offset + r1)


@lru_cache(maxsize=8)
def _upper(n: int) -> torch.Tensor:
    """[n, n] True strictly above the diagonal: the future keys inside a diagonal block."""
    return torch.ones(n, n, dtype=torch.bool).triu(1)
