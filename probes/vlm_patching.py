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

from analytics.attribution import patching_effect
from capture.engine.handle import ModelHandle
from capture.engine.session import session
from capture.vlm.adapter import VlmAdapter
from capture.vlm.inputs import VlmInputs, placed
from core.errors import InputError
from core.probe_results import VlmPatchingParams
from core.progress import Progress, no_progress
from core.types import RunSpec
from probes.common import top_heads
from probes.patch_runs import Answer, answer_of, batch_rows, widened
from probes.patching import DIRECTIONS


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


@torch.inference_mode()
def vlm_head_outputs(handle: ModelHandle, inputs: VlmInputs, answer: Answer) -> tuple[list[torch.Tensor], float]:
    """One plain forward: every LM layer's head outputs z  # [1, token, head, head_dim] and the metric."""
    z: list = [None] * handle.meta.n_layers

    def take(layer: int, heads: torch.Tensor) -> None:
        z[layer] = heads.clone()

    with session(head_outputs=take):
        value = float(answer.score(answer_logits(handle, inputs))[0])
    return z, value


def vlm_metric(handle: ModelHandle, inputs: VlmInputs, answer: Answer,
               patches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """The metric of one forward with `patches` (the session's head_patches) active."""
    with torch.inference_mode(), session(head_patches=patches or {}):
        return float(answer.score(answer_logits(handle, inputs))[0])


def vlm_patching_sweep(handle: ModelHandle, source: VlmInputs, dest: VlmInputs, answer: Answer,
                       heads_list: list[tuple[int, int]] | None = None, batch_size: int | None = None,
                       progress: Progress = no_progress, rows: list[int] | None = None
                       ) -> tuple[float, float, np.ndarray]:
    """(source metric, destination metric, patched metric  # [layer, head]): each LM head's output z, at every
    position (or at the positions `rows` only), taken from the source picture's run into the destination
    picture's run, one head at a time, B per forward."""
    meta = handle.meta
    heads_list = sorted(heads_list if heads_list is not None else
                        [(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)])
    z_source, source_value = vlm_head_outputs(handle, source, answer)
    if rows is None:
        dest_value = vlm_metric(handle, dest, answer)
    else:  # the source's z at `rows`, the destination's own elsewhere (exact for one head patched per row)
        z_dest, dest_value = vlm_head_outputs(handle, dest, answer)
        at = torch.zeros(dest.input_ids.shape[1], dtype=torch.bool)
        at[list(rows)] = True
        z_source = [torch.where(at[None, :, None, None], zs, zd) for zs, zd in zip(z_source, z_dest)]
    batch_size = batch_size or batch_rows(dest.input_ids.shape[1], meta.n_heads)
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
            values = answer.score(answer_logits(handle, dest, 1 if blocks is not None else B))  # [B]
        for b, (l, h) in enumerate(batch):
            patched[l, h] = float(values[b])
        progress(0.1 + 0.88 * (start + B) / len(heads_list), f"patched {start + B}/{len(heads_list)} heads")
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
    if p.direction not in DIRECTIONS:
        raise InputError(f"Unknown patching direction {p.direction!r}; use denoise or noise.")
    clean, corrupted = picture_pair(handle, p.question, p.clean_image, p.corrupted_image)
    adapter = VlmAdapter(handle)
    answer = answer_of(adapter.tokenizer, p)
    meta = handle.meta
    if any(not 0 <= l < meta.n_layers for l in p.layers):
        raise InputError(f"Patched layers must lie in 0..{meta.n_layers - 1}.")
    source, dest = (clean, corrupted) if p.direction == "denoise" else (corrupted, clean)
    heads_list = [(l, h) for l in (sorted(set(p.layers)) or range(meta.n_layers)) for h in range(meta.n_heads)]
    rows = patched_rows(clean, p.positions)
    source_value, dest_value, patched = vlm_patching_sweep(handle, source, dest, answer, heads_list, batch_size,
                                                           progress, rows)
    put("patched", patched.astype(np.float32))
    denoise = p.direction == "denoise"
    clean_value, corrupted_value = (source_value, dest_value) if denoise else (dest_value, source_value)
    effect = patching_effect(patched, clean_value, corrupted_value, p.direction)
    ids = [int(i) for i in clean.input_ids[0]]
    image = clean.spans.get("image", clean.image_positions)
    return {"n_tokens": len(ids), "tokens": adapter.labels(ids, clean), "image_span": [image.start, image.stop],
            "summary": {"clean": clean_value, "corrupted": corrupted_value, "metric": p.metric,
                        "direction": p.direction, "positions": p.positions,
                        "top": top_heads(np.nan_to_num(effect, nan=-np.inf))}}
