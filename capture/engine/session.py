"""The session: what the attention function and the output hooks do during one forward or generate call.

The active state lives in a `Session`, set for the duration of a `with session(...)` block (a
ContextVar, so concurrent Streamlit threads do not see each other's sessions).  A session can carry
one intervention for the whole batch and one more per batch row (`row_interventions`), so a sweep
runs B variants in one forward.

Each layer's edits are planned once per session (`Session.plan`, a `LayerPlan`): the attention-level
edits by stage in the composition order of core.interventions (logit, window, redistribute, mix), the
output-level edits (scale, add) apart, each stage in `Group`s vectorised over the heads that share an
op and position sets.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from capture.engine.recorder import Recorder
from core.errors import InterventionError
from core.interventions import ATTENTION_OPS, OUTPUT_OPS, HeadEdit, Intervention, sink_set


@dataclass
class Group:
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

    def to(self, device: torch.device) -> "Group":
        return replace(self, heads=self.heads.to(device), values=self.values.to(device),
                       directions=None if self.directions is None else self.directions.to(device))


@dataclass
class LayerPlan:
    """One layer's edits, grouped by stage in composition order (core.interventions docstring)."""

    stages: dict[str, list[Group]]  # "logit" | "window" | "redistribute" | "mix" -> groups in order
    output: list[Group]  # scale / add, in per-head tuple order
    max_head: int = -1
    device: torch.device = torch.device("cpu")  # where the groups' tensors are (the layer's device)

    def to(self, device: torch.device) -> "LayerPlan":
        return LayerPlan(stages={op: [g.to(device) for g in groups] for op, groups in self.stages.items()},
                         output=[g.to(device) for g in self.output], max_head=self.max_head, device=device)

    @property
    def attention(self) -> bool:
        return any(self.stages.values())

    @property
    def pre_softmax(self) -> bool:
        return bool(self.stages["logit"] or self.stages["window"])

    @property
    def needs_sinks(self) -> bool:
        return any(sink_set(g.keys) for groups in self.stages.values() for g in groups)


def _rounds(edits: list[HeadEdit], rows: slice) -> list[Group]:
    """Group edits into vectorised groups without changing any one head's order of edits.

    Round r holds each head's r-th edit; inside a round, edits with the same op and position sets
    become one group.  Heads are independent, so this equals applying the edits one by one.
    """
    per_head: dict[int, list[HeadEdit]] = {}
    for e in edits:
        per_head.setdefault(e.head, []).append(e)
    groups: list[Group] = []
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
            groups.append(Group(op=op, keys=keys, queries=queries, mode=mode, rows=rows,
                                 heads=torch.tensor([e.head for e in members], dtype=torch.long),
                                 values=torch.tensor([e.value for e in members], dtype=torch.float32),
                                 directions=dirs))
    return groups


def _layer_plan(sources: list[tuple[slice, tuple[HeadEdit, ...]]]) -> LayerPlan:
    stages: dict[str, list[Group]] = {op: [] for op in ATTENTION_OPS}
    output: list[Group] = []
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
    return LayerPlan(stages=stages, output=output, max_head=max_head)


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
    # per-layer replacements of head outputs (activation patching, Wang et al. 2022): layer -> (mask  # bool
    # [batch, head], values  # [batch or 1, query, head, head_dim]); row b's masked heads output the values
    head_patches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    row_interventions: tuple[Intervention, ...] | None = None
    sink_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    head_outputs: Callable[[int, torch.Tensor], None] | None = None
    # query positions of the current call per layer (on the capture's token axis), set by the attention
    # function, read by the o_proj hook
    query_positions: dict[int, range] = field(default_factory=dict)
    decoder_first: int = 0  # an encoder-decoder: the axis position of the decoder's current first row
    _plans: dict[int, LayerPlan] = field(default_factory=dict, repr=False)
    sink_masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)  # thresholded sinks, by layer, set, group

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

    def plan(self, layer: int, device: torch.device | None = None) -> LayerPlan:
        """The layer's edits, planned once per session (their tensors on `device`, the layer's, when given)."""
        found = self._plans.get(layer)
        if found is None:
            sources = [(slice(None), self.intervention.for_layer(layer))]
            for b, iv in enumerate(self.row_interventions or ()):
                sources.append((slice(b, b + 1), iv.for_layer(layer)))
            found = self._plans[layer] = _layer_plan(sources)
        if device is not None and found.device != device:
            found = self._plans[layer] = found.to(device)
        return found

    def place(self, group: str | None, n_q: int, n_k: int) -> tuple[int, int]:
        """(q_first, k_first): where a call's first query row and first key sit on the capture's token axis.

        A decoder-only model or an encoder: at the call's causal offset, keys from 0.  An encoder-decoder
        (capture.text.seq2seq; `group` is the layer's ModelMeta.groups name, spans "encoder" and
        "decoder" are set): decoder tokens follow the encoder's, so a decoder self-attention call starts
        at the decoder span plus its offset; a cross-attention call has the rows of the decoder call
        that precedes it in the same block and the encoder's keys."""
        if group is None or group == "encoder":
            return n_k - n_q, 0
        start = self.spans["decoder"].start
        if group == "decoder":
            self.decoder_first = start + n_k - n_q
            return self.decoder_first, start
        return self.decoder_first, 0

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
            head_patches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
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
    head_patches       layer -> (mask  # bool [batch, head], values  # [batch or 1, query, head, head_dim]):
                       in row b every head with mask[b, h] outputs values[b, :, h] instead of its own z
                       (activation patching: values recorded in another run; one forward, query count fixed).
    sink_scores        sink scores from an earlier session over the same prompt (`Session.sink_scores`),
                       so generation and the recorded pass use the very same sink sets.
    head_outputs       callback(layer, z) receiving each layer's head outputs (steering directions).
    """
    rows = None if row_interventions is None else tuple(row_interventions)
    for iv in (intervention, *(rows or ())):
        if not isinstance(iv, Intervention):
            raise InterventionError("Interventions must be core.interventions.Intervention objects.")
    active = Session(intervention=intervention, recorder=recorder, spans=dict(spans or {}),
                     head_gates=dict(head_gates or {}), head_patches=dict(head_patches or {}),
                     row_interventions=rows,
                     sink_scores=dict(sink_scores or {}), head_outputs=head_outputs)
    token = _SESSION.set(active)
    try:
        yield active
    finally:
        _SESSION.reset(token)


def current_session() -> Session | None:
    """The session of the enclosing `with session(...)` block, or None outside one."""
    return _SESSION.get()
