"""Path patching from one sender head to the queries, keys or values of every later head (Wang et al. 2022
§3 and Appendix B; Goldowsky-Dill et al. 2023, "Localizing Model Behavior with Path Patching").

Which later heads does the sender act through?  With source and destination runs as in probes.patching
(denoise: clean into corrupted), three steps:
1. the source and destination runs, recording every head's output z;
2. the destination run with the sender's z taken from the source and every other head's z frozen at its
   destination value (MLPs recompute, as in Wang et al.); the q / k / v projections of every later
   layer are recorded: what each receiver would read if only the sender's path changed;
3. the destination run again, B receivers per forward (one per batch row), row b's receiver reading its
   q (or k, v) from step 2; the metric at the last position, everything downstream free.
Receivers of `q` are query heads; of `k` / `v` KV heads (with GQA a KV head serves its whole group, so
each query head of a group shows its KV head's value).  Llama-style attention (q_proj, k_proj, v_proj)
and GPT-2 (c_attn); anything else is refused with one sentence.
"""
from __future__ import annotations

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from capture.engine.hooks import removing
from capture.engine.session import session
from core.errors import InputError
from core.progress import Progress, no_progress
from probes.patch_runs import Answer, batch_rows, head_outputs, last_logits, widened

RECEIVERS = ("q", "k", "v")


def projection(attention: torch.nn.Module, which: str, n_heads: int, n_kv: int, head_dim: int
               ) -> tuple[torch.nn.Module, int, int]:
    """(module, first output column, number of receiver units) of one attention's q, k or v projection."""
    units = n_heads if which == "q" else n_kv
    if isinstance(getattr(attention, f"{which}_proj", None), torch.nn.Module):
        return getattr(attention, f"{which}_proj"), 0, units
    if isinstance(getattr(attention, "c_attn", None), torch.nn.Module):  # GPT-2: [q | k | v] in one projection
        return attention.c_attn, RECEIVERS.index(which) * n_heads * head_dim, units
    raise InputError("Path patching reaches the q / k / v projections of Llama-style and GPT-2 attention; "
                     "this model's attention has neither.")


def path_patching_sweep(handle: ModelHandle, source: list[int], dest: list[int], answer: Answer,
                        sender: tuple[int, ...], receivers: str = "q", batch_size: int | None = None,
                        progress: Progress = no_progress) -> tuple[float, float, np.ndarray]:
    """(source metric, destination metric, patched  # [layer, head]): the metric with the sender's path to
    each receiver's `receivers` input patched (NaN for layers up to the sender's)."""
    meta = handle.meta
    if len(sender) != 2 or not (0 <= sender[0] < meta.n_layers and 0 <= sender[1] < meta.n_heads):
        raise InputError(f"The sender is a (layer, head) pair within {meta.n_layers} layers of {meta.n_heads} heads.")
    if receivers not in RECEIVERS:
        raise InputError(f"Path patching receivers are q, k or v, not {receivers!r}.")
    s_layer, s_head = sender
    if s_layer == meta.n_layers - 1:
        raise InputError("The sender is in the last layer: no later head can receive from it.")
    hd, n_kv = meta.head_dim, meta.n_kv_heads
    projections = [projection(attn, receivers, meta.n_heads, n_kv, hd) for attn in handle.attention_modules]
    z_source, source_value = head_outputs(handle, source, answer)
    z_dest, dest_value = head_outputs(handle, dest, answer)
    progress(0.1, "the sender's path, the other heads frozen")

    # step 2: sender from the source, every other head frozen at the destination; the later layers' inputs
    frozen = {}
    for l in range(s_layer, meta.n_layers):
        values = z_dest[l].clone()  # [1, token, head, head_dim]
        if l == s_layer:
            values[:, :, s_head] = z_source[l][:, :, s_head]
        frozen[l] = (torch.ones(1, meta.n_heads, dtype=torch.bool), values)
    read: dict[int, torch.Tensor] = {}

    def keep(layer: int, start: int, width: int):
        def hook(_module, _args, out):
            read[layer] = out[0, :, start : start + width].clone()  # [token, unit * head_dim]
        return hook

    hooks = [module.register_forward_hook(keep(l, start, units * hd))
             for l, (module, start, units) in enumerate(projections) if l > s_layer]
    with removing(hooks), torch.inference_mode(), session(head_patches=frozen):
        last_logits(handle, torch.tensor([dest]))

    # step 3: each receiver reads its input from step 2, B receivers per forward
    units = projections[0][2]
    todo = [(l, u) for l in range(s_layer + 1, meta.n_layers) for u in range(units)]
    batch_size = batch_size or batch_rows(len(dest), meta.n_heads)
    found = np.full((meta.n_layers, units), np.nan)
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        B = len(batch)
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for b, (l, u) in enumerate(batch):
            by_layer.setdefault(l, []).append((b, u))

        def patch(layer: int, rows: list[tuple[int, int]], start: int):
            def hook(_module, _args, out):
                out = out.clone()
                for b, u in rows:
                    cols = slice(start + u * hd, start + (u + 1) * hd)
                    out[b, :, cols] = read[layer][:, u * hd : (u + 1) * hd]
                return out
            return hook

        hooks = [projections[l][0].register_forward_hook(patch(l, rows, projections[l][1]))
                 for l, rows in by_layer.items()]
        with removing(hooks), widened(handle, batch[0][0], B, session) as blocks:
            ids = torch.tensor([dest]) if blocks is not None else torch.tensor([dest] * B)
            values = answer.score(last_logits(handle, ids))  # [B]
        for b, (l, u) in enumerate(batch):
            found[l, u] = float(values[b])
        progress(0.15 + 0.83 * (first + B) / len(todo), f"receivers {first + B}/{len(todo)}")
    patched = found if units == meta.n_heads else np.repeat(found, meta.n_heads // units, axis=1)
    return source_value, dest_value, patched
