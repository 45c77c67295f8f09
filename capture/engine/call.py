"""One attention call as the explicit path sees it: its geometry, its mask, its scores block by block.

`AttentionCall` holds what transformers hands an attention function (query, key, value, mask, scaling,
softcap, an additive position bias) and computes the scaled, soft-capped and masked scores of a block
of query rows exactly as transformers' eager path does, so the edits (capture.engine.edits) and the
recorder (capture.engine.recorder) see the numbers eager attention would.  A causal call without a mask
is masked implicitly (each row sees the keys up to its own position, no [query, key] mask is built), and
grouped-query attention runs without copying keys: the query heads of one KV head are stacked along
the rows.

What some families add to the scores, folded in here so every path sees it:
- an additive bias per head: T5's relative position bias (`position_bias`), and ALiBi (`alibi`, passed
  by HeadScope's BLOOM forward, capture.text.families.bloom; Press et al. 2022), added with the mask;
- learned sink logits (GPT-OSS, the module's `sinks`  # [head]): one extra logit per head that takes
  softmax mass no key gets (Xiao et al. 2024's attention sink, made explicit).  `softmax` gives the
  real keys' weights as the model computes them, so a row sums to 1 - the sink's share.

Every softmax here is float32, whatever the model's dtype; tensors are made on the call's device.
Positions: `positions()` are the query rows' places on the capture's token axis (`q_first` onward:
for an encoder-decoder's decoder and cross-attention layers the decoder tokens follow the encoder's),
`key_positions()` the keys' (`k_first` onward); both default to the call's own causal offset.
"""
from __future__ import annotations

from functools import lru_cache

import torch

ROW_BLOCK = 256  # query rows per block: keeps one block's fp32 scores small and cache-friendly


def additive_mask(attention_mask: torch.Tensor | None, causal: bool, n_q: int, n_k: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """mask  # [batch or 1, 1, query, key], 0 where visible and the dtype's minimum where not, as transformers'
    eager mask builder makes it (None: every key visible)."""
    min_value = torch.finfo(dtype).min
    if attention_mask is None:
        if not causal or n_q == 1:
            return None
        offset = n_k - n_q  # query i sits at absolute position offset + i
        visible = torch.arange(n_k, device=device)[None, :] <= (torch.arange(n_q, device=device)[:, None] + offset)
        attention_mask = visible[None, None]
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(attention_mask, zero, torch.tensor(min_value, dtype=dtype, device=device))
    return attention_mask[..., :n_k]


def is_causal(module, kwargs: dict) -> bool:
    """Whether a call is causal: the `is_causal` transformers passes, else the module's own flag."""
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if flag is None else flag)


def additive_bias(kwargs: dict) -> torch.Tensor | None:
    """bias  # [batch or 1, head, query or 1, key]: T5's relative position bias or ALiBi, if the call has one."""
    return kwargs.get("position_bias") if kwargs.get("position_bias") is not None else kwargs.get("alibi")


class AttentionCall:
    """The geometry of one attention call, and its blocks of softmax-ready scores."""

    def __init__(self, module, query, key, value, attention_mask, scaling, kwargs,
                 q_first: int | None = None, k_first: int = 0):
        self.query, self.key, self.value = query, key, value
        self.device = query.device
        self.batch, self.n_heads, self.n_q, self.head_dim = query.shape
        self.n_k = key.shape[2]
        self.n_kv = key.shape[1]
        self.group = self.n_heads // self.n_kv
        self.scaling = self.head_dim**-0.5 if scaling is None else scaling
        causal = self.causal = is_causal(module, kwargs)
        bias = additive_bias(kwargs)
        self.implicit_causal = causal and attention_mask is None and bias is None and self.n_q > 1  # rows see keys up to their own position
        self.mask = None if self.implicit_causal else \
            additive_mask(attention_mask, causal, self.n_q, self.n_k, query.dtype, self.device)
        self.visible_mask = self.mask  # [batch or 1, 1, query, key]: visibility is the mask's, bias or not
        if bias is not None:
            bias = bias[..., -self.n_q:, : self.n_k].to(query.dtype)
            self.mask = bias if self.mask is None else self.mask + bias
        self.softcap = kwargs.get("softcap")
        sinks = getattr(module, "sinks", None)
        self.sinks = None if sinks is None else sinks.detach().float().view(1, -1, 1, 1)  # [1, head, 1, 1] logits
        self.offset = self.n_k - self.n_q  # row 0's place among the call's keys (a caller may move it)
        self._q_first = q_first
        self.k_first = k_first
        # positions on the axis, for open-ended position sets of the queries
        self.n_total = self.n_k if q_first is None else max(q_first + self.n_q, k_first + self.n_k)
        self.key_t = key.transpose(2, 3)  # [batch, kv_head, head_dim, key]

    @property
    def q_first(self) -> int:
        """Row 0's place on the capture's axis: as given, else the call's causal offset."""
        return self.offset if self._q_first is None else self._q_first

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
            scores[..., self.offset + r0 : k_end].masked_fill_(_upper(rows, self.device), float("-inf"))
        elif self.mask is not None:
            scores = scores + self.mask[:, :, r0:r1, :k_end]
        return scores

    def softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """weights  # [batch, head, rows, key] float32: the softmax of a block of scores; with sink logits, the
        real keys' share of softmax(scores, sink) (each row then sums to 1 - the sink's share)."""
        if self.sinks is None:
            return torch.softmax(scores, dim=-1, dtype=torch.float32)
        scores = scores.float()
        sink = self.sinks.to(scores.device).expand(scores.shape[0], -1, scores.shape[2], 1)  # [batch, head, rows, 1]
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]

    def visible(self, r0: int, r1: int) -> torch.Tensor:
        """visible  # [batch or 1, 1, rows, k_end] bool: the keys the causal / padding mask lets each row see."""
        k_end = self.k_end(r1)
        if self.implicit_causal:
            keys = torch.arange(k_end, device=self.device)
            rows = torch.arange(self.offset + r0, self.offset + r1, device=self.device)
            return (keys[None, :] <= rows[:, None])[None, None]
        if self.visible_mask is not None:
            return self.visible_mask[:, :1, r0:r1, :k_end] > torch.finfo(self.visible_mask.dtype).min / 2
        return torch.ones(1, 1, r1 - r0, k_end, dtype=torch.bool, device=self.device)

    def positions(self, r0: int, r1: int) -> torch.Tensor:
        """The places of query rows r0..r1-1 on the capture's token axis."""
        return torch.arange(self.q_first + r0, self.q_first + r1, device=self.device)

    def key_positions(self, k_end: int) -> torch.Tensor:
        """The places of keys 0..k_end-1 on the capture's token axis."""
        return torch.arange(self.k_first, self.k_first + k_end, device=self.device)


@lru_cache(maxsize=8)
def _upper(n: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """[n, n] True strictly above the diagonal: the future keys inside a diagonal block."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
