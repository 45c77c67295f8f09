"""HeadScope's attention function: one mechanism for capture and interventions.

`headscope_attention` is registered with transformers under the name "headscope", for attention
(`AttentionInterface`) and for masks (`AttentionMaskInterface`, reusing the SDPA mask builder: without
it the causal mask is silently lost).  A model loaded by `capture.registry` runs with
`config._attn_implementation = "headscope"`, and each call does one of two things:

- nothing to record and no attention-level edit active: delegate to transformers' own SDPA function,
  so outputs and generated tokens are exactly those of a plain SDPA model;
- otherwise: compute softmax attention explicitly, ROW_BLOCK query rows at a time, with the scores
  exactly as transformers' eager path computes them and an fp32 softmax (capture.engine.call), apply
  the active attention-level edits (capture.engine.edits), hand the weights to the recorder
  (capture.engine.recorder), and produce the output as weights @ values.  Only one row block's fp32
  scores exist at once; the recorder turns them into fp16 straight away.

The decision is per layer: a layer with no attention-level edit (and nothing recorded) stays on
SDPA even when other layers are edited.  Output-level edits (`scale`, `add`) and the analytics'
`head_gates` act in the o_proj pre-hook (capture.engine.head_outputs), so they never leave the fast
path.  What is active (intervention, recorder, spans, gates) is the `Session` of capture.engine.session.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from capture.engine.call import ROW_BLOCK, AttentionCall
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

    call = AttentionCall(module, query, key, value, attention_mask, scaling, kwargs)
    record = getattr(active.recorder, "record", None)  # a recorder that takes whole layers (Recorder)
    if record is not None and not plan.attention:
        attn_output = record(layer, call)
        if attn_output is not None:
            return attn_output, None
    sinks, first_block = sink_scores(active, layer, call) if plan.needs_sinks else (None, None)
    attn_output = torch.empty(call.batch, call.n_heads, n_q, value.shape[-1], dtype=query.dtype)
    for r0 in range(0, n_q, ROW_BLOCK):
        r1 = min(n_q, r0 + ROW_BLOCK)
        rows, k_end = r1 - r0, call.k_end(r1)
        if plan.attention:
            plain = first_block if r0 == 0 and not plan.pre_softmax else None  # the sink pass's softmax
            scores = None if plain is not None else call.scores(r0, r1)
            weights = edited_weights(call, plan, active, layer, r0, r1, scores, sinks, plain).to(query.dtype)
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


def register() -> None:
    """Register "headscope" with transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, headscope_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
