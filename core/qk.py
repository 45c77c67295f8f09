"""The long-context "qk" layout: attention maps computed on request from stored queries and keys.

Full per-head maps grow as n²: an 8,192-token SmolLM2 capture would be 30 × 9 × 8192² × 2 B ≈ 36 GB
(18 GB as a packed triangle).  Above `capture.engine.longctx.qk_threshold()` tokens a causal capture keeps
instead, per layer, the tensors the maps are made of, and computes what is asked for:

    K/L007            [n_heads + n_kv_heads, n, head_dim] float32: layer 7's query heads (post-rotary,
                      as the attention function received them), then its KV heads' keys
    K/overview0032    [layer, head, 32, 32] float16     block-max thumbnails (the model view)
    K/overview0128    [layer, head, 128, 128] float16   block-max per-head overviews (the head view)
    K/R_colsum        [layer, head, key] float32   sum_i A_ij over every query row (received attention)
    K/R_colsum_response  the same over the response rows only (present when the run generated)
    K/R_entropy       [layer, head, query] float32 -sum_j A_ij ln A_ij (nats)
    K/R_distance      [layer, head, query] float32 sum_j A_ij (i - j), the mean look-back distance
    K/R_waad          [layer, head, query] float32 sum_j A_ij min(i - j, W), W = `waad_window`

The reductions and thumbnails are computed during the recorded forward from the same float32
weights that produce the layer's output (capture.engine.longctx); the maps are recomputed here as

    A = softmax(mask(softcap((q · scaling) kᵀ)))   per query head h, k = key head h // group (GQA)

with the causal mask (key j > query i masked out), in float32, then handed out as float16 like the
stored layouts.  Queries and keys are kept in float32 because the logits amplify their rounding:
measured on SmolLM2 (logits up to |64|), maps recomputed from fp16 q and k are off by up to 2.2e-3
absolute and 1.2 % relative (weights > 0.01), ten times the fp16 rounding of the maps themselves;
fp32 keeps the recomputed maps equal to the recorded ones to float rounding (~1e-7).  The cost is 4 B × (9 + 3) × 64 per token and
layer: 755 MB for 8,192 SmolLM2 tokens, against 18 GB for the packed triangle.

numpy only (no torch): a shared link to a long capture is served without loading the model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LAYOUT = "qk"
HEAD_OVERVIEW_BINS = 128  # the head view's overview resolution (pages/explorer.py), stored for qk captures
REDUCTIONS = ("colsum", "colsum_response", "entropy", "distance", "waad")
ROW_BLOCK = 512  # query rows per block when computing maps on request


def reduction_name(name: str) -> str:
    """Cache entry name of one stored reduction."""
    return f"R_{name}"


@dataclass(frozen=True)
class QKParams:
    """How a qk capture's maps are made from its queries and keys (stored in the capture record)."""

    scaling: float  # logits = (q · scaling) kᵀ
    softcap: float | None = None  # logits <- tanh(logits / softcap) * softcap, if set (Gemma 2 style)
    waad_window: int = 10  # W of the stored WAAD rows (Li et al. 2025)
    split: int | None = None  # first response row when the run generated (R_colsum_response's rows)
    reductions: tuple[str, ...] = ()  # names of the stored reductions

    def to_json(self) -> dict:
        record = asdict(self)
        record["reductions"] = list(self.reductions)
        return record

    @classmethod
    def from_json(cls, data: dict) -> "QKParams":
        data = dict(data)
        data["reductions"] = tuple(data.get("reductions", ()))
        return cls(**data)


def softmax_rows(logits: np.ndarray, start: int) -> np.ndarray:
    """Causal softmax in place: logits  # [..., rows, keys] of query rows start.. -> weights, float32.

    Keys beyond each row's own position are masked out (weight 0)."""
    rows, keys = logits.shape[-2], logits.shape[-1]
    future = np.arange(keys)[None, :] > np.arange(start, start + rows)[:, None]  # [rows, keys]
    if future.any():
        logits[..., future] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def attention_rows(stored: np.ndarray, n_heads: int, params: QKParams, start: int, stop: int,
                   heads: list[int] | None = None, keys: int | None = None) -> np.ndarray:
    """attn  # [len(heads), stop - start, keys] float32: query rows start..stop-1 of the given query heads.

    `stored`  # [n_heads + n_kv_heads, n, head_dim] (queries, then keys), usually a memory map: only the
    rows asked for and keys 0..keys-1 are read.  `keys` defaults to `stop` (the keys those rows see)."""
    keys = stop if keys is None else keys
    heads = list(range(n_heads)) if heads is None else list(heads)
    n_kv = stored.shape[0] - n_heads
    group = n_heads // n_kv
    out = np.empty((len(heads), stop - start, keys), dtype=np.float32)
    scaling = np.float32(params.scaling)
    by_kv: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        by_kv.setdefault(h // group, []).append(i)
    for kv, slots in by_kv.items():
        k = np.asarray(stored[n_heads + kv, :keys], dtype=np.float32)  # [keys, head_dim]
        q = np.asarray(stored[[heads[i] for i in slots], start:stop], dtype=np.float32) * scaling  # [g, rows, d]
        logits = np.matmul(q, k.T)  # [g, rows, keys]
        if params.softcap is not None:
            logits = np.tanh(logits / np.float32(params.softcap)) * np.float32(params.softcap)
        out[slots] = softmax_rows(logits, start)
    return out


def pool_rows(weights: np.ndarray, start: int, n: int, bins: int, pooled: np.ndarray) -> None:
    """Fold rows start.. (weights  # [heads, rows, keys]) into block-max thumbnails pooled  # [heads, bins, bins].

    The blocks are those of `core.types.max_pool` (size ceil(n / bins), ragged last block)."""
    size = -(-n // bins)
    heads, rows, keys = weights.shape
    nb = -(-keys // size)
    padded = np.zeros((heads, rows, nb * size), dtype=weights.dtype)
    padded[..., :keys] = weights
    per_row = padded.reshape(heads, rows, nb, size).max(axis=-1)  # [heads, rows, nb]
    row_bins = (np.arange(start, start + rows) // size)
    for b in np.unique(row_bins):
        sel = row_bins == b
        np.maximum(pooled[:, b, :nb], per_row[:, sel].max(axis=1), out=pooled[:, b, :nb])


def pooled_heads(stored: np.ndarray, n_heads: int, params: QKParams, n: int, bins: int,
                 heads: list[int] | None = None) -> np.ndarray:
    """thumbs  # [len(heads), bins, bins] float32: block-max overviews computed by streaming row blocks."""
    heads = list(range(n_heads)) if heads is None else list(heads)
    pooled = np.zeros((len(heads), bins, bins), dtype=np.float32)
    size = -(-n // bins)
    block = max(size, (ROW_BLOCK // size) * size)  # whole pooling blocks per row block
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        pool_rows(attention_rows(stored, n_heads, params, r0, r1, heads), r0, n, bins, pooled)
    return pooled


__all__ = ["HEAD_OVERVIEW_BINS", "LAYOUT", "QKParams", "REDUCTIONS", "attention_rows", "pool_rows",
           "pooled_heads", "reduction_name", "softmax_rows"]
