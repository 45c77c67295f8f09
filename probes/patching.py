"""Activation patching of head outputs, batched (Wang et al. 2022, "Interpretability in the Wild" (IOI);
Heimersheim & Nanda 2024, "How to use and interpret activation patching").

Two prompts of the same token length, clean and corrupted, and a metric at the last position: the
logit difference of two tokens (" Mary" - " John") or the probability of one.  Patching a head copies
its output z (the o_proj input slice, at every position) from one run into the other:
- "denoise": clean z into the corrupted run; how much of the clean metric does this head restore?
- "noise":   corrupted z into the clean run; how much of it does this head destroy?
The sweep patches every head alone, B heads per forward, one per batch row, through the session's
`head_patches` (capture.engine.session); heads go in layer order and the rows share the unpatched
prefix (the batch is widened to B rows at the first layer it patches), like probes.ablation's sweep.
Path patching (one sender head to the receivers' q / k / v) is probes.path_patching; the runs both are
made of are probes.patch_runs.
"""
from __future__ import annotations

import numpy as np
import torch

from analytics.attribution import patching_effect
from capture.engine.handle import ModelHandle
from capture.engine.session import session
from core.errors import InputError
from core.probe_results import PatchingParams
from core.progress import Progress, no_progress
from probes.common import require_causal_lm, top_heads
from probes.patch_runs import Answer, answer_of, batch_rows, head_outputs, last_logits, prompt_pair, widened
from probes.path_patching import path_patching_sweep

DIRECTIONS = ("denoise", "noise")


def patching_sweep(handle: ModelHandle, source: list[int], dest: list[int], answer: Answer,
                   heads_list: list[tuple[int, int]] | None = None, batch_size: int | None = None,
                   progress: Progress = no_progress) -> tuple[float, float, np.ndarray]:
    """(source metric, destination metric, patched metric  # [layer, head]): each head's output z, at every
    position, taken from the source run into the destination run, one head at a time, B per forward."""
    meta = handle.meta
    heads_list = sorted(heads_list if heads_list is not None else
                        [(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)])
    z_source, source_value = head_outputs(handle, source, answer)
    with torch.inference_mode():
        dest_value = float(answer.score(last_logits(handle, torch.tensor([dest])))[0])
    batch_size = batch_size or batch_rows(len(dest), meta.n_heads)
    patched = np.full((meta.n_layers, meta.n_heads), np.nan)
    for start in range(0, len(heads_list), batch_size):
        batch = heads_list[start : start + batch_size]
        B = len(batch)
        patches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for b, (l, h) in enumerate(batch):
            if l not in patches:
                patches[l] = (torch.zeros(B, meta.n_heads, dtype=torch.bool), z_source[l])
            patches[l][0][b, h] = True  # row b takes head (l, h) from the source run
        with widened(handle, batch[0][0], B, lambda: session(head_patches=patches)) as blocks:
            ids = torch.tensor([dest]) if blocks is not None else torch.tensor([dest] * B)
            values = answer.score(last_logits(handle, ids))  # [B]
        for b, (l, h) in enumerate(batch):
            patched[l, h] = float(values[b])
        progress(0.1 + 0.88 * (start + B) / len(heads_list), f"patched {start + B}/{len(heads_list)} heads")
    return source_value, dest_value, patched


def patching_probe(handle: ModelHandle, p: PatchingParams, put, progress: Progress,
                   batch_size: int | None = None) -> dict:
    """Every head patched alone (PatchingParams), or path patching from `p.sender`.  Stores patched
    # [layer, head] (the metric with that head patched; NaN where not measured); the record holds the clean
    and corrupted metrics, the two prompts' tokens and where they differ."""
    require_causal_lm(handle, "patching")
    tok = handle.tokenizer
    clean, corrupted = prompt_pair(tok, p.clean, p.corrupted)
    answer = answer_of(tok, p)
    if p.direction not in DIRECTIONS:
        raise InputError(f"Unknown patching direction {p.direction!r}; use denoise or noise.")
    meta = handle.meta
    if any(not 0 <= l < meta.n_layers for l in p.layers):
        raise InputError(f"Patched layers must lie in 0..{meta.n_layers - 1}.")
    source, dest = (clean, corrupted) if p.direction == "denoise" else (corrupted, clean)
    if p.sender:
        source_value, dest_value, patched = path_patching_sweep(handle, source, dest, answer, p.sender, p.receivers,
                                                          batch_size=batch_size, progress=progress)
    else:
        heads_list = [(l, h) for l in (sorted(set(p.layers)) or range(meta.n_layers)) for h in range(meta.n_heads)]
        source_value, dest_value, patched = patching_sweep(handle, source, dest, answer, heads_list, batch_size,
                                                           progress)
    put("patched", patched.astype(np.float32))
    denoise = p.direction == "denoise"
    clean_value, corrupted_value = (source_value, dest_value) if denoise else (dest_value, source_value)
    effect = patching_effect(patched, clean_value, corrupted_value, p.direction)
    labels = [tok.decode([i]) for i in clean]
    return {"n_tokens": len(clean), "tokens": labels, "corrupted_tokens": [tok.decode([i]) for i in corrupted],
            "differs": [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b],
            "summary": {"clean": clean_value, "corrupted": corrupted_value, "metric": p.metric,
                        "direction": p.direction, "top": top_heads(np.nan_to_num(effect, nan=-np.inf))}}
