"""Attention-level edits: the softmax weights of one row block, with a layer's edits applied.

Attention-level edits (core.interventions for the ops, position sets and composition order) are
applied per head, vectorised over the heads that share an op and position sets, on each row block:
logit and window on the scores, softmax, then redistribute, then mix.

Sinks ("sinks" key sets) are detected once per session and layer from the prompt's prefill rows
(ACT, METHODS §2.1) and reused by every later call: the KV-cache decode steps of a generate call use
the prefill's sinks, and the adapter hands generation's `Session.sink_scores` to the recorded pass,
so generation and capture edit the very same keys.
"""
from __future__ import annotations

import torch

from capture.engine.call import ROW_BLOCK, AttentionCall
from capture.engine.session import Group, LayerPlan, Session
from core.errors import InterventionError
from core.interventions import parse_positions, sink_set


# ---- sinks (ACT detection on the prompt's prefill rows) ----------------------------------------------

def sink_scores(active: Session, layer: int, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s  # [batch, head, prompt], plain): ACT's s_j = sum_i A_ij / (N - j) over the prompt rows
    (METHODS §2.1), and, when the call is exactly those rows in one block, their unedited fp32 softmax
    (the caller edits it instead of computing it again).

    Computed once per session and layer, on the unedited softmax of this layer over the prompt's
    prefill rows (rows 0 .. P-1, P = the "prompt" span, else the whole first call), then reused: the
    KV-cache decode steps of the same generate call see the same sink sets, and the adapter
    (capture.text.adapter) hands the scores of generation to the recorded pass.  N - j is counted from the mask, so padded
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
    # the prompt's rows of this call (an encoder-decoder's decoder: its first row, the start token)
    n_prompt = min(max((active.prompt_length() or call.n_q) - call.q_first, 1), call.n_q)
    mass = torch.zeros(call.batch, call.n_heads, n_prompt, device=call.device)
    seen = torch.zeros(1, 1, n_prompt, device=call.device)
    weights = None
    for r0 in range(0, n_prompt, ROW_BLOCK):
        r1 = min(n_prompt, r0 + ROW_BLOCK)
        weights = call.softmax(call.scores(r0, r1))  # [batch, head, rows, key] float32
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

def _key_mask(spec: str, group: Group, call: AttentionCall, active: Session, layer: int, sinks: torch.Tensor | None,
              k_end: int) -> torch.Tensor:
    """The key set `spec` as a bool mask broadcastable to [rows-of-batch, heads, rows, k_end]."""
    found = sink_set(spec)
    if found is not None:
        cache_key = (layer, spec, id(group))  # sinks are fixed for the session: threshold them once
        mask = active.sink_masks.get(cache_key)
        if mask is None:
            threshold, include_first = found
            mask = sink_mask(sinks[group.rows][:, group.heads], threshold, include_first).unsqueeze(2)
            active.sink_masks[cache_key] = mask  # [nb, nh, 1, prompt]
        n = mask.shape[-1]
        return torch.nn.functional.pad(mask, (0, k_end - n)) if n < k_end else mask[..., :k_end]
    keys = torch.zeros(k_end, dtype=torch.bool, device=call.device)
    if spec == "all":
        keys[:] = True
    else:  # positions on the capture's axis -> the call's keys (an encoder-decoder's decoder keys start at k_first)
        wanted = parse_positions(spec, call.k_first + call.n_k, active.spans)
        keys[max(wanted.start - call.k_first, 0):max(min(wanted.stop - call.k_first, k_end), 0)] = True
    return keys.view(1, 1, 1, k_end)


def query_mask(spec: str, positions: torch.Tensor, n_total: int, active: Session) -> torch.Tensor | None:
    """bool [rows] over the call's rows (absolute positions `positions`), or None for every row."""
    if spec == "all":
        return None
    if spec == "last":
        n_prompt = active.prompt_length()
        return positions >= (n_prompt - 1 if n_prompt else n_total - 1)
    wanted = parse_positions(spec, n_total, active.spans)
    return (positions >= wanted.start) & (positions < wanted.stop)


def edited_weights(call: AttentionCall, plan: LayerPlan, active: Session, layer: int, r0: int, r1: int,
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

    def queries(group: Group) -> torch.Tensor | None:
        q = query_mask(group.queries, positions, call.n_total, active)
        return None if q is None else q.view(1, 1, -1, 1)

    def keys(group: Group) -> torch.Tensor:
        return _key_mask(group.keys, group, call, active, layer, sinks, k_end)

    def rows_of(x: torch.Tensor, group: Group) -> torch.Tensor:
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
            bias = group.values.to(device=s.device, dtype=s.dtype).view(1, -1, 1, 1)
            scores[group.rows][:, group.heads] = torch.where(sel, s + bias, s)
        for group in plan.stages["window"]:
            s = scores[group.rows][:, group.heads]
            recent = (positions[:, None] - call.key_positions(k_end)[None, :]).view(1, 1, -1, k_end)  # i - j
            if not call.causal:  # a bidirectional encoder: the window reaches both ways, |i - j| < W
                recent = recent.abs()
            keep = keys(group) | (recent < group.values.to(recent.device).view(1, -1, 1, 1))
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
    weights = plain if plain is not None else call.softmax(scores)
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
        beta = group.values.to(w.device).view(1, -1, 1, 1)
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
            target = (call.key_positions(k_end)[None, :] == positions[:, None]).to(w.dtype).view(1, 1, -1, k_end)
            has_target = None
        else:
            vis = rows_of(live, group)
            vis = vis[:, group.heads] if vis.shape[1] > 1 else vis
            allowed = vis if group.keys == "uniform" else vis & keys(group)
            count = allowed.sum(-1, keepdim=True)
            target = allowed / count.clamp(min=1)
            has_target = count > 0
        u = group.values.to(w.device).view(1, -1, 1, 1)
        mixed = (1 - u) * w + u * target
        change = has_target
        q = queries(group)
        if q is not None:
            change = q if change is None else change & q
        weights[group.rows][:, group.heads] = mixed if change is None else torch.where(change, mixed, w)
    return weights
