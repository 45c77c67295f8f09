"""Activation patching of a VLM's language-model heads between two pictures (issue 24, item 4; Wang et al.
2022's method as in probes.patching, on a picture and a question).

One question about two pictures, clean and corrupted, that give the same prompt tokens (only the picture
inputs differ: the `<image>` placeholders carry different features), and a metric at the answer position
(the last prompt token, where the answer's first token is predicted): the logit difference of two answer
tokens ("red" - "yellow") or the probability of one.  Patching a head copies its output z (the o_proj input
slice of a language-model layer, at every position, image tokens included) from one run into the other:
- "denoise": the clean picture's z into the corrupted picture's run: how much of the clean answer does
  this head restore?
- "noise":   the corrupted picture's z into the clean picture's run.
By default every position's head outputs are patched, so patching every head of every layer gives the
source run's metric exactly: the answer position's own token is the same in both runs and everything it
reads after the embedding passes through the patched heads.  `positions` "image" patches the picture's
rows only (the image tokens), "text" the other rows: a head patched alone at some rows outputs, at the
others, what it outputs in the destination run (nothing before it changed), so its patch values are the
source run's z at those rows and the destination run's elsewhere.  The sweep patches each head alone, B heads per forward
(one per batch row) through the session's `head_patches`, the rows sharing the unpatched prefix from the
first patched layer on (probes.patch_runs.widened); the vision tower and the projector run once per
forward, at width 1.  Only the language model's attention layers are HeadScope's layers (capture.vlm),
so layer l is LM layer l.
"""
from __future__ import annotations

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from capture.vlm.adapter import VlmAdapter
from capture.vlm.inputs import VlmInputs, placed
from core.errors import InputError
from core.probe_results import VlmPatchingParams
from core.progress import Progress, no_progress
from core.types import RunSpec
from probes.patch_runs import (
    Answer,
    Logits,
    answer_of,
    batch_rows,
    heads_to_patch,
    metric,
    patch_each_head,
    patching_summary,
    recorded_heads,
)


def picture_pair(handle: ModelHandle, question: str, clean: str, corrupted: str) -> tuple[VlmInputs, VlmInputs]:
    """The inputs of the question about each picture; one sentence unless they can be patched into each other."""
    if handle.meta.modality != "vlm":
        raise InputError(f"VLM patching needs a vision-language model; {handle.meta.name} is not one.")
    if clean == corrupted:
        raise InputError("The clean and corrupted pictures are the same picture; pick another corrupted one.")
    adapter = VlmAdapter(handle)
    a, _ = adapter.encode(RunSpec(model=handle.meta.name, prompt=question, image=clean))
    b, _ = adapter.encode(RunSpec(model=handle.meta.name, prompt=question, image=corrupted))
    n_a, n_b = a.input_ids.shape[1], b.input_ids.shape[1]
    if n_a != n_b:
        raise InputError(f"The question about the clean picture is {n_a} tokens and about the corrupted one {n_b} "
                         "(this model gives pictures of other sizes other numbers of image tokens); patching needs "
                         "pictures of the same size.")
    if not torch.equal(a.input_ids, b.input_ids) or set(a.model_inputs()) != set(b.model_inputs()):
        raise InputError("The two pictures give different prompt tokens for the same question; patching needs the "
                         "same tokens, with only the pictures different.")
    return a, b


def _model_inputs(inputs: VlmInputs, rows: int, model) -> dict:
    """The model inputs of one prompt, `rows` copies along the batch (the picture's inputs too)."""
    given = inputs.model_inputs()
    if rows > 1:
        given = {name: torch.cat([value] * rows) for name, value in given.items()}
    return placed(given, model)


def answer_logits(handle: ModelHandle, inputs: VlmInputs, rows: int = 1) -> torch.Tensor:
    """The logits at the answer position (the last prompt token)  # [batch, vocab]."""
    return handle.model(**_model_inputs(inputs, rows, handle.model), use_cache=False, logits_to_keep=1).logits[:, -1]


def vlm_logits(handle: ModelHandle, inputs: VlmInputs) -> Logits:
    """The question about one picture as patch_runs.Logits: rows -> the answer position's logits."""
    return lambda rows: answer_logits(handle, inputs, rows)


def vlm_head_outputs(handle: ModelHandle, inputs: VlmInputs, answer: Answer) -> tuple[list[torch.Tensor], float]:
    """One plain forward: every LM layer's head outputs z  # [1, token, head, head_dim] and the metric."""
    return recorded_heads(handle, vlm_logits(handle, inputs), answer)


def vlm_metric(handle: ModelHandle, inputs: VlmInputs, answer: Answer,
               patches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """The metric of one forward with `patches` (the session's head_patches) active."""
    return metric(vlm_logits(handle, inputs), answer, patches)


def vlm_patching_sweep(handle: ModelHandle, source: VlmInputs, dest: VlmInputs, answer: Answer,
                       heads_list: list[tuple[int, int]] | None = None, batch_size: int | None = None,
                       progress: Progress = no_progress, rows: list[int] | None = None
                       ) -> tuple[float, float, np.ndarray]:
    """(source metric, destination metric, patched metric  # [layer, head]): each LM head's output z, at every
    position (or at the positions `rows` only), taken from the source picture's run into the destination
    picture's run, one head at a time, B per forward."""
    meta = handle.meta
    z_source, source_value = vlm_head_outputs(handle, source, answer)
    if rows is None:
        dest_value = vlm_metric(handle, dest, answer)
    else:  # the source's z at `rows`, the destination's own elsewhere (exact for one head patched per row)
        z_dest, dest_value = vlm_head_outputs(handle, dest, answer)
        at = torch.zeros(dest.input_ids.shape[1], dtype=torch.bool)
        at[list(rows)] = True
        z_source = [torch.where(at[None, :, None, None], zs, zd) for zs, zd in zip(z_source, z_dest)]
    patched = patch_each_head(handle, z_source, vlm_logits(handle, dest), answer,
                              heads_list or [(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)],
                              batch_size or batch_rows(dest.input_ids.shape[1], meta.n_heads), progress)
    return source_value, dest_value, patched


def patched_rows(inputs: VlmInputs, positions: str) -> list[int] | None:
    """The rows `positions` names: None for "all", the image tokens' positions for "image", the rest for "text"."""
    if positions == "all":
        return None
    image = sorted(int(i) for i in inputs.positions)
    if positions == "image":
        return image
    if positions == "text":
        return sorted(set(range(inputs.input_ids.shape[1])) - set(image))
    raise InputError(f"Unknown patched positions {positions!r}; use all, image or text.")


def vlm_patching_probe(handle: ModelHandle, p: VlmPatchingParams, put, progress: Progress,
                       batch_size: int | None = None) -> dict:
    """Every LM head patched alone between the two pictures (VlmPatchingParams).  Stores patched  # [layer,
    head] (the metric with that head patched; NaN where not measured); the record holds the clean and
    corrupted metrics, the prompt's tokens and the image tokens' span."""
    clean, corrupted = picture_pair(handle, p.question, p.clean_image, p.corrupted_image)
    adapter = VlmAdapter(handle)
    answer = answer_of(adapter.tokenizer, p)
    heads_list = heads_to_patch(handle.meta, p.layers, p.direction)
    source, dest = (clean, corrupted) if p.direction == "denoise" else (corrupted, clean)
    rows = patched_rows(clean, p.positions)
    source_value, dest_value, patched = vlm_patching_sweep(handle, source, dest, answer, heads_list, batch_size,
                                                           progress, rows)
    put("patched", patched.astype(np.float32))
    ids = [int(i) for i in clean.input_ids[0]]
    image = clean.spans.get("image", clean.image_positions)
    return {"n_tokens": len(ids), "tokens": adapter.labels(ids, clean), "image_span": [image.start, image.stop],
            "summary": {**patching_summary(patched, source_value, dest_value, p), "positions": p.positions}}
