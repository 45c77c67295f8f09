"""The output-projection pre-hook: head patches, head gates and the output-level edits (`scale`, `add`).

`capture.engine.handle.prepare` hangs `scale_head_outputs` on every attention layer's output
projection, whose input is the concatenation of the head outputs.  The analytics' `head_patches`
(activation patching), `head_gates` and the output-level edits act there, so they never take a layer
off the SDPA fast path of capture.engine.attention; a session's `head_outputs` callback (steering
directions) reads the head outputs there too.
"""
from __future__ import annotations

from typing import Callable

import torch

from capture.engine.edits import query_mask
from capture.engine.session import current_session
from core.errors import InterventionError


def scale_head_outputs(layer: int, n_heads: int) -> Callable:
    """A forward pre-hook for a layer's output projection: head patches, head gates, then `scale` and `add`.

    The projection's input is the concatenation of the head outputs z (METHODS.md notation):
    z  # [batch, query, head * head_dim]; `scale` multiplies one head's slice by `value`, `add` adds
    `value * direction` to it, on the rows of `queries`; a head patch replaces a head's slice by values
    recorded in another run.  Works on the SDPA fast path too.
    """

    def hook(_module: torch.nn.Module, args: tuple) -> tuple | None:
        active = current_session()
        if active is None:
            return None
        plan = active.plan(layer, args[0].device)
        gates = active.head_gates.get(layer)
        patch = active.head_patches.get(layer)
        if not plan.output and gates is None and patch is None and active.head_outputs is None:
            return None
        (z, *rest) = args
        batch, n_q, width = z.shape
        z = z.view(batch, n_q, n_heads, width // n_heads)  # [batch, query, head, head_dim]
        if active.head_outputs is not None:
            active.head_outputs(layer, z)
            if not plan.output and gates is None and patch is None:
                return None
        active.check_batch(batch)
        if plan.max_head >= n_heads:
            raise InterventionError(f"An edit names head {plan.max_head} of layer {layer}, which has {n_heads} heads.")
        if patch is not None:
            mask, values = patch  # bool [batch, head], [batch or 1, query, head, head_dim]
            if values.shape[1] != n_q or mask.shape[-1] != n_heads:
                raise InterventionError(f"The head patches of layer {layer} hold {values.shape[1]} positions of "
                                        f"{mask.shape[-1]} heads; this call has {n_q} positions of {n_heads} heads.")
            z = torch.where(mask.to(z.device)[:, None, :, None], values.to(device=z.device, dtype=z.dtype), z)
        if gates is not None:
            z = z * gates.to(device=z.device, dtype=z.dtype)[:, None, :, None]  # gate  # [batch, head]
        elif patch is None:
            z = z.clone()
        span = active.query_positions.get(layer, range(n_q))
        positions = torch.arange(span.start, span.stop, device=z.device)
        for group in plan.output:
            sub = z[group.rows]  # view [nb, query, head, head_dim]
            if group.op == "scale":
                factor = torch.ones(n_heads, dtype=z.dtype, device=z.device)
                factor[group.heads] = group.values.to(z.dtype)
                edited = sub * factor.view(1, 1, n_heads, 1)
            else:
                if group.directions.shape[1] != z.shape[-1]:
                    raise InterventionError(
                        f"An add direction on layer {layer} has {group.directions.shape[1]} numbers; "
                        f"the heads have {z.shape[-1]} dimensions."
                    )
                delta = torch.zeros(n_heads, z.shape[-1], dtype=z.dtype, device=z.device)
                delta[group.heads] = (group.values[:, None] * group.directions).to(z.dtype)
                edited = sub + delta.view(1, 1, n_heads, -1)
            q = query_mask(group.queries, positions, span.stop, active)
            if q is not None:
                edited = torch.where(q.view(1, -1, 1, 1), edited, sub)
            sub.copy_(edited)
        return (z.reshape(batch, n_q, width), *rest)

    return hook
