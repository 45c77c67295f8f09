"""Activation patching of a ViT image classifier's heads between two pictures (issue 24, item 4: "ViT (class
logit)"), as probes.patching does for text.

Two pictures preprocessed to the same size (so the same number of patch tokens), clean and corrupted, and a
metric on the classifier's output: the logit difference of two classes (target - foil) or the probability
of one.  target "" is the clean picture's top class, foil "" the corrupted picture's.  Patching a head
copies its output z (the input slice of the attention's output projection, at every token) from one run
into the other, B heads per forward through the session's `head_patches`, the rows sharing the unpatched
prefix (probes.patch_runs.widened).  The classifier reads the CLS token, whose embedding is the same in
both runs, so patching every head gives the source run's metric exactly; classifiers that also pool the
patch tokens (DINOv2's CLS + mean) would not, and are refused with one sentence, as is any model without
a classification head.
"""
from __future__ import annotations

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from capture.vision.adapter import VisionAdapter
from core.errors import InputError
from core.probe_results import VitPatchingParams
from core.progress import Progress, no_progress
from core.types import RunSpec
from probes.dla import class_id
from probes.patch_runs import (
    METRICS,
    Answer,
    batch_rows,
    heads_to_patch,
    metric,
    patch_each_head,
    patching_summary,
    recorded_heads,
)

FAMILIES = ("vit", "deit")  # classifiers that read the CLS token alone


def picture_pair(handle: ModelHandle, clean: str, corrupted: str) -> tuple[dict, dict]:
    """The model inputs of the two pictures; one sentence unless they can be patched into each other."""
    meta = handle.meta
    if meta.modality != "vision" or not hasattr(handle.model, "classifier") or \
            handle.model.config.model_type not in FAMILIES:
        raise InputError(f"ViT patching needs a ViT image classifier that reads its CLS token; {meta.name} is not one.")
    if clean == corrupted:
        raise InputError("The clean and corrupted pictures are the same picture; pick another corrupted one.")
    adapter = VisionAdapter(handle)
    a = adapter.encode(RunSpec(model=meta.name, image=clean))[0]
    b = adapter.encode(RunSpec(model=meta.name, image=corrupted))[0]
    if a.shape != b.shape:
        raise InputError(f"The clean picture is {a.shape[1]} x {a.shape[2]} pixels after preprocessing and the "
                         f"corrupted one {b.shape[1]} x {b.shape[2]}; patching needs pictures of the same size.")
    return adapter.forward_kwargs(a), adapter.forward_kwargs(b)


def class_logits(handle: ModelHandle, inputs: dict, rows: int = 1) -> torch.Tensor:
    """The classifier's logits  # [batch, class]."""
    given = {k: torch.cat([v] * rows) if rows > 1 and isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return handle.model(**given).logits


def answer_for(handle: ModelHandle, p: VitPatchingParams, clean: dict, corrupted: dict) -> Answer:
    """The metric's classes: given by label or number, else each picture's top class."""
    if p.metric not in METRICS:
        raise InputError(f"Unknown patching metric {p.metric!r}; use logit_diff or prob.")
    config = handle.model.config
    with torch.inference_mode():
        target = class_id(config, p.target) if p.target else int(class_logits(handle, clean)[0].argmax())
        if p.metric == "prob":
            return Answer(target, None, "prob")
        foil = class_id(config, p.foil) if p.foil else int(class_logits(handle, corrupted)[0].argmax())
    if foil == target:
        raise InputError("The target and the foil are the same class (both pictures' top class, unless given); "
                         "name a foil class or use the metric prob.")
    return Answer(target, foil, "logit_diff")


def vit_head_outputs(handle: ModelHandle, inputs: dict, answer: Answer) -> tuple[list[torch.Tensor], float]:
    """One plain forward: every layer's head outputs z  # [1, token, head, head_dim] and the metric."""
    return recorded_heads(handle, lambda rows: class_logits(handle, inputs, rows), answer)


def vit_metric(handle: ModelHandle, inputs: dict, answer: Answer, patches: dict | None = None) -> float:
    """The metric of one forward with `patches` (the session's head_patches) active."""
    return metric(lambda rows: class_logits(handle, inputs, rows), answer, patches)


def vit_patching_sweep(handle: ModelHandle, source: dict, dest: dict, answer: Answer,
                       heads_list: list[tuple[int, int]] | None = None, batch_size: int | None = None,
                       progress: Progress = no_progress) -> tuple[float, float, np.ndarray]:
    """(source metric, destination metric, patched metric  # [layer, head]): each head's output z, at every
    token, taken from the source picture's run into the destination picture's, one head at a time, B per forward."""
    meta = handle.meta
    z_source, source_value = vit_head_outputs(handle, source, answer)
    dest_value = vit_metric(handle, dest, answer)
    patched = patch_each_head(handle, z_source, lambda rows: class_logits(handle, dest, rows), answer,
                              heads_list or [(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)],
                              batch_size or batch_rows(z_source[0].shape[1], meta.n_heads), progress)
    return source_value, dest_value, patched


def vit_patching_probe(handle: ModelHandle, p: VitPatchingParams, put, progress: Progress,
                       batch_size: int | None = None) -> dict:
    """Every head patched alone between the two pictures (VitPatchingParams).  Stores patched  # [layer, head];
    the record holds the clean and corrupted metrics and the two classes."""
    clean, corrupted = picture_pair(handle, p.clean_image, p.corrupted_image)
    answer = answer_for(handle, p, clean, corrupted)
    heads_list = heads_to_patch(handle.meta, p.layers, p.direction)
    source, dest = (clean, corrupted) if p.direction == "denoise" else (corrupted, clean)
    source_value, dest_value, patched = vit_patching_sweep(handle, source, dest, answer, heads_list, batch_size,
                                                           progress)
    put("patched", patched.astype(np.float32))
    labels = handle.model.config.id2label or {}

    def name(i: int | None):
        return None if i is None else str(labels.get(i, i))

    return {"target": name(answer.target), "foil": name(answer.foil),
            "summary": patching_summary(patched, source_value, dest_value, p)}
