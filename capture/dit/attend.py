"""One diffusers attention call as HeadScope runs it: the model's own output, the edits, the recorded map.

Every HeadScope DiT processor (capture.dit.attention for SD3 / SD3.5 / PixArt / DiT, and
capture.dit.families.flux and .sana) computes its queries, keys and values exactly as the diffusers
processor it replaces, then hands them to `attend`:

- no attention-level edit on the module: the diffusers processor's own attention call (`plain`), so the
  output is bit for bit the default processor's; when the layer is recorded, the map of the recorded
  batch row is computed on the side, block_rows query rows at a time, as softmax(q kᵀ · scale + mask)
  in float32 (Sana's linear attention: capture.dit.families.sana).  One exception: a recorded call of
  one batch row on a CPU (Flux's, Chroma's: no guidance batch) takes its output from those weights,
  weights @ values in float32, one pass where the model's call and the map were two (a tiny Flux
  capture at 20 steps: 1.49 -> 1.31 x the plain pipeline, bench/dit.py); its picture then matches the
  plain pipeline's within one 8-bit level, not bit for bit (tests/models/test_dit_pipelines.py).  On a
  GPU the model's own kernel always runs: its fused attention is where the time is saved there;
- attention-level edits (mix, logit, redistribute, window; capture.engine.edits): the weights are
  computed explicitly, row block by row block, with the edits applied per head and batch row (the
  session's row interventions: the perturbed branch of PAG / SoftPAG), and the output is weights @ values;
- output-level edits (scale, add) and head gates: capture.engine.head_outputs, on the concatenated head
  outputs before the output projection (for Flux's single-stream blocks, before `proj_out`).

Positions: a `Frame` says where the call's query rows and keys sit on the capture's token axis
([image, text] in the model's order), so position sets ("image", "span:text", "66:69") mean the same
tokens in every module.  Cross-attention families (PixArt, Sana) have two modules per layer: an edit
whose keys are all text tokens acts on the block's cross-attention (its heads), every other edit on
its self-attention; the cross view sees the spans and key ranges shifted to its text-only key axis.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from capture.engine.call import ROW_BLOCK, AttentionCall
from capture.engine.edits import edited_weights
from capture.engine.head_outputs import scale_head_outputs
from capture.engine.session import LayerPlan, Session, current_session
from core.errors import InterventionError
from core.interventions import ATTENTION_OPS, HeadEdit, Intervention, parse_positions, sink_set

KINDS = ("joint", "self", "cross")
BLOCK_ELEMENTS = 1 << 21  # a recorded map's row block may hold this many scores (8 MB in float32): `block_rows`
LINEAR_EPSILON = 1e-15  # Sana's linear attention: out_i = Σ_j φ(q_i)·φ(k_j) v_j / (Σ_j φ(q_i)·φ(k_j) + 1e-15)

_RECORDER: contextvars.ContextVar[object | None] = contextvars.ContextVar("headscope_dit_recorder", default=None)


@contextlib.contextmanager
def recording(recorder) -> Iterator[object]:
    """Make `recorder` (capture.dit.attention's recorder protocol) the one the processors hand their maps to."""
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def current_recorder():
    return _RECORDER.get()


@dataclass(frozen=True)
class Frame:
    """Where one module call sits on the capture's token axis: query rows from q0, keys from k0; `n`: how many of
    its first rows and keys are on the axis (None: all; Lumina 2's caption refiner: the unpadded caption, its
    padding masked beyond)."""

    q0: int = 0
    k0: int = 0
    n: int | None = None


def part_frame(part: str | None) -> Frame:
    """Where a refiner layer's call sits on the capture's token axis (Lumina 2, Z-Image; capture.dit.attention
    `refiner_part`): the current session's span of its part, "caption" (the text: its first len(text) rows and
    keys, the rest the caption's masked padding) or "image"; Frame() for a joint layer (None) or outside a run."""
    active = current_session()
    span = None if part is None or active is None else active.spans.get("text" if part == "caption" else "image")
    if span is None:
        return Frame()
    return Frame(span.start, span.start, len(span) if part == "caption" else None)


class _Cut:
    """A sink that takes the first `n` rows and keys of a module's map (`Frame.n`)."""

    def __init__(self, sink, n: int):
        self.sink, self.n = sink, n

    def rows(self, r0: int, weights: torch.Tensor) -> None:
        if r0 < self.n:
            self.sink.rows(r0, weights[:, :self.n - r0, :self.n])

    def close(self) -> None:
        self.sink.close()


class _Stub:
    """What capture.engine.call reads from a module: its layer, not causal."""

    is_causal = False

    def __init__(self, layer: int):
        self.headscope_layer = layer


# ---- which edits reach which module -------------------------------------------------------------

def _text_only(spec: str, spans: dict[str, range]) -> bool:
    """True when the key set `spec` names text tokens only (so it belongs to a cross-attention module)."""
    text = spans.get("text")
    if text is None or spec in ("all", "uniform", "image") or sink_set(spec) is not None:
        return False
    found = parse_positions(spec, text.stop, spans)
    return found is not None and len(found) > 0 and text.start <= found.start and found.stop <= text.stop


def _shifted(edit: HeadEdit, shift: int) -> HeadEdit:
    """The edit with a numeric key range moved onto a key axis that starts at capture position `shift`."""
    if not shift:
        return edit
    if ":" in edit.queries and not edit.queries.startswith("span:"):
        raise InterventionError("An edit on text keys of a cross-attention model names its query rows by span "
                                "(\"image\", \"all\"), not by position.")
    if ":" in edit.keys and not edit.keys.startswith("span:"):
        start, stop = edit.keys.split(":")
        keys = f"{int(start) - shift}:{int(stop) - shift}"
        return HeadEdit(layer=edit.layer, head=edit.head, op=edit.op, value=edit.value, keys=keys,
                        queries=edit.queries, direction=edit.direction, mode=edit.mode)
    return edit


def module_view(active: Session, kind: str, routed: bool, shift: int) -> Session:
    """The session as one module of a cross-attention family sees it: only the attention-level edits that
    act on it (text-keyed ones on the cross module, the rest on the self module), with positions moved by
    `shift` (the cross module's first key).  Joint-attention families use the session itself."""
    if not routed:
        return active

    def part(iv: Intervention) -> Intervention:
        wanted = (lambda e: _text_only(e.keys, active.spans)) if kind == "cross" else \
            (lambda e: not _text_only(e.keys, active.spans))
        return Intervention(edits=tuple(_shifted(e, shift) for e in iv.edits if e.op in ATTENTION_OPS and wanted(e)))

    spans = {name: range(r.start - shift, r.stop - shift) for name, r in active.spans.items()}
    rows = None if active.row_interventions is None else tuple(part(iv) for iv in active.row_interventions)
    return Session(intervention=part(active.intervention), spans=spans, row_interventions=rows)


# ---- the call ----------------------------------------------------------------------------------------

class Attend:
    """One module's HeadScope attention: the layer it counts as, its kind, and how it records and edits."""

    def __init__(self, layer: int, kind: str, n_heads: int, routed: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown attention kind {kind!r}")
        self.layer, self.kind, self.n_heads, self.routed = layer, kind, n_heads, routed
        self._output_hook = scale_head_outputs(layer, n_heads)
        self._view: tuple[Session, Session] | None = None

    def view(self, active: Session, shift: int) -> Session:
        if self._view is None or self._view[0] is not active:
            self._view = (active, module_view(active, self.kind, self.routed, shift))
        return self._view[1]

    def plan(self, active: Session | None, shift: int) -> tuple[Session | None, LayerPlan | None]:
        """The module's view of the session and its plan for this layer (None, None outside a session)."""
        if active is None:
            return None, None
        view = self.view(active, shift)
        plan = view.plan(self.layer)
        if plan.attention and plan.needs_sinks:
            raise InterventionError("Sink key sets (ACT) need a text prompt's prefill; name the DiT's tokens by "
                                    "span or position instead.")
        return view, plan

    def __call__(self, frame: Frame, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, scale: float, plain: Callable[[], torch.Tensor],
                 kernel: str = "softmax") -> torch.Tensor:
        """query, key, value  # [batch, head, n, head_dim] as the diffusers processor has them just before its
        attention call (normed, rotated); `mask` additive or bool, broadcastable to [batch, head, n_q, n_k];
        `plain()` is that processor's own attention call.  Returns hidden  # [batch, n_q, head * head_dim]."""
        batch, heads, n_q, head_dim = query.shape
        active = current_session()
        shift = frame.k0 if self.kind == "cross" else 0
        view, plan = self.plan(active, shift)
        recorder = current_recorder()
        sink = None
        row_mask = None  # the recorded row's mask, broadcastable to [head, n_q, n_k]
        cut = frame.n is not None and frame.n < n_q  # the recorded map: the first frame.n rows and keys
        if recorder is not None and recorder.wants(self.layer):
            row_mask = None if mask is None else mask[recorder.row if mask.shape[0] > 1 else 0]
            q_row, k_row, n_k = query[recorder.row], key[recorder.row], key.shape[2]
            if cut:
                q_row, k_row, n_k = q_row[:, :frame.n], k_row[:, :frame.n], frame.n
                row_mask = None if row_mask is None else row_mask[..., :min(row_mask.shape[-2], frame.n), :frame.n]
            if recorder.wants_qk(self.layer) and self.kind != "cross":
                recorder.qk(self.layer, frame, q_row, k_row, kernel, scale, row_mask)
            sink = recorder.open(self.layer, self.kind, frame, heads, frame.n if cut else n_q, n_k)
        if plan is not None and plan.attention:
            if plan.max_head >= heads:
                raise InterventionError(f"An edit names head {plan.max_head} of layer {self.layer}, which has "
                                        f"{heads} heads.")
            weights_of = _linear_weights if kernel == "linear" else None
            hidden = edited(view, plan, self.layer, frame.q0 - shift, query, key, value, mask, scale,
                            _Cut(sink, frame.n) if sink is not None and cut else sink,
                            None if sink is None else recorder.row, weights_of, k_first=frame.k0 - shift)
        elif sink is not None and batch == 1 and kernel == "softmax" and query.device.type == "cpu" and not cut:
            out = record_rows(sink, query[0], key[0], row_mask, scale, kernel, value[0])  # one pass, not two
            hidden = out.to(value.dtype).transpose(0, 1).reshape(1, n_q, heads * value.shape[-1])
        else:
            hidden = plain()
            if sink is not None:
                record_rows(sink, q_row, k_row, row_mask, scale, kernel)
        if sink is not None:
            sink.close()
        hidden = hidden.to(query.dtype)
        if active is not None and self.kind != "cross":
            active.query_positions[self.layer] = range(frame.q0, frame.q0 + n_q)
            changed = self._output_hook(None, (hidden,))  # scale / add edits and head gates on z
            if changed is not None:
                hidden = changed[0]
        return hidden


# ---- the maps ------------------------------------------------------------------------------------------

_SCRATCH = threading.local()  # per thread: two float32 buffers of at most BLOCK_ELEMENTS each, per device


def _scratch(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Two float32 buffers of `shape` (scores and weights of one row block) that this thread reuses from call
    to call while a block holds at most BLOCK_ELEMENTS, so recording a small map does not allocate (and on a
    CPU fault in) fresh memory for every block; (None, None) for a larger block."""
    numel = 1
    for size in shape:
        numel *= size
    if numel > BLOCK_ELEMENTS:
        return None, None
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    pair = buffers.get(device)
    if pair is None:
        with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode
            pair = buffers[device] = (torch.empty(BLOCK_ELEMENTS, device=device),
                                      torch.empty(BLOCK_ELEMENTS, device=device))
    return pair[0][:numel].view(shape), pair[1][:numel].view(shape)


def softmax_rows(query: torch.Tensor, key_t: torch.Tensor, mask: torch.Tensor | None, scale: float, r0: int,
                 r1: int, reuse: bool = False) -> torch.Tensor:
    """weights  # [head, rows, key] float32 of one batch row: softmax(q kᵀ · scale + mask), rows r0..r1-1.
    `reuse`: in this thread's scratch buffers (`_scratch`), valid until its next call."""
    q = query[:, r0:r1].float()
    reuse = reuse and not (q.requires_grad or key_t.requires_grad)  # out= takes no autograd
    scores, weights = _scratch((q.shape[0], q.shape[1], key_t.shape[-1]), q.device) if reuse else (None, None)
    scores = torch.matmul(q, key_t, out=scores).mul_(scale)
    if mask is not None:
        block = mask[..., r0:r1, :] if mask.shape[-2] > 1 else mask
        if block.dtype == torch.bool:
            scores.masked_fill_(~block, float("-inf"))
        else:
            scores.add_(block.float())
    return torch.softmax(scores, dim=-1) if weights is None else torch.softmax(scores, dim=-1, out=weights)


def block_rows(heads: int, n_k: int) -> int:
    """Query rows per block of a recorded map: ROW_BLOCK, or more while a block holds at most
    BLOCK_ELEMENTS scores, so a small map (the tiny pipelines, shapes-dit) takes one or a few blocks
    (the kernels' fixed cost, not the arithmetic, is most of its time) and a large one stays in ROW_BLOCK
    blocks.  The rows of a block are the same numbers whatever the block size."""
    return max(ROW_BLOCK, BLOCK_ELEMENTS // max(1, heads * n_k))


def linear_map(query: torch.Tensor, key_t: torch.Tensor) -> torch.Tensor:
    """Sana's linear attention as a map (capture.dit.families.sana): A  # [..., rows, key] float32 =
    φ(q)·φ(k) / (Σ_k φ(q)·φ(k) + 1e-15) for query  # [..., rows, head_dim] and key_t  # [..., head_dim, key],
    both already through φ = ReLU; the 1e-15 is the model's (diffusers' SanaLinearAttnProcessor2_0)."""
    scores = torch.matmul(query.float(), key_t.float())
    return scores / (scores.sum(-1, keepdim=True) + LINEAR_EPSILON)


def _linear_weights(query: torch.Tensor, key_t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """The linear map of query rows r0..r1-1.  query  # [..., n_q, head_dim] float32, key_t  # [..., head_dim, n_k]."""
    return linear_map(query[..., r0:r1, :], key_t)


def record_rows(sink, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float,
                kernel: str = "softmax", value: torch.Tensor | None = None) -> torch.Tensor | None:
    """Hand the unedited map of one batch row to `sink`, `block_rows` query rows at a time.
    query  # [head, n_q, head_dim], key  # [head, n_k, head_dim].  With `value`  # [head, n_k, head_dim] (a
    softmax kernel), also return that row's attention output from the same weights: out  # [head, n_q,
    head_dim] float32 = weights @ value."""
    if kernel == "linear" and getattr(sink, "pooled_only", False):  # folded without forming the n x n map
        sink.linear(query, key)
        return None
    key_t = key.float().transpose(-1, -2)  # [head, head_dim, key]
    n_q = query.shape[1]
    value = None if value is None else value.float()  # [head, key, head_dim], once for every block
    out = None if value is None else torch.empty(query.shape[0], n_q, value.shape[-1], device=value.device)
    step = block_rows(key.shape[0], key.shape[1])
    for r0 in range(0, n_q, step):
        r1 = min(n_q, r0 + step)
        if kernel == "linear":
            sink.rows(r0, _linear_weights(query.float(), key_t, r0, r1))
            continue
        weights = softmax_rows(query, key_t, mask, scale, r0, r1, reuse=True)  # [head, rows, key]
        if out is not None:
            out[:, r0:r1] = torch.matmul(weights, value)  # [head, rows, head_dim]
        sink.rows(r0, weights)  # sinks copy the rows
    return out


def edited(view: Session, plan: LayerPlan, layer: int, offset: int, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, mask: torch.Tensor | None, scale: float, sink, row: int | None,
           weights_of: Callable | None = None, k_first: int = 0) -> torch.Tensor:
    """The module's attention with the view's edits: hidden  # [batch, n_q, head * head_dim].

    Query row r sits at position `offset` + r of the view's axis, key j at `k_first` + j (so "image", "span:text"
    and ranges resolve as on the capture's axis; a refiner's keys start where its part of the axis does).
    `weights_of(query, key_t, r0, r1)` gives the unedited weights of
    a kernel without logits (Sana's linear attention): then logit and window edits do not apply."""
    batch, heads, n_q, head_dim = query.shape
    n_k = key.shape[2]
    if mask is not None:
        mask = mask.expand(batch, heads, n_q, n_k) if mask.dim() == 4 else mask
    call = AttentionCall(_Stub(layer), query, key, value, mask, scale, {"is_causal": False}, q_first=offset,
                         k_first=k_first)
    if weights_of is not None and plan.pre_softmax:
        raise InterventionError("Sana's self-attention is linear (no logits): logit and window edits do not apply "
                                "to it; use mix, redistribute or scale.")
    key_t = key.float().transpose(-1, -2) if weights_of is not None else None
    out = torch.empty(batch, heads, n_q, value.shape[-1], dtype=value.dtype, device=value.device)
    for r0 in range(0, n_q, ROW_BLOCK):
        r1 = min(n_q, r0 + ROW_BLOCK)
        if weights_of is None:
            weights = edited_weights(call, plan, view, layer, r0, r1, call.scores(r0, r1), None)
        else:
            weights = edited_weights(call, plan, view, layer, r0, r1, None, None,
                                     plain=weights_of(query.float(), key_t, r0, r1))
        if sink is not None:
            sink.rows(r0, weights[row])
        out[:, :, r0:r1] = torch.matmul(weights.to(value.dtype), value)  # [batch, head, rows, head_dim]
    return out.transpose(1, 2).reshape(batch, n_q, heads * value.shape[-1])


__all__ = ["Attend", "BLOCK_ELEMENTS", "Frame", "KINDS", "LINEAR_EPSILON", "block_rows", "current_recorder", "edited",
           "linear_map", "module_view", "part_frame", "record_rows", "recording", "softmax_rows"]
