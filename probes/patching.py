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

from capture.engine.handle import ModelHandle
from core.probe_results import PatchingParams
from core.progress import Progress, no_progress
from probes.common import require_causal_lm
from probes.patch_runs import (
    Answer,
    answer_of,
    batch_rows,
    head_outputs,
    heads_to_patch,
    last_logits,
    metric,
    patch_each_head,
    patching_summary,
    prompt_pair,
)
from probes.path_patching import path_patching_sweep


def patching_sweep(handle: ModelHandle, source: list[int], dest: list[int], answer: Answer,
                   heads_list: list[tuple[int, int]] | None = None, batch_size: int | None = None,
                   progress: Progress = no_progress) -> tuple[float, float, np.ndarray]:
    """(source metric, destination metric, patched metric  # [layer, head]): each head's output z, at every
    position, taken from the source run into the destination run, one head at a time, B per forward."""
    meta = handle.meta
    z_source, source_value = head_outputs(handle, source, answer)

    def dest_logits(rows: int) -> torch.Tensor:  # [rows, vocab]
        return last_logits(handle, torch.tensor([dest] * rows))

    dest_value = metric(dest_logits, answer)
    patched = patch_each_head(handle, z_source, dest_logits, answer,
                              heads_list or [(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)],
                              batch_size or batch_rows(len(dest), meta.n_heads), progress)
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
    heads_list = heads_to_patch(handle.meta, p.layers, p.direction)
    source, dest = (clean, corrupted) if p.direction == "denoise" else (corrupted, clean)
    if p.sender:
        source_value, dest_value, patched = path_patching_sweep(handle, source, dest, answer, p.sender, p.receivers,
                                                          batch_size=batch_size, progress=progress)
    else:
        source_value, dest_value, patched = patching_sweep(handle, source, dest, answer, heads_list, batch_size,
                                                           progress)
    put("patched", patched.astype(np.float32))
    labels = [tok.decode([i]) for i in clean]
    return {"n_tokens": len(clean), "tokens": labels, "corrupted_tokens": [tok.decode([i]) for i in corrupted],
            "differs": [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b],
            "summary": patching_summary(patched, source_value, dest_value, p)}
