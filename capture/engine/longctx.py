"""Long contexts: the recorded pass of the "qk" layout (core.qk describes what is stored).

Above `qk_threshold()` tokens (2,048 by default; `HEADSCOPE_QK_THRESHOLD` changes it) a causal text
capture no longer stores maps.  `QKRecorder.attend` computes each layer's attention itself — the
attention function hands it the call (`capture.engine.attention.headscope_attention`, the `attend` hook) —
and keeps:

- the layer's queries and keys (post-rotary, float32), from which core.qk recomputes any map, row
  or window on request;
- exact one-pass reductions of the float32 weights that make the layer's output: column sums over all
  rows and over the response rows, row entropy, mean look-back distance, WAAD (W = 10), per row;
- block-max thumbnails at 32 bins (model view) and 128 bins (head view).

How it is computed, per layer, KV group and block of `ROW_BLOCK` query rows (the group's query heads
stacked along the rows, so keys are never copied), rows only against the keys they can see:

    s = (q · scaling) kᵀ, softcap, causal mask -> w = softmax(s) (float32, as transformers' eager path)
    out = w @ v;  entropy_i = lse_i - sum_j w_ij s_ij  with  lse_i = max_j s_ij - ln max_j w_ij
    distance_i = i - sum_j w_ij j;  WAAD_i = W - sum_{k<W} w_{i,i-k} (W - k);  colsum += 1ᵀ w

so no [n, n] array exists at any time: memory is one row block per worker (about 40 MB at 8,192
tokens) plus the layer's queries and keys (25 MB).  Row blocks are shared between `workers` Python
threads, each running torch single-threaded: torch's own threading costs a barrier per small op,
which on a busy 2-core machine made the blocked pass ~10x slower than running two blocks at once.

Only plain causal attention is supported (no sliding window or chunked masks, no padding, batch 1,
no attention-level edits): `choose_layout` sends anything else to the stored "tril" layout.

On a GPU the same torch ops run on the device in one worker and blocks of GPU_ROW_BLOCK rows (the fused
kernel is the CPU's), the layer's reductions are filled there and copied to host memory with its
queries and keys when the layer is done (capture.engine.device.to_host).  The maps are recomputed on request by core.qk (numpy,
on the host).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from capture.engine import fused
from capture.engine.device import to_host
from capture.engine.recorder import one_thread
from core.errors import InputError
from core.interventions import ATTENTION_OPS, Intervention
from core.qk import HEAD_OVERVIEW_BINS, LAYOUT, QKParams
from core.types import OVERVIEW_BINS, ModelMeta

DEFAULT_QK_THRESHOLD = 2048  # tokens; longer causal inputs get the "qk" layout
ROW_BLOCK = 128  # query rows per block and KV group (x group size rows in one matrix product)
GPU_ROW_BLOCK = 512  # on a GPU: fewer, larger kernels (scores of group x 512 rows x n keys, float32; not yet measured)
WAAD_WINDOW = 10  # W of Li et al. 2025 (analytics.summary.WAAD_WINDOW)
NEG = torch.finfo(torch.float32).min  # the causal mask: exp(NEG - max) == 0 exactly, and 0 * NEG == 0


def qk_threshold() -> int:
    """Inputs longer than this many tokens use the "qk" layout (env HEADSCOPE_QK_THRESHOLD, default 2,048)."""
    try:
        return int(os.environ.get("HEADSCOPE_QK_THRESHOLD", DEFAULT_QK_THRESHOLD))
    except ValueError:
        return DEFAULT_QK_THRESHOLD


def attention_edits(intervention: Intervention) -> bool:
    return any(e.op in ATTENTION_OPS for e in intervention.edits)


# model types whose attention is not softmax(q kᵀ) under a plain causal mask, so their maps cannot be
# recomputed from queries and keys: ALiBi (BLOOM; Falcon, whose mask always arrives materialised) and
# learned sink logits (GPT-OSS)
NOT_PLAIN = ("bloom", "falcon", "gpt_oss")


def plain_causal(config) -> bool:
    """True if the model's self-attention is a plain causal mask (no sliding window / chunked layers, no
    position bias or sink logit: NOT_PLAIN)."""
    if config is None:
        return True
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "model_type", None) in NOT_PLAIN:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return False
    return not getattr(config, "attention_chunk_size", None)


def choose_layout(meta: ModelMeta, n_tokens: int, intervention: Intervention = Intervention(),
                  config=None) -> str:
    """"full" for encoders; "qk" for causal inputs longer than `qk_threshold()` whose maps are plain
    softmax(q kᵀ) (no attention-level edit, plain causal mask); "tril" otherwise."""
    if not meta.causal:
        return "full"
    if n_tokens > qk_threshold() and not attention_edits(intervention) and plain_causal(config):
        return LAYOUT
    return "tril"


@lru_cache(maxsize=8)
def _upper(n: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _bin_max(x: torch.Tensor, keys: int, size: int) -> torch.Tensor:
    """x  # [rows, >= keys] -> [rows, ceil(keys / size)]: the max over each block of `size` keys."""
    full = keys // size
    parts = []
    if full:
        parts.append(x[:, : full * size].view(x.shape[0], full, size).amax(-1))
    if full * size < keys:
        parts.append(x[:, full * size : keys].amax(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class _Pools:
    """Block-max thumbnails of one layer, at the model-view and head-view resolutions.

    The block maxima are taken on the logits, before the softmax (one pass that also yields each
    row's max logit): within a row, max_j w_ij = exp(max_j s_ij - lse_i)."""

    def __init__(self, n_heads: int, n: int, bins: tuple[int, ...], device: torch.device = torch.device("cpu")):
        self.n = n
        self.bins = tuple(min(b, n) for b in bins)
        self.sizes = tuple(-(-n // b) for b in self.bins)
        self.fine = int(np.argmin(self.sizes))
        self.maps = [torch.zeros(n_heads, b, b, device=device) for b in self.bins]

    def bin_logits(self, s: torch.Tensor, keys: int) -> list[torch.Tensor]:
        """s  # [rows, >= keys] masked logits -> per resolution, the max logit of each key block  # [rows, blocks]."""
        fine_size = self.sizes[self.fine]
        per_row: list = [None] * len(self.bins)
        per_row[self.fine] = fine = _bin_max(s, keys, fine_size)
        for i, size in enumerate(self.sizes):
            if i == self.fine:
                continue
            if size % fine_size == 0:  # whole fine blocks: pool the fine maxima (exact)
                ratio = size // fine_size
                pad = (-fine.shape[1]) % ratio
                pm = torch.nn.functional.pad(fine, (0, pad), value=NEG) if pad else fine
                per_row[i] = pm.view(pm.shape[0], -1, ratio).amax(-1)
            else:
                per_row[i] = _bin_max(s, keys, size)
        return per_row

    def row_max_weight(self, per_row: list[torch.Tensor], w: torch.Tensor, keys: int) -> torch.Tensor:
        """max_j w_ij  # [rows]: read from the one fine block that holds each row's max logit."""
        size = self.sizes[self.fine]
        block = per_row[self.fine].argmax(-1)  # [rows]
        cols = (block[:, None] * size + torch.arange(size, device=w.device)[None, :]).clamp_(max=keys - 1)
        return torch.gather(w, 1, cols).amax(-1)

    def fold(self, heads: slice, group: int, r0: int, r1: int, per_row: list[torch.Tensor],
             lse: torch.Tensor) -> None:
        """Fold the block maxima of rows r0..r1-1 of `group` heads (per_row from `bin_logits`, lse  # [group * rows])."""
        rows = r1 - r0
        positions = torch.arange(r0, r1, device=lse.device)
        for pooled, size, pm in zip(self.maps, self.sizes, per_row):
            nb = pm.shape[1]
            weights = torch.exp(pm - lse[:, None])  # [group * rows, nb]
            index = (positions // size).view(1, rows, 1).expand(group, rows, nb)
            pooled[heads, :, :nb].scatter_reduce_(1, index, weights.view(group, rows, nb), "amax")


class QKRecorder:
    """The recorder of the "qk" layout: computes each layer's attention (`attend`) and keeps queries,
    keys, reductions and thumbnails.  `on_layer(layer, qk, overview)` receives
    qk  # [n_heads + n_kv_heads, n, head_dim] float32 and overview  # [head, 32, 32] float16 as soon as
    a layer is done (capture.text.adapter.LayerWriter writes them on its thread)."""

    layout = LAYOUT

    def __init__(self, meta: ModelMeta, n_tokens: int, on_layer: Callable[[int, np.ndarray, np.ndarray], None],
                 split: int | None = None, window: int = WAAD_WINDOW, row_block: int = ROW_BLOCK,
                 workers: int | None = None, use_kernel: bool = True):
        self.meta, self.n, self.on_layer = meta, n_tokens, on_layer
        self.use_kernel = use_kernel  # capture/engine/fused.cpp when it builds (False: torch ops only)
        self.split = split if split is not None and 0 < split < n_tokens else None
        self.window, self.row_block = int(window), int(row_block)
        self.workers = max(1, min(2, torch.get_num_threads()) if workers is None else int(workers))
        L, H, n = meta.n_layers, meta.n_heads, n_tokens
        names = ["colsum", "entropy", "distance", "waad"] + (["colsum_response"] if self.split else [])
        self.arrays = {name: np.zeros((L, H, n), dtype=np.float32) for name in names}
        hb = min(HEAD_OVERVIEW_BINS, n)
        self.head_overview = np.zeros((L, H, hb, hb), dtype=np.float16)
        self.scaling: float | None = None
        self.softcap: float | None = None
        self.layers_done = 0
        self._overviews: dict[int, np.ndarray] = {}  # layer -> [head, 32, 32] float16, until handed on
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="headscope-qk") \
            if self.workers > 1 else None

    # the explicit path's entry point: only reached when an attention-level edit is active
    def take(self, *_args, **_kwargs) -> None:
        raise InputError("Attention-level edits cannot be recorded in the long-context (qk) layout; "
                         "this is a bug in choosing the layout.")

    def params(self) -> QKParams:
        return QKParams(scaling=float(self.scaling or self.meta.head_dim ** -0.5), softcap=self.softcap,
                        waad_window=self.window, split=self.split, reductions=tuple(self.arrays))

    def finish(self) -> None:
        """Nothing is deferred here: each layer is handed on as soon as it is computed."""

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- the attention call ----------------------------------------------------------------------
    def attend(self, layer: int, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict) -> torch.Tensor:
        """query  # [1, head, n, head_dim]; key, value  # [1, kv_head, n, head_dim] -> attn_output  # [1, n, head, head_dim]."""
        batch, n_heads, n_q, head_dim = query.shape
        n_k = key.shape[2]
        flag = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if flag is None else flag)
        window = kwargs.get("sliding_window")
        if batch != 1 or n_q != n_k or n_q != self.n or not causal or attention_mask is not None \
                or (window is not None and window < n_k):
            raise InputError("The long-context (qk) layout records one plain causal pass over the whole "
                             f"input; layer {layer} was called with batch {batch}, {n_q} queries over {n_k} keys"
                             f"{', a mask' if attention_mask is not None else ''}"
                             f"{', a sliding window' if window is not None else ''}.")
        scaling = head_dim ** -0.5 if scaling is None else float(scaling)
        softcap = kwargs.get("softcap")
        if self.scaling is None:
            self.scaling, self.softcap = scaling, (None if softcap is None else float(softcap))
        elif not math.isclose(self.scaling, scaling) or self.softcap != (None if softcap is None else float(softcap)):
            raise InputError("The layers of this model use different attention scalings; the qk layout "
                             "cannot record it.")
        q = query[0].float()
        k = key[0].float()
        v = value[0].float()
        out = self._attend(layer, q, k, v, scaling, self.softcap)  # [head, n, v_head_dim]
        qk = to_host(torch.cat([q, k], dim=0))  # [head + kv_head, n, head_dim]
        overview = self._overviews.pop(layer)
        self.layers_done += 1
        self.on_layer(layer, qk, overview)
        return out.transpose(0, 1).unsqueeze(0).to(query.dtype).contiguous()

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                softcap: float | None) -> torch.Tensor:
        H, n, D = q.shape
        KV = k.shape[0]
        G = H // KV
        dev = q.device
        on_cpu = dev.type == "cpu"
        B = self.row_block if on_cpu else max(self.row_block, GPU_ROW_BLOCK)
        qs = q * scaling
        key_t = [k[g].t().contiguous() for g in range(KV)]  # [head_dim, n]
        positions = torch.arange(n, dtype=torch.float32, device=dev)
        values = [v[g].contiguous() for g in range(KV)]  # [n, v_head_dim]
        ones = torch.ones(G, 1, B, device=dev)
        out = torch.empty(H, n, v.shape[-1], device=dev)
        # [head, n] each, filled where the layer runs (rows are disjoint per worker), copied to the arrays below
        entropy, distance, waad = (torch.empty(H, n, device=dev) for _ in range(3))
        W = self.window
        lags = torch.arange(W, device=dev)
        lag_weight = (W - lags).to(torch.float32)
        blocks = list(range(0, n, B))
        split = self.split
        # the fused kernel: CPU only, values of the queries' head size (not MLA's v_head_dim)
        kernel = fused.load() if self.use_kernel and on_cpu and v.shape[-1] == D else None
        no_response = torch.empty(0, dtype=torch.float64)
        workers = self.workers if on_cpu else 1

        def work(worker: int) -> tuple[torch.Tensor, torch.Tensor | None, _Pools]:
            with torch.inference_mode():  # thread-local: a worker thread does not inherit the caller's mode
                return blocks_of(worker)

        def blocks_of(worker: int) -> tuple[torch.Tensor, torch.Tensor | None, _Pools]:
            colsum = torch.zeros(H, n, dtype=torch.float64, device=dev)
            colsum_resp = torch.zeros(H, n, dtype=torch.float64, device=dev) if split else None
            pools = _Pools(H, n, (OVERVIEW_BINS, HEAD_OVERVIEW_BINS), dev)
            # interleaved blocks: later rows cost more, so each worker gets a fair share
            for r0 in blocks[worker :: workers]:
                r1 = min(n, r0 + B)
                rows = r1 - r0
                if kernel is not None:  # the same computation, fused (capture/engine/fused.cpp)
                    for g in range(KV):
                        hs = slice(g * G, (g + 1) * G)
                        kernel.attend_rows(qs[hs, r0:r1], key_t[g], values[g], r0, out[hs, r0:r1],
                                           entropy[hs, r0:r1], distance[hs, r0:r1], waad[hs, r0:r1], colsum[hs],
                                           colsum_resp[hs] if split else no_response, split or n,
                                           pools.maps[0][hs], pools.sizes[0], pools.maps[1][hs], pools.sizes[1],
                                           W, softcap or 0.0, fused.QK_TILE)
                    continue
                row_pos = positions[r0:r1]
                idx = (torch.arange(r0, r1, device=dev)[:, None] - lags[None, :])  # [rows, W]: keys i - k
                valid = (idx >= 0).to(torch.float32) * lag_weight
                idx = idx.clamp(min=0)
                for g in range(KV):
                    hs = slice(g * G, (g + 1) * G)
                    qb = qs[hs, r0:r1].reshape(G * rows, D)
                    s = torch.mm(qb, key_t[g][:, :r1])  # [G*rows, r1]
                    if softcap is not None:
                        s.div_(softcap).tanh_().mul_(softcap)
                    s3 = s.view(G, rows, r1)
                    s3[:, :, r0:r1].masked_fill_(_upper(rows, dev), NEG)
                    per_row = pools.bin_logits(s, r1)
                    row_max = per_row[pools.fine].amax(-1)  # [G*rows]
                    w = torch.softmax(s, -1)  # [G*rows, r1] float32
                    out[hs, r0:r1] = torch.mm(w, values[g][:r1]).view(G, rows, D)
                    lse = row_max - torch.log(pools.row_max_weight(per_row, w, r1))
                    pools.fold(hs, G, r0, r1, per_row, lse)
                    weighted = s.mul_(w).sum(-1)  # sum_j w_ij s_ij; masked keys give 0 * NEG = 0
                    entropy[hs, r0:r1] = (lse - weighted).view(G, rows)
                    distance[hs, r0:r1] = row_pos[None, :] - torch.mv(w, positions[:r1]).view(G, rows)
                    w3 = w.view(G, rows, r1)
                    band = torch.gather(w3, 2, idx.unsqueeze(0).expand(G, rows, W))  # [G, rows, W]
                    waad[hs, r0:r1] = W - (band * valid).sum(-1)
                    colsum[hs, :r1] += torch.bmm(ones[:, :, :rows], w3).view(G, r1)
                    if split is not None and r1 > split:
                        first = max(split - r0, 0)
                        colsum_resp[hs, :r1] += torch.bmm(ones[:, :, first:rows], w3[:, first:]).view(G, r1)
            return colsum, colsum_resp, pools

        if self._pool is None or workers == 1:
            results = [work(0)]
        else:
            with one_thread():  # each worker runs its ops inline; the workers give the parallelism
                results = list(self._pool.map(work, range(self.workers)))
        colsum = sum(r[0] for r in results)
        self.arrays["colsum"][layer] = to_host(colsum)
        if split:
            self.arrays["colsum_response"][layer] = to_host(sum(r[1] for r in results))
        for name, found in (("entropy", entropy), ("distance", distance), ("waad", waad)):
            self.arrays[name][layer] = to_host(found)
        pools = results[0][2]
        for other in results[1:]:
            for mine, theirs in zip(pools.maps, other[2].maps):
                torch.maximum(mine, theirs, out=mine)
        self._overviews[layer] = to_host(pools.maps[0].to(torch.float16))
        self.head_overview[layer] = to_host(pools.maps[1].to(torch.float16))
        return out


__all__ = ["DEFAULT_QK_THRESHOLD", "QKRecorder", "ROW_BLOCK", "WAAD_WINDOW", "choose_layout", "qk_threshold"]
