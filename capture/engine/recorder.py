"""The recorder: a recorded pass's attention weights, turned into fp16 maps layer by layer.

The attention function (capture.engine.attention) hands the session's recorder either a whole plain
layer (`Recorder.record`: the fused kernel of capture/engine/fused.cpp, CPU only) or the float32 softmax
rows block by block as it computes them (`Recorder.take`); the recorder turns them into fp16 straight
away, packed as core.layouts describes (the lower triangle for a causal model), and pools the block-max
overview the model view draws.  It works where the weights are: on a GPU the layer's buffer and
overview stay on the device until the layer is complete, then go to host memory in one pinned copy
(capture.engine.device.to_host) and on to the writer, which streams them while the next layer runs.  `BranchRecorder` splits a pass over several branches after a shared prefix into one
recorder per branch; `small_pass` and `one_thread` keep the bookkeeping of small passes cheap.
"""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
import torch

from capture.engine import fused
from capture.engine.call import AttentionCall
from capture.engine.device import to_host
from core.layouts import pack_offset, unpack_tril
from core.types import OVERVIEW_BINS


class Recorder:
    """Collects each layer's attention weights as fp16, and hands a finished layer to `on_layer`.

    It expects one full forward pass over the whole sequence (query length == key length), which is
    how `capture.api` records: generation first (fast path), then one pass over the final tokens.
    `layout` is "tril" (causal: packed lower triangle, see core.types) or "full".  With `prefix`
    (layer -> maps  # [head, p(p+1)/2] float16, tril only) the first p rows were recorded by an earlier
    pass over those tokens, and this pass continues from their key/value cache with the rest of the
    rows (probes.vlm_accuracy: one picture, many questions).
    Rows arrive in blocks (`take`); a layer is handed on as soon as all its heads' rows are in,
    as `on_layer(layer, maps, overview)` with overview  # [head, bins, bins] float16, the block-max
    thumbnail the model view draws (pooled here from the fp32 rows, nearly free).
    """

    def __init__(self, n_heads: int, layout: str, on_layer: Callable[[int, np.ndarray, np.ndarray], None],
                 overview_bins: int = OVERVIEW_BINS, defer: bool = False, use_kernel: bool = True,
                 prefix: dict[int, np.ndarray] | None = None):
        if prefix and layout != "tril":
            raise ValueError("A recorded prefix continues causal (tril) maps only.")
        self.n_heads = n_heads
        self.prefix = prefix or {}
        self.use_kernel = use_kernel  # whole plain layers through capture/engine/fused.cpp when it builds
        self.layout = layout
        self.on_layer = on_layer
        self.overview_bins = overview_bins
        self._buffers: dict[int, torch.Tensor] = {}  # [head, width] float16, on the weights' device
        self._overviews: dict[int, torch.Tensor] = {}
        self._rows_done: dict[int, int] = {}
        self._sink_shares: dict[int, torch.Tensor] = {}  # layer -> [head, n] float32 (models with sink logits)
        # a small pass (`small_pass`) keeps its blocks and does all the bookkeeping in `finish`, in one
        # single-threaded stretch instead of two thread-pool resizes per layer during the forward
        self._deferred: list[tuple] | None = [] if defer else None

    def take(self, layer: int, first_head: int, first_row: int, n: int, weights: torch.Tensor) -> None:
        """weights  # [heads_in_block, rows, key] for query heads first_head.. and rows first_row.. of an
        n-token pass; in the tril layout row r's keys beyond r are ignored."""
        if self._deferred is not None:
            self._deferred.append((layer, first_head, first_row, n, weights))
            return
        with one_thread():  # small bookkeeping ops: a second OpenMP thread only adds barrier waits
            self._take(layer, first_head, first_row, n, weights)

    def record(self, layer: int, call: AttentionCall) -> torch.Tensor | None:
        """Compute and record one whole plain layer with the fused kernel (capture/engine/fused.cpp): scores,
        softmax, fp16 maps, thumbnail and output in one pass per tile of rows.  Returns
        attn_output  # [batch 1, query, head, head_dim], or None when the kernel is not built or the
        call is not one it takes (the caller then computes the layer block by block with `take`)."""
        if not self.use_kernel or call.batch != 1 or call.query.dtype != torch.float32 or call.n_q != call.n_k \
                or call.device.type != "cpu" or call.sinks is not None or call.value.shape[-1] != call.head_dim:
            return None  # the kernel's values have the queries' head size (not MLA's v_head_dim)
        kernel = fused.load()
        if kernel is None:
            return None
        causal = self.layout == "tril"
        if not (call.implicit_causal if causal else (call.mask is None and not call.causal)):
            return None
        n = call.n_q
        maps = torch.empty(self.n_heads, n * (n + 1) // 2 if causal else n * n, dtype=torch.float16)
        bins = min(self.overview_bins, n)
        overview = torch.zeros(self.n_heads, bins, bins)  # [head, bins, bins] block maxima
        out = torch.empty(n, self.n_heads, call.value.shape[-1])  # [query, head, head_dim]
        kernel.record_layer(call.query[0], call.key[0], call.value[0], call.scaling, call.softcap or 0.0, causal,
                            maps, overview, -(-n // bins), out, fused.RECORD_TILE, fused.WHOLE_LAYER_BYTES)
        layer_maps = maps.numpy() if causal else maps.numpy().reshape(self.n_heads, n, n)
        self.on_layer(layer, layer_maps, overview.to(torch.float16).numpy())
        return out.unsqueeze(0)

    def sink_share(self, layer: int, first_row: int, n: int, share: torch.Tensor) -> None:
        """share  # [head, rows] float32: the softmax mass a learned sink logit took on rows first_row.. of an
        n-token pass (GPT-OSS; capture.engine.call.AttentionCall.softmax)."""
        found = self._sink_shares.get(layer)
        if found is None:
            found = self._sink_shares[layer] = torch.zeros(self.n_heads, n, device=share.device)
        found[:, first_row : first_row + share.shape[1]] = share

    def sink_shares(self) -> np.ndarray | None:
        """shares  # [layer, head, query] float32 of every layer, or None when the model has no sink logits."""
        if not self._sink_shares:
            return None
        return np.stack([to_host(self._sink_shares[layer]) for layer in sorted(self._sink_shares)])

    def finish(self) -> None:
        """Hand on the layers of a deferred pass (call it after the forward; a no-op otherwise)."""
        if not self._deferred:
            return
        blocks, self._deferred = self._deferred, []
        with one_thread():
            for block in blocks:
                self._take(*block)

    def _take(self, layer: int, first_head: int, first_row: int, n: int, weights: torch.Tensor) -> None:
        n_block, n_rows, n_keys = weights.shape
        if layer not in self._buffers:
            width = n * (n + 1) // 2 if self.layout == "tril" else n * n
            self._buffers[layer] = torch.empty(self.n_heads, width, dtype=torch.float16, device=weights.device)
            bins = min(self.overview_bins, n)
            self._overviews[layer] = torch.zeros(self.n_heads, bins, bins, device=weights.device)
            self._rows_done[layer] = 0
            if layer in self.prefix:
                self._seed(layer, n, self.prefix[layer])
        self._pool(layer, first_head, first_row, n, weights)
        out = self._buffers[layer][first_head : first_head + n_block]  # [heads_in_block, width]
        if self.layout == "tril":
            start = pack_offset(first_row)
            stop = pack_offset(first_row + n_rows)
            index = _tril_block_index(first_row, n_rows, n_keys, weights.device)
            out[:, start:stop] = weights.reshape(n_block, n_rows * n_keys).index_select(1, index)
        else:
            out[:, first_row * n : (first_row + n_rows) * n] = weights.reshape(n_block, n_rows * n)
        self._rows_done[layer] += n_block * n_rows
        if self._rows_done[layer] == self.n_heads * n:
            layer_maps = to_host(self._buffers.pop(layer))
            if self.layout == "full":
                layer_maps = layer_maps.reshape(self.n_heads, n, n)
            self.on_layer(layer, layer_maps, to_host(self._overviews.pop(layer).to(torch.float16)))

    def _seed(self, layer: int, n: int, packed: np.ndarray) -> None:
        """Start layer `layer` of an n-token pass with the rows an earlier pass recorded
        (packed  # [head, p(p+1)/2] float16): copied in, and pooled into the overview."""
        rows = (math.isqrt(8 * packed.shape[1] + 1) - 1) // 2  # p, from p (p + 1) / 2
        buffer = self._buffers[layer]
        buffer[:, : packed.shape[1]] = torch.from_numpy(np.asarray(packed)).to(buffer.device)
        self._rows_done[layer] = self.n_heads * rows
        dense = torch.from_numpy(unpack_tril(packed, rows)).float().to(buffer.device)  # [head, prefix, prefix]
        self._pool(layer, 0, 0, n, dense)

    def _pool(self, layer: int, first_head: int, first_row: int, n: int, weights: torch.Tensor) -> None:
        """Fold a block of rows into the layer's block-max overview (same blocks as core.types.max_pool).

        A block of whole bins is reduced as a view; otherwise a block that starts inside a bin is
        zero-padded at the top (zeros never win a max of weights) and ragged bins are max_pool2d's
        ceil mode."""
        pooled = self._overviews[layer]  # [head, bins, bins]
        bins = pooled.shape[1]
        size = -(-n // bins)
        n_block, n_rows, n_keys = weights.shape
        top = first_row % size  # rows of the first bin that an earlier block brought
        if top == 0 and n_rows % size == 0 and n_keys % size == 0:
            col_max = weights.view(n_block, n_rows, n_keys // size, size).amax(-1)  # [heads_in_block, rows, key bins]
            block_max = col_max.view(n_block, n_rows // size, size, -1).amax(2)  # [heads_in_block, n_bins, key bins]
        else:
            if top:
                weights = torch.nn.functional.pad(weights, (0, 0, top, 0))
            block_max = torch.nn.functional.max_pool2d(weights.unsqueeze(1), size, ceil_mode=True)[:, 0]
        n_block, n_bins, key_bins = block_max.shape
        if key_bins < bins:  # a causal block sees only the keys up to its last row
            block_max = torch.nn.functional.pad(block_max, (0, bins - key_bins))
        first_bin = first_row // size
        target = pooled[first_head : first_head + n_block, first_bin : first_bin + n_bins]
        torch.maximum(target, block_max, out=target)


class BranchRecorder:
    """Splits a pass that packs several branches after a shared, already recorded prefix (each branch
    sees the prefix and itself: capture.vlm.adapter.VlmAdapter.record_from) into one Recorder per
    branch, each given its branch's rows with the keys it sees, the prefix's and its own, in the
    coordinates of a pass over prefix + that branch alone."""

    def __init__(self, recorders: list[Recorder], prefix: int, lengths: list[int]):
        self.recorders = recorders
        self.prefix = prefix  # p: the cached rows before the first branch
        self.lengths = lengths  # tokens per branch, packed one after another from position p
        self.starts = [prefix + sum(lengths[:b]) for b in range(len(lengths))]

    def take(self, layer: int, first_head: int, first_row: int, n: int, weights: torch.Tensor) -> None:
        """weights  # [heads_in_block, rows, key] for packed rows first_row.. over the n packed keys."""
        rows = weights.shape[1]
        for recorder, start, m in zip(self.recorders, self.starts, self.lengths):
            lo, hi = max(first_row, start), min(first_row + rows, start + m)
            if lo < hi:  # causal within the branch: its rows up to hi - 1 see its keys start .. hi - 1
                keys = torch.cat([torch.arange(self.prefix), torch.arange(start, hi)])
                block = weights[:, lo - first_row : hi - first_row].index_select(-1, keys)
                recorder.take(layer, first_head, self.prefix + lo - start, self.prefix + m, block)

    def finish(self) -> None:
        for recorder in self.recorders:
            recorder.finish()


SMALL_PASS_BYTES = 64 * 2**20  # float32 weights of every layer kept until the end of the forward


def small_pass(n_layers: int, n_heads: int, n_tokens: int) -> bool:
    """True if every layer's float32 weights together fit in SMALL_PASS_BYTES (SmolLM2: up to ~240
    tokens): then the recorder defers its bookkeeping and the writer its writes to after the forward."""
    return n_layers * n_heads * n_tokens * n_tokens * 4 <= SMALL_PASS_BYTES


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block's torch ops on one thread (process-wide setting, restored after; switching costs ~10 us).

    Many small ops (packing, pooling, fp16 conversion of a 256-row block) gain nothing from torch's
    second OpenMP thread and, on a busy 2-core machine, wait for it at every op's barrier: 0.3 ms of
    recorder work per SmolLM2 layer took 36 ms with two threads while another process ran.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=256)
def _tril_block_index(first_row: int, n_rows: int, n_keys: int,
                      device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Flat indices into a [rows, keys] block of the lower-triangle entries, in packed row order."""
    if device.type != "cpu":
        return _tril_block_index(first_row, n_rows, n_keys).to(device)
    rows = torch.arange(n_rows)
    lengths = first_row + rows + 1  # row first_row+i keeps keys 0..first_row+i
    row_of = torch.repeat_interleave(rows, lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    col = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return row_of * n_keys + col
