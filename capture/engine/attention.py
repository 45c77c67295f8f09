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

The decision is per layer: a layer with no attention-level edit (and nothing recorded) stays on
SDPA even when other layers are edited.  Output-level edits (`scale`, `add`) and the analytics'
`head_gates` act in the o_proj pre-hook, so they never leave the fast path.

Attention-level edits (core.interventions for the ops, position sets and composition order) are
applied per head, vectorised over the heads that share an op and position sets, on each row block:
logit and window on the scores, softmax, then redistribute, then mix.

Sinks ("sinks" key sets) are detected once per session and layer from the prompt's prefill rows
(ACT, METHODS §2.1) and reused by every later call: the KV-cache decode steps of a generate call use
the prefill's sinks, and the adapter hands generation's `Session.sink_scores` to the recorded pass,
so generation and capture edit the very same keys.

The active state lives in a `Session`, set for the duration of a `with session(...)` block (a
ContextVar, so concurrent Streamlit threads do not see each other's sessions).  A session can carry
one intervention for the whole batch and one more per batch row (`row_interventions`), so a sweep
runs B variants in one forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from capture.engine import fused
from core.errors import InterventionError
from core.interventions import ATTENTION_OPS, OUTPUT_OPS, HeadEdit, Intervention, parse_positions, sink_set
from core.types import OVERVIEW_BINS
from core.layouts import pack_offset, unpack_tril

IMPLEMENTATION = "headscope"
ROW_BLOCK = 256  # query rows per block: keeps one block's fp32 scores small and cache-friendly


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
        self._buffers: dict[int, np.ndarray] = {}
        self._overviews: dict[int, torch.Tensor] = {}
        self._rows_done: dict[int, int] = {}
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

    def record(self, layer: int, call: "_Call") -> torch.Tensor | None:
        """Compute and record one whole plain layer with the fused kernel (capture/engine/fused.cpp): scores,
        softmax, fp16 maps, thumbnail and output in one pass per tile of rows.  Returns
        attn_output  # [batch 1, query, head, head_dim], or None when the kernel is not built or the
        call is not one it takes (the caller then computes the layer block by block with `take`)."""
        kernel = fused.load() if self.use_kernel else None
        if kernel is None or call.batch != 1 or call.query.dtype != torch.float32 or call.n_q != call.n_k:
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
            self._buffers[layer] = np.empty((self.n_heads, width), dtype=np.float16)
            bins = min(self.overview_bins, n)
            self._overviews[layer] = torch.zeros(self.n_heads, bins, bins)
            self._rows_done[layer] = 0
            if layer in self.prefix:
                self._seed(layer, n, self.prefix[layer])
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

    def _seed(self, layer: int, n: int, packed: np.ndarray) -> None:
        """Start layer `layer` of an n-token pass with the rows an earlier pass recorded
        (packed  # [head, p(p+1)/2] float16): copied in, and pooled into the overview."""
        rows = (math.isqrt(8 * packed.shape[1] + 1) - 1) // 2  # p, from p (p + 1) / 2
        self._buffers[layer][:, : packed.shape[1]] = packed
        self._rows_done[layer] = self.n_heads * rows
        dense = torch.from_numpy(unpack_tril(packed, rows)).float()  # [head, prefix, prefix]
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
def _tril_block_index(first_row: int, n_rows: int, n_keys: int) -> torch.Tensor:
    """Flat indices into a [rows, keys] block of the lower-triangle entries, in packed row order."""
    rows = torch.arange(n_rows)
    lengths = first_row + rows + 1  # row first_row+i keeps keys 0..first_row+i
    row_of = torch.repeat_interleave(rows, lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    col = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return row_of * n_keys + col


# ---- the session: what is active during one forward / generate call --------------------------------

@dataclass
class _Group:
    """Edits of one op with the same position sets, vectorised over the heads they touch.

    `rows` selects batch rows (slice(None): every row; slice(b, b+1): row b's own intervention).
    """

    op: str
    keys: str
    queries: str
    mode: str
    rows: slice
    heads: torch.Tensor  # long [n]
    values: torch.Tensor  # float32 [n]
    directions: torch.Tensor | None = None  # float32 [n, head_dim] (add)


@dataclass
class _LayerPlan:
    """One layer's edits, grouped by stage in composition order (core.interventions docstring)."""

    stages: dict[str, list[_Group]]  # "logit" | "window" | "redistribute" | "mix" -> groups in order
    output: list[_Group]  # scale / add, in per-head tuple order
    max_head: int = -1

    @property
    def attention(self) -> bool:
        return any(self.stages.values())

    @property
    def pre_softmax(self) -> bool:
        return bool(self.stages["logit"] or self.stages["window"])

    @property
    def needs_sinks(self) -> bool:
        return any(sink_set(g.keys) for groups in self.stages.values() for g in groups)


def _rounds(edits: list[HeadEdit], rows: slice) -> list[_Group]:
    """Group edits into vectorised groups without changing any one head's order of edits.

    Round r holds each head's r-th edit; inside a round, edits with the same op and position sets
    become one group.  Heads are independent, so this equals applying the edits one by one.
    """
    per_head: dict[int, list[HeadEdit]] = {}
    for e in edits:
        per_head.setdefault(e.head, []).append(e)
    groups: list[_Group] = []
    depth = max((len(v) for v in per_head.values()), default=0)
    for r in range(depth):
        sigs: dict[tuple, list[HeadEdit]] = {}
        for head_edits in per_head.values():
            if r < len(head_edits):
                e = head_edits[r]
                sigs.setdefault((e.op, e.keys, e.queries, e.mode), []).append(e)
        for (op, keys, queries, mode), members in sigs.items():
            dirs = None
            if op == "add":
                dims = {len(e.direction) for e in members}
                if len(dims) != 1:
                    raise InterventionError("add directions of one layer must all have the same length.")
                dirs = torch.tensor([e.direction for e in members], dtype=torch.float32)
            groups.append(_Group(op=op, keys=keys, queries=queries, mode=mode, rows=rows,
                                 heads=torch.tensor([e.head for e in members], dtype=torch.long),
                                 values=torch.tensor([e.value for e in members], dtype=torch.float32),
                                 directions=dirs))
    return groups


def _layer_plan(sources: list[tuple[slice, tuple[HeadEdit, ...]]]) -> _LayerPlan:
    stages: dict[str, list[_Group]] = {op: [] for op in ATTENTION_OPS}
    output: list[_Group] = []
    max_head = -1
    for rows, edits in sources:
        for op in ATTENTION_OPS:
            stage = [e for e in edits if e.op == op]
            if op == "window":
                heads = [e.head for e in stage]
                if any(e.mode == "mean" for e in stage) and len(heads) != len(set(heads)):
                    raise InterventionError("A head with a mean-token window can have no other window edit.")
            stages[op].extend(_rounds(stage, rows))
        output.extend(_rounds([e for e in edits if e.op in OUTPUT_OPS], rows))
        max_head = max([max_head] + [e.head for e in edits])
    return _LayerPlan(stages=stages, output=output, max_head=max_head)


@dataclass
class Session:
    """What the attention function and the output hooks do during one forward or generate call.

    - `intervention` applies to every batch row; `row_interventions[b]` (if given) applies to batch
      row b on top of it (its edits follow the shared ones in the composition order).
    - `sink_scores[layer]`  # [batch, head, prompt] ACT's s_j (METHODS §2.1), computed once from
      the prompt's prefill rows the first time an edit needs `sinks` in that layer, then reused by
      every later call of the session (KV-cache decode steps); hand it to a later session
      (`session(sink_scores=...)`) to reuse the same sinks in a recorded pass.
    - `head_outputs(layer, z)` is called with z  # [batch, query, head, head_dim] as it enters the
      output projection (after attention-level edits, before gates and output edits).
    """

    intervention: Intervention = Intervention()
    recorder: Recorder | None = None
    spans: dict[str, range] = field(default_factory=dict)
    # per-layer multiplicative gates on head outputs, gate  # [batch, head]; one row per batch item, so a
    # batch can ablate a different head in each row (ablation sweeps) and gates can carry gradients
    # (Michel et al. head importance)
    head_gates: dict[int, torch.Tensor] = field(default_factory=dict)
    row_interventions: tuple[Intervention, ...] | None = None
    sink_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    head_outputs: Callable[[int, torch.Tensor], None] | None = None
    # query positions of the current call per layer, set by the attention function, read by the o_proj hook
    query_positions: dict[int, range] = field(default_factory=dict)
    _plans: dict[int, _LayerPlan] = field(default_factory=dict, repr=False)
    _sink_masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def attention_edits(self, layer: int) -> tuple[HeadEdit, ...]:
        """Attention-level edits of `layer`, shared and per-row together."""
        return tuple(e for e in self._all_edits(layer) if e.op not in OUTPUT_OPS)

    def output_edits(self, layer: int) -> tuple[HeadEdit, ...]:
        return tuple(e for e in self._all_edits(layer) if e.op in OUTPUT_OPS)

    def _all_edits(self, layer: int) -> tuple[HeadEdit, ...]:
        edits = self.intervention.for_layer(layer)
        for iv in self.row_interventions or ():
            edits += iv.for_layer(layer)
        return edits

    def plan(self, layer: int) -> _LayerPlan:
        found = self._plans.get(layer)
        if found is None:
            sources = [(slice(None), self.intervention.for_layer(layer))]
            for b, iv in enumerate(self.row_interventions or ()):
                sources.append((slice(b, b + 1), iv.for_layer(layer)))
            found = self._plans[layer] = _layer_plan(sources)
        return found

    def check_batch(self, batch: int) -> None:
        if self.row_interventions is not None and batch != len(self.row_interventions):
            raise InterventionError(
                f"The batch has {batch} rows but {len(self.row_interventions)} row interventions were given; "
                "give one per batch row."
            )

    def prompt_length(self) -> int | None:
        prompt = self.spans.get("prompt")
        return None if prompt is None else prompt.stop


_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("headscope_session", default=None)


@contextlib.contextmanager
def session(intervention: Intervention = Intervention(), recorder: Recorder | None = None,
            spans: dict[str, range] | None = None,
            head_gates: dict[int, torch.Tensor] | None = None,
            row_interventions: list[Intervention] | tuple[Intervention, ...] | None = None,
            sink_scores: dict[int, torch.Tensor] | None = None,
            head_outputs: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[Session]:
    """Make an intervention (and a recorder, head gates ...) active for the model calls inside the block.

    intervention       applies to every batch row.
    row_interventions  one Intervention per batch row, applied to that row only (after the shared
                       edits): B variants in one forward, e.g. a batched uniform-ablation sweep
                           ivs = [uniform_ablation([(l, h)]) for l, h in heads]
                           with session(row_interventions=ivs):
                               model(input_ids=ids.expand(len(ivs), -1))
                       A call whose batch size differs from len(row_interventions) raises.
    spans              named position ranges ("prompt", "response", ...) that position sets refer to;
                       "prompt" also fixes the rows `sinks` is detected on and the `last` query set.
    head_gates         layer -> gate  # [batch, head], multiplies head outputs (differentiable).
    sink_scores        sink scores from an earlier session over the same prompt (`Session.sink_scores`),
                       so generation and the recorded pass use the very same sink sets.
    head_outputs       callback(layer, z) receiving each layer's head outputs (steering directions).
    """
    rows = None if row_interventions is None else tuple(row_interventions)
    for iv in (intervention, *(rows or ())):
        if not isinstance(iv, Intervention):
            raise InterventionError("Interventions must be core.interventions.Intervention objects.")
    active = Session(intervention=intervention, recorder=recorder, spans=dict(spans or {}),
                     head_gates=dict(head_gates or {}), row_interventions=rows,
                     sink_scores=dict(sink_scores or {}), head_outputs=head_outputs)
    token = _SESSION.set(active)
    try:
        yield active
    finally:
        _SESSION.reset(token)


def current_session() -> Session | None:
    return _SESSION.get()


# ---- the attention function -------------------------------------------------------------------------

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


class _Call:
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


def headscope_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """query  # [batch, head, query, head_dim]; key, value  # [batch, kv_head, key, head_dim].

    Returns attn_output  # [batch, query, head, head_dim], as transformers' attention functions do.
    """
    active = _SESSION.get()
    layer = getattr(module, "headscope_layer", None)
    if active is None or layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    n_q, n_k = query.shape[2], key.shape[2]
    active.query_positions[layer] = range(n_k - n_q, n_k)
    active.check_batch(query.shape[0])
    plan = active.plan(layer)
    if plan.max_head >= query.shape[1]:
        raise InterventionError(f"An edit names head {plan.max_head} of layer {layer}, which has {query.shape[1]} heads.")
    recording = active.recorder is not None
    if not recording and not plan.attention:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    attend = getattr(active.recorder, "attend", None)  # a recorder that computes attention itself
    if attend is not None and not plan.attention:  # (capture.engine.longctx.QKRecorder: the long-context layout)
        return attend(layer, module, query, key, value, attention_mask, scaling, kwargs), None

    call = _Call(module, query, key, value, attention_mask, scaling, kwargs)
    record = getattr(active.recorder, "record", None)  # a recorder that takes whole layers (Recorder)
    if record is not None and not plan.attention:
        attn_output = record(layer, call)
        if attn_output is not None:
            return attn_output, None
    sinks, first_block = _sink_scores(active, layer, call) if plan.needs_sinks else (None, None)
    attn_output = torch.empty(call.batch, call.n_heads, n_q, value.shape[-1], dtype=query.dtype)
    for r0 in range(0, n_q, ROW_BLOCK):
        r1 = min(n_q, r0 + ROW_BLOCK)
        rows, k_end = r1 - r0, call.k_end(r1)
        if plan.attention:
            plain = first_block if r0 == 0 and not plan.pre_softmax else None  # the sink pass's softmax
            scores = None if plain is not None else call.scores(r0, r1)
            weights = _edited_weights(call, plan, active, layer, r0, r1, scores, sinks, plain).to(query.dtype)
            first_block = None
        else:
            scores = call.scores(r0, r1)  # [batch, head, rows, key]
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [batch, head, rows, key]
        del scores
        if recording:  # a pass continuing from a cache (offset > 0) records the rows after it
            active.recorder.take(layer, 0, call.offset + r0, n_k, weights[0])
        block_out = torch.matmul(weights.view(call.batch, call.n_kv, call.group * rows, k_end), value[:, :, :k_end])
        attn_output[:, :, r0:r1] = block_out.view(call.batch, call.n_heads, rows, -1)
    return attn_output.transpose(1, 2).contiguous(), None


@lru_cache(maxsize=8)
def _upper(n: int) -> torch.Tensor:
    """[n, n] True strictly above the diagonal: the future keys inside a diagonal block."""
    return torch.ones(n, n, dtype=torch.bool).triu(1)


# ---- sinks (ACT detection on the prompt's prefill rows) ----------------------------------------------

def _sink_scores(active: Session, layer: int, call: _Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s  # [batch, head, prompt], plain): ACT's s_j = sum_i A_ij / (N - j) over the prompt rows
    (METHODS §2.1), and, when the call is exactly those rows in one block, their unedited fp32 softmax
    (the caller edits it instead of computing it again).

    Computed once per session and layer, on the unedited softmax of this layer over the prompt's
    prefill rows (rows 0 .. P-1, P = the "prompt" span, else the whole first call), then reused: the
    KV-cache decode steps of the same generate call see the same sink sets, and `capture.api`
    hands the scores of generation to the recorded pass.  N - j is counted from the mask, so padded
    keys never count.
    """
    found = active.sink_scores.get(layer)
    if found is not None:
        if found.shape[0] != call.batch:
            raise InterventionError("The stored sink scores were computed for another batch size.")
        return found, None
    if call.offset != 0:
        raise InterventionError(
            "Sink positions are detected on the prompt's prefill; this call starts mid-sequence "
            f"(position {call.offset}) and the session has no sinks for layer {layer}."
        )
    n_prompt = min(active.prompt_length() or call.n_q, call.n_q)
    mass = torch.zeros(call.batch, call.n_heads, n_prompt)
    seen = torch.zeros(1, 1, n_prompt)
    weights = None
    for r0 in range(0, n_prompt, ROW_BLOCK):
        r1 = min(n_prompt, r0 + ROW_BLOCK)
        weights = torch.softmax(call.scores(r0, r1), dim=-1, dtype=torch.float32)  # [batch, head, rows, key]
        visible = call.visible(r0, r1)  # [batch|1, 1, rows, key]
        mass += (weights * visible)[..., :n_prompt].sum(2)
        seen = seen + visible[..., :n_prompt].sum(2, dtype=torch.float32)  # [batch|1, 1, key]
    scores = mass / seen.clamp(min=1)
    active.sink_scores[layer] = scores
    whole = n_prompt == call.n_q <= ROW_BLOCK
    return scores, (weights if whole else None)


def sink_mask(scores: torch.Tensor, threshold: float, include_first: bool) -> torch.Tensor:
    """scores  # [..., key] -> bool [..., key]: s_j > threshold, the first detected sink dropped unless asked."""
    detected = scores > threshold
    if not include_first:
        first = detected.to(torch.uint8).argmax(-1, keepdim=True)  # the first True (0 if none: then it is False)
        detected = detected.scatter(-1, first, False)
    return detected


# ---- attention-level edits -------------------------------------------------------------------------

def _key_mask(spec: str, group: _Group, call: _Call, active: Session, layer: int, sinks: torch.Tensor | None,
              k_end: int) -> torch.Tensor:
    """The key set `spec` as a bool mask broadcastable to [rows-of-batch, heads, rows, k_end]."""
    found = sink_set(spec)
    if found is not None:
        cache_key = (layer, spec, id(group))  # sinks are fixed for the session: threshold them once
        mask = active._sink_masks.get(cache_key)
        if mask is None:
            threshold, include_first = found
            mask = sink_mask(sinks[group.rows][:, group.heads], threshold, include_first).unsqueeze(2)
            active._sink_masks[cache_key] = mask  # [nb, nh, 1, prompt]
        n = mask.shape[-1]
        return torch.nn.functional.pad(mask, (0, k_end - n)) if n < k_end else mask[..., :k_end]
    keys = torch.zeros(k_end, dtype=torch.bool)
    if spec == "all":
        keys[:] = True
    else:
        wanted = parse_positions(spec, call.n_k, active.spans)
        keys[wanted.start:min(wanted.stop, k_end)] = True
    return keys.view(1, 1, 1, k_end)


def _query_mask(spec: str, positions: torch.Tensor, n_total: int, active: Session) -> torch.Tensor | None:
    """bool [rows] over the call's rows (absolute positions `positions`), or None for every row."""
    if spec == "all":
        return None
    if spec == "last":
        n_prompt = active.prompt_length()
        return positions >= (n_prompt - 1 if n_prompt else n_total - 1)
    wanted = parse_positions(spec, n_total, active.spans)
    return (positions >= wanted.start) & (positions < wanted.stop)


def _edited_weights(call: _Call, plan: _LayerPlan, active: Session, layer: int, r0: int, r1: int,
                    scores: torch.Tensor | None, sinks: torch.Tensor | None,
                    plain: torch.Tensor | None = None) -> torch.Tensor:
    """weights  # [batch, head, rows, key] float32: softmax with the layer's attention-level edits.

    Order: logit, window (pre-softmax), softmax, redistribute, mix (core.interventions).
    `plain` is the unedited softmax of the block when the caller has it already (then `scores` is
    None, and the plan has no pre-softmax stage).
    """
    k_end = call.k_end(r1)
    positions = call.positions(r0, r1)
    visible = call.visible(r0, r1)  # [batch|1, 1, rows, key]
    neg_inf = float("-inf")

    def queries(group: _Group) -> torch.Tensor | None:
        q = _query_mask(group.queries, positions, call.n_k, active)
        return None if q is None else q.view(1, 1, -1, 1)

    def keys(group: _Group) -> torch.Tensor:
        return _key_mask(group.keys, group, call, active, layer, sinks, k_end)

    def rows_of(x: torch.Tensor, group: _Group) -> torch.Tensor:
        return x[group.rows] if x.shape[0] > 1 else x

    compensation = []
    if plan.pre_softmax:
        original = scores.clone()
        for group in plan.stages["logit"]:
            s = scores[group.rows][:, group.heads]  # [nb, nh, rows, key]
            sel = keys(group)
            q = queries(group)
            if q is not None:
                sel = sel & q
            bias = group.values.to(s.dtype).view(1, -1, 1, 1)
            scores[group.rows][:, group.heads] = torch.where(sel, s + bias, s)
        for group in plan.stages["window"]:
            s = scores[group.rows][:, group.heads]
            recent = (positions[:, None] - torch.arange(k_end)[None, :]).view(1, 1, -1, k_end)  # i - j
            if not call.causal:  # a bidirectional encoder: the window reaches both ways, |i - j| < W
                recent = recent.abs()
            keep = keys(group) | (recent < group.values.view(1, -1, 1, 1))
            drop = ~keep & rows_of(visible, group) & (s > neg_inf)
            q = queries(group)
            if q is not None:
                drop = drop & q
            if group.mode == "mean":  # RazorAttention compensation token: mean key and mean value of the dropped keys
                count = drop.sum(-1)  # [nb, nh, rows]
                kv = torch.div(group.heads, call.group, rounding_mode="floor")
                key_vecs = call.key[group.rows][:, kv, :k_end]  # [nb, nh, key, head_dim]
                k_mean = torch.matmul(drop.to(key_vecs.dtype), key_vecs) / count.clamp(min=1).unsqueeze(-1).to(key_vecs.dtype)
                q_vec = call.query[group.rows][:, group.heads, r0:r1]  # [nb, nh, rows, head_dim]
                logit = (q_vec * k_mean).sum(-1) * call.scaling
                if call.softcap is not None:
                    logit = torch.tanh(logit / call.softcap) * call.softcap
                compensation.append((group, drop, count, logit.masked_fill(count == 0, neg_inf)))
            scores[group.rows][:, group.heads] = s.masked_fill(drop, neg_inf)
        dead = torch.isneginf(scores).all(-1, keepdim=True)  # a row with every key masked out by the edits
        if dead.any():  # keeps its unedited scores
            scores = torch.where(dead, original, scores)
        del original
    weights = plain if plain is not None else torch.softmax(scores, dim=-1, dtype=torch.float32)
    for group, drop, count, logit in compensation:
        s = scores[group.rows][:, group.heads].float()
        w = torch.softmax(torch.cat([s, logit.float().unsqueeze(-1)], -1), dim=-1)
        spread = w[..., -1:] * drop / count.clamp(min=1).unsqueeze(-1)  # the token's mass, spread over its keys
        weights[group.rows][:, group.heads] = w[..., :-1] + spread

    for group in plan.stages["redistribute"]:
        # rows sum to 1 and invisible keys weigh 0, so the visible rest is the row sum minus the set's mass
        w = weights[group.rows][:, group.heads]  # [nb, nh, rows, key]
        taken = keys(group)
        mass = (w * taken).sum(-1, keepdim=True)  # [nb, nh, rows, 1]
        rest = w.sum(-1, keepdim=True) - mass
        receivers = ~taken
        if group.mode.startswith("to:"):  # the freed mass goes to this key set only (VAR: the image tokens)
            receivers = receivers & _key_mask(group.mode[3:], group, call, active, layer, sinks, k_end)
            rest = (w * receivers).sum(-1, keepdim=True)
        beta = group.values.view(1, -1, 1, 1)
        target = torch.minimum(beta * mass, mass + rest)  # beta > 1 takes at most all of the rest
        change = (mass > 0) & (rest > 0)  # nothing to move, or nowhere to put it: the row stays
        q = queries(group)
        if q is not None:
            change = change & q
        factor_taken = torch.where(change, target / mass.clamp(min=1e-30), 1.0)
        factor_rest = torch.where(change, (mass + rest - target) / rest.clamp(min=1e-30), 1.0)
        factor = torch.where(taken, factor_taken, torch.where(receivers, factor_rest, torch.ones_like(factor_rest)))
        weights[group.rows][:, group.heads] = w * factor

    if plan.stages["mix"]:
        # the keys each row can see: the mask's, less those the pre-softmax edits removed
        live = visible if not plan.pre_softmax else visible & ((scores > neg_inf) | (weights > 0))
    for group in plan.stages["mix"]:
        w = weights[group.rows][:, group.heads]
        if group.keys == "all":  # identity: each row attends to its own position
            target = (torch.arange(k_end)[None, :] == positions[:, None]).to(w.dtype).view(1, 1, -1, k_end)
            has_target = None
        else:
            vis = rows_of(live, group)
            vis = vis[:, group.heads] if vis.shape[1] > 1 else vis
            allowed = vis if group.keys == "uniform" else vis & keys(group)
            count = allowed.sum(-1, keepdim=True)
            target = allowed / count.clamp(min=1)
            has_target = count > 0
        u = group.values.view(1, -1, 1, 1)
        mixed = (1 - u) * w + u * target
        change = has_target
        q = queries(group)
        if q is not None:
            change = q if change is None else change & q
        weights[group.rows][:, group.heads] = mixed if change is None else torch.where(change, mixed, w)
    return weights


# ---- head outputs (o_proj pre-hook) ------------------------------------------------------------------

def scale_head_outputs(layer: int, n_heads: int) -> Callable:
    """A forward pre-hook for a layer's output projection: head gates, then the `scale` and `add` edits.

    The projection's input is the concatenation of the head outputs z (METHODS.md notation):
    z  # [batch, query, head * head_dim]; `scale` multiplies one head's slice by `value`, `add` adds
    `value * direction` to it, on the rows of `queries`.  Works on the SDPA fast path too.
    """

    def hook(_module: torch.nn.Module, args: tuple) -> tuple | None:
        active = _SESSION.get()
        if active is None:
            return None
        plan = active.plan(layer)
        gates = active.head_gates.get(layer)
        if not plan.output and gates is None and active.head_outputs is None:
            return None
        (z, *rest) = args
        batch, n_q, width = z.shape
        z = z.view(batch, n_q, n_heads, width // n_heads)  # [batch, query, head, head_dim]
        if active.head_outputs is not None:
            active.head_outputs(layer, z)
            if not plan.output and gates is None:
                return None
        active.check_batch(batch)
        if plan.max_head >= n_heads:
            raise InterventionError(f"An edit names head {plan.max_head} of layer {layer}, which has {n_heads} heads.")
        if gates is not None:
            z = z * gates.to(z.dtype)[:, None, :, None]  # gate  # [batch, head]
        else:
            z = z.clone()
        span = active.query_positions.get(layer, range(n_q))
        positions = torch.arange(span.start, span.stop)
        for group in plan.output:
            sub = z[group.rows]  # view [nb, query, head, head_dim]
            if group.op == "scale":
                factor = torch.ones(n_heads, dtype=z.dtype)
                factor[group.heads] = group.values.to(z.dtype)
                edited = sub * factor.view(1, 1, n_heads, 1)
            else:
                if group.directions.shape[1] != z.shape[-1]:
                    raise InterventionError(
                        f"An add direction on layer {layer} has {group.directions.shape[1]} numbers; "
                        f"the heads have {z.shape[-1]} dimensions."
                    )
                delta = torch.zeros(n_heads, z.shape[-1], dtype=z.dtype)
                delta[group.heads] = (group.values[:, None] * group.directions).to(z.dtype)
                edited = sub + delta.view(1, 1, n_heads, -1)
            q = _query_mask(group.queries, positions, span.stop, active)
            if q is not None:
                edited = torch.where(q.view(1, -1, 1, 1), edited, sub)
            sub.copy_(edited)
        return (z.reshape(batch, n_q, width), *rest)

    return hook


def register() -> None:
    """Register "headscope" with transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, headscope_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
