"""HeadScope's attention function: one mechanism for capture and interventions.

`headscope_attention` is registered with transformers under the name "headscope", for attention
(`AttentionInterface`) and for masks (`AttentionMaskInterface`, reusing the SDPA mask builder: without
it the causal mask is silently lost).  A model loaded by `capture.registry` runs with
`config._attn_implementation = "headscope"` (Falcon and BLOOM, whose attention does not go through
that interface, call it from their HeadScope forward, capture.text.families), and each call does one
of two things:

- nothing to record and no attention-level edit active: delegate to the implementation the model was
  loaded with (`module.headscope_native`: SDPA, or the family's eager function for models that refuse
  SDPA, capture.engine.handle.native_attention), so outputs and generated tokens are exactly those of
  the plain model;
- otherwise: compute softmax attention explicitly, ROW_BLOCK query rows at a time, with the scores
  exactly as transformers' eager path computes them (soft-capping, position biases, sink logits) and a
  float32 softmax whatever the model's dtype (capture.engine.call), apply the active attention-level
  edits (capture.engine.edits), hand the float32 weights to the recorder (capture.engine.recorder), and
  produce the output as weights @ values in the model's dtype.  Only one row block's fp32 scores exist
  at once; the recorder turns them into fp16 straight away.

The decision is per layer: a layer with no attention-level edit (and nothing recorded) stays on the
fast path even when other layers are edited.  Output-level edits (`scale`, `add`) and the analytics'
`head_gates` act in the o_proj pre-hook (capture.engine.head_outputs), so they never leave the fast
path.  What is active (intervention, recorder, spans, gates) is the `Session` of capture.engine.session.
Everything runs on the device of the call's tensors (a model spread over GPUs included).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from capture.engine.call import ROW_BLOCK, AttentionCall, additive_mask, is_causal
from capture.engine.edits import edited_weights, sink_scores
from capture.engine.session import current_session
from core.errors import InterventionError

IMPLEMENTATION = "headscope"


def headscope_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """query  # [batch, head, query, head_dim]; key, value  # [batch, kv_head, key, head_dim].

    Returns attn_output  # [batch, query, head, head_dim], as transformers' attention functions do.
    """
    active = current_session()
    layer = getattr(module, "headscope_layer", None)
    if active is None or layer is None:
        return _native(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    n_q, n_k = query.shape[2], key.shape[2]
    q_first, k_first = active.place(getattr(module, "headscope_group", None), n_q, n_k)
    active.query_positions[layer] = range(q_first, q_first + n_q)
    active.check_batch(query.shape[0])
    plan = active.plan(layer, query.device)
    if plan.max_head >= query.shape[1]:
        raise InterventionError(f"An edit names head {plan.max_head} of layer {layer}, which has {query.shape[1]} heads.")
    recording = active.recorder is not None
    if not recording and not plan.attention:
        return _native(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    attend = getattr(active.recorder, "attend", None)  # a recorder that computes attention itself
    if attend is not None and not plan.attention:  # (capture.engine.longctx.QKRecorder: the long-context layout)
        return attend(layer, module, query, key, value, attention_mask, scaling, kwargs), None

    call = AttentionCall(module, query, key, value, attention_mask, scaling, kwargs, q_first, k_first)
    record = getattr(active.recorder, "record", None)  # a recorder that takes whole layers (Recorder)
    if record is not None and not plan.attention:
        attn_output = record(layer, call)
        if attn_output is not None:
            return attn_output, None
    sinks, first_block = sink_scores(active, layer, call) if plan.needs_sinks else (None, None)
    attn_output = torch.empty(call.batch, call.n_heads, n_q, value.shape[-1], dtype=query.dtype, device=query.device)
    for r0 in range(0, n_q, ROW_BLOCK):
        r1 = min(n_q, r0 + ROW_BLOCK)
        rows, k_end = r1 - r0, call.k_end(r1)
        if plan.attention:
            plain = first_block if r0 == 0 and not plan.pre_softmax else None  # the sink pass's softmax
            scores = None if plain is not None else call.scores(r0, r1)
            probs = edited_weights(call, plan, active, layer, r0, r1, scores, sinks, plain)
            first_block = None
        else:
            scores = call.scores(r0, r1)  # [batch, head, rows, key]
            probs = call.softmax(scores)  # [batch, head, rows, key] float32
        del scores
        if recording:  # a pass continuing from a cache (offset > 0) records the rows after it
            active.recorder.take(layer, 0, call.q_first + r0, n_k, probs[0])
            if call.sinks is not None:  # the mass the sink logit took: what the row's keys do not have
                active.recorder.sink_share(layer, call.q_first + r0, n_k, 1 - probs[0].sum(-1))
        weights = probs.to(query.dtype)
        block_out = torch.matmul(weights.view(call.batch, call.n_kv, call.group * rows, k_end), value[:, :, :k_end])
        attn_output[:, :, r0:r1] = block_out.view(call.batch, call.n_heads, rows, -1)
    return attn_output.transpose(1, 2).contiguous(), None


def _native(module, query, key, value, attention_mask, dropout, scaling, kwargs) -> tuple[torch.Tensor, object]:
    """The fast path: the implementation the model was loaded with (`module.headscope_native`).  The mask
    comes from the SDPA builder (AttentionMaskInterface "headscope"): boolean, or None for a plain causal
    call; an eager function adds its mask to the scores, so it gets the additive mask transformers' own
    eager builder would have made."""
    native = getattr(module, "headscope_native", sdpa_attention_forward)
    if native is not sdpa_attention_forward and (attention_mask is None or attention_mask.dtype == torch.bool):
        attention_mask = additive_mask(attention_mask, is_causal(module, kwargs), query.shape[2], key.shape[2],
                                       query.dtype, query.device)
    return native(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    """Register "headscope" with transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, headscope_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
