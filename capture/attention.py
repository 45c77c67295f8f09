"""HeadScope's attention function: one mechanism for capture and interventions.

`headscope_attention` is registered with transformers under the name "headscope", for attention
(`AttentionInterface`) and for masks (`AttentionMaskInterface`, reusing the SDPA mask builder: without
it the causal mask is silently lost).  A model loaded by `capture.registry` runs with
`config._attn_implementation = "headscope"`, and each call does one of two things:

- nothing to record and no attention-level edit active: delegate to transformers' own SDPA function,
  so outputs and generated tokens are exactly those of a plain SDPA model;
- otherwise: compute softmax attention explicitly, one KV group (head block) at a time, exactly as
  transformers' eager path does (fp32 softmax), apply the active attention-level edits, hand the
  weights to the recorder, and produce the output as weights @ values.  Only one head block's
  fp32 scores exist at once; the recorder turns them into fp16 straight away.

The active state lives in a `Session`, set for the duration of a `with session(...)` block (a
ContextVar, so concurrent Streamlit threads do not see each other's sessions).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from capture.interventions import OUTPUT_OPS, HeadEdit, Intervention, InterventionError, parse_positions
from capture.types import OVERVIEW_BINS, pack_offset

IMPLEMENTATION = "headscope"
ROW_BLOCK = 256  # query rows per block: keeps one block's fp32 scores small and cache-friendly


class Recorder:
    """Collects each layer's attention weights as fp16, and hands a finished layer to `on_layer`.

    It expects one full forward pass over the whole sequence (query length == key length), which is
    how `capture.run` records: generation first (fast path), then one pass over the final tokens.
    `layout` is "tril" (causal: packed lower triangle, see capture.types) or "full".
    Rows arrive in blocks (`take`); a layer is handed on as soon as all its heads' rows are in,
    as `on_layer(layer, maps, overview)` with overview  # [head, bins, bins] float16, the block-max
    thumbnail the model view draws (pooled here from the fp32 rows, nearly free).
    """

    def __init__(self, n_heads: int, layout: str, on_layer: Callable[[int, np.ndarray, np.ndarray], None],
                 overview_bins: int = OVERVIEW_BINS):
        self.n_heads = n_heads
        self.layout = layout
        self.on_layer = on_layer
        self.overview_bins = overview_bins
        self._buffers: dict[int, np.ndarray] = {}
        self._overviews: dict[int, torch.Tensor] = {}
        self._rows_done: dict[int, int] = {}

    def take(self, layer: int, first_head: int, first_row: int, n: int, weights: torch.Tensor) -> None:
        """weights  # [heads_in_block, rows, key] for query heads first_head.. and rows first_row.. of an
        n-token pass; in the tril layout row r's keys beyond r are ignored."""
        n_block, n_rows, n_keys = weights.shape
        if layer not in self._buffers:
            width = n * (n + 1) // 2 if self.layout == "tril" else n * n
            self._buffers[layer] = np.empty((self.n_heads, width), dtype=np.float16)
            bins = min(self.overview_bins, n)
            self._overviews[layer] = torch.zeros(self.n_heads, bins, bins)
            self._rows_done[layer] = 0
        self._pool(layer, first_head, first_row, n, weights)
        out = torch.from_numpy(self._buffers[layer])[first_head : first_head + n_block]  # [heads_in_block, width]
        if self.layout == "tril":
            start = pack_offset(first_row)
            stop = pack_offset(first_row + n_rows)
            index = _tril_block_index(first_row, n_rows, n_keys)
            out[:, start:stop] = weights.reshape(n_block, n_rows * n_keys).index_select(1, index)
        else:
            out[:, first_row * n : (first_row + n_rows) * n] = weights.reshape(n_block, n_rows * n)
        self._rows_done[layer] += n_block * n_rows
        if self._rows_done[layer] == self.n_heads * n:
            layer_maps = self._buffers.pop(layer)
            if self.layout == "full":
                layer_maps = layer_maps.reshape(self.n_heads, n, n)
            self.on_layer(layer, layer_maps, self._overviews.pop(layer).to(torch.float16).numpy())

    def _pool(self, layer: int, first_head: int, first_row: int, n: int, weights: torch.Tensor) -> None:
        """Fold a block of rows into the layer's block-max overview (same blocks as capture.types.max_pool)."""
        pooled = self._overviews[layer]  # [head, bins, bins]
        bins = pooled.shape[1]
        size = -(-n // bins)
        n_block, n_rows, n_keys = weights.shape
        cols = torch.nn.functional.pad(weights, (0, bins * size - n_keys))  # [heads_in_block, rows, bins*size]
        col_max = cols.view(n_block, n_rows, bins, size).amax(-1)  # [heads_in_block, rows, bins]
        row_bins = (torch.arange(first_row, first_row + n_rows) // size)[None, :, None].expand_as(col_max)
        pooled[first_head : first_head + n_block].scatter_reduce_(1, row_bins, col_max, "amax")


@lru_cache(maxsize=256)
def _tril_block_index(first_row: int, n_rows: int, n_keys: int) -> torch.Tensor:
    """Flat indices into a [rows, keys] block of the lower-triangle entries, in packed row order."""
    rows = torch.arange(n_rows)
    lengths = first_row + rows + 1  # row first_row+i keeps keys 0..first_row+i
    row_of = torch.repeat_interleave(rows, lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    col = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return row_of * n_keys + col


@dataclass
class Session:
    """What the attention function and the output hooks do during one forward or generate call."""

    intervention: Intervention = Intervention()
    recorder: Recorder | None = None
    spans: dict[str, range] = field(default_factory=dict)
    # per-layer multiplicative gates on head outputs, gate  # [batch, head]; one row per batch item, so a
    # batch can ablate a different head in each row (ablation sweeps) and gates can carry gradients
    # (Michel et al. head importance)
    head_gates: dict[int, torch.Tensor] = field(default_factory=dict)
    # query positions of the current call per layer, set by the attention function, read by the o_proj hook
    query_positions: dict[int, range] = field(default_factory=dict)

    def attention_edits(self, layer: int) -> tuple[HeadEdit, ...]:
        return tuple(e for e in self.intervention.for_layer(layer) if e.op not in OUTPUT_OPS)

    def output_edits(self, layer: int) -> tuple[HeadEdit, ...]:
        return tuple(e for e in self.intervention.for_layer(layer) if e.op in OUTPUT_OPS)


_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("headscope_session", default=None)


@contextlib.contextmanager
def session(intervention: Intervention = Intervention(), recorder: Recorder | None = None,
            spans: dict[str, range] | None = None,
            head_gates: dict[int, torch.Tensor] | None = None) -> Iterator[Session]:
    """Make `intervention` (and `recorder`, `head_gates`, if given) active for the calls inside the block."""
    unsupported = sorted({e.op for e in intervention.edits} - {"scale"})
    if unsupported:
        raise InterventionError(f"The {', '.join(unsupported)} op is not implemented yet; only scale is.")
    active = Session(intervention=intervention, recorder=recorder, spans=dict(spans or {}),
                     head_gates=dict(head_gates or {}))
    token = _SESSION.set(active)
    try:
        yield active
    finally:
        _SESSION.reset(token)


def current_session() -> Session | None:
    return _SESSION.get()


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


def headscope_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """query  # [batch, head, query, head_dim]; key, value  # [batch, kv_head, key, head_dim].

    Returns attn_output  # [batch, query, head, head_dim], as transformers' attention functions do.
    """
    active = _SESSION.get()
    layer = getattr(module, "headscope_layer", None)
    n_q, n_k = query.shape[2], key.shape[2]
    if active is not None and layer is not None:
        active.query_positions[layer] = range(n_k - n_q, n_k)
    edits = active.attention_edits(layer) if active is not None and layer is not None else ()
    recording = active is not None and active.recorder is not None and layer is not None
    if not recording and not edits:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)

    batch, n_heads, _, head_dim = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    scaling = head_dim**-0.5 if scaling is None else scaling
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    implicit_causal = causal and attention_mask is None and n_q > 1  # rows see keys up to their own position
    mask = None if implicit_causal else _additive_mask(attention_mask, causal, n_q, n_k, query.dtype)
    softcap = kwargs.get("softcap")
    offset = n_k - n_q  # absolute position of query row 0
    key_t = key.transpose(2, 3)  # [batch, kv_head, head_dim, key]
    attn_output = torch.empty(batch, n_heads, n_q, value.shape[-1], dtype=query.dtype)
    for r0 in range(0, n_q, ROW_BLOCK):
        r1 = min(n_q, r0 + ROW_BLOCK)
        rows = r1 - r0
        k_end = offset + r1 if implicit_causal else n_k  # causal rows never see later keys: skip them
        # GQA without copying keys: the `group` query heads of one KV head are stacked along the rows
        q_block = query[:, :, r0:r1].reshape(batch, n_kv, group * rows, head_dim)  # [batch, kv_head, group*rows, head_dim]
        scores = torch.matmul(q_block, key_t[..., :k_end]).view(batch, n_heads, rows, k_end)  # [batch, head, rows, key]
        scores.mul_(scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if implicit_causal:
            scores[..., offset + r0 : k_end].masked_fill_(_upper(rows), float("-inf"))
        elif mask is not None:
            scores = scores + mask[:, :, r0:r1, :k_end]
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [batch, head, rows, key]
        del scores
        if recording:
            active.recorder.take(layer, 0, r0, n_q, weights[0])
        block_out = torch.matmul(weights.view(batch, n_kv, group * rows, k_end), value[:, :, :k_end])
        attn_output[:, :, r0:r1] = block_out.view(batch, n_heads, rows, -1)
    return attn_output.transpose(1, 2).contiguous(), None


@lru_cache(maxsize=8)
def _upper(n: int) -> torch.Tensor:
    """[n, n] True strictly above the diagonal: the future keys inside a diagonal block."""
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def scale_head_outputs(layer: int, n_heads: int) -> Callable:
    """A forward pre-hook for a layer's output projection: applies the session's `scale` edits.

    The projection's input is the concatenation of the head outputs z (METHODS.md notation):
    z  # [batch, query, head * head_dim]; `scale` multiplies one head's slice by `value`.
    """

    def hook(_module: torch.nn.Module, args: tuple) -> tuple | None:
        active = _SESSION.get()
        if active is None:
            return None
        edits = active.output_edits(layer)
        gates = active.head_gates.get(layer)
        if not edits and gates is None:
            return None
        (z, *rest) = args
        batch, n_q, width = z.shape
        z = z.view(batch, n_q, n_heads, width // n_heads)  # [batch, query, head, head_dim]
        if gates is not None:
            z = z * gates.to(z.dtype)[:, None, :, None]  # gate  # [batch, head]
        else:
            z = z.clone()
        positions = active.query_positions.get(layer, range(n_q))
        for edit in edits:
            rows = _query_rows(edit.queries, positions, active.spans)
            z[:, rows, edit.head] = z[:, rows, edit.head] * edit.value
        return (z.reshape(batch, n_q, width), *rest)

    return hook


def _query_rows(spec: str, positions: range, spans: dict[str, range]) -> slice | list[int]:
    """Rows of the current call whose absolute positions fall in the position set `spec`."""
    if spec == "all":
        return slice(None)
    wanted = parse_positions(spec, positions.stop, spans)
    return [i for i, p in enumerate(positions) if p in wanted]


def register() -> None:
    """Register "headscope" with transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, headscope_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
