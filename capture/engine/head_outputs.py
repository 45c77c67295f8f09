"""The output-projection pre-hook: head gates and the output-level edits (`scale`, `add`).

`capture.engine.handle.prepare` hangs `scale_head_outputs` on every attention layer's output
projection, whose input is the concatenation of the head outputs.  The analytics' `head_gates` and the
output-level edits act there, so they never take a layer off the SDPA fast path of
capture.engine.attention; a session's `head_outputs` callback (steering directions) reads the head
outputs there too.
"""
from __future__ import annotations

from typing import Callable

import torch

from capture.engine.edits import query_mask
from capture.engine.session import current_session
from core.errors import InterventionError


def scale_head_outputs(layer: int, n_heads: int) -> Callable:
    """A forward pre-hook for a layer's output projection: head gates, then the `scale` and `add` edits.

    The projection's input is the concatenation of the head outputs z (METHODS.md notation):
    z  # [batch, query, head * head_dim]; `scale` multiplies one head's slice by `value`, `add` adds
    `value * direction` to it, on the rows of `queries`.  Works on the SDPA fast path too.
    """

    def hook(_module: torch.nn.Module, args: tuple) -> tuple | None:
        active = current_session()
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
            q = query_mask(group.queries, positions, span.stop, active)
            if q is not None:
                edited = torch.where(q.view(1, -1, 1, 1), edited, sub)
            sub.copy_(edited)
        return (z.reshape(batch, n_q, width), *rest)

    return hook
