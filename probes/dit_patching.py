"""Activation patching of a diffusion transformer's heads between two prompts, measured on the picture
(issue 24, item 4): shapes-dit (capture.dit.model.ShapesDit, SD3-style joint attention).

Two prompts with the same number of real text tokens, clean and corrupted, one seed (so the same initial
noise) and the model's own sampler (flow-matching Euler, classifier-free guidance at the model's scale or the
params' `guidance`, as a capture's RunSpec.guidance).  The clean and the
corrupted runs record every head's output z (the to_out input slice of every joint-attention layer, at
every image and text position) at every sampling step, in the conditional branch.  Patching a head runs
the destination prompt's sampling again with that head's z taken, at every step, from the source run's
conditional branch at the same step (the unconditional branch, whose prompt is "" in both runs, is left
to compute); B heads per batch, one sampling trajectory per batch row.
- "denoise": clean z into the corrupted prompt's sampling; "noise": corrupted z into the clean one's.
- The metric is the distance of the final picture to the clean run's: the mean squared difference of
  the two pictures in [-1, 1] (clamped as for display, before rounding to 8 bits), so the clean run
  scores 0 and the corrupted run its own distance; analytics.attribution.patching_effect normalises it
  (denoise: the share of the distance a head removes; noise: the share it adds).
- shapes-dit also reads the prompt through its pooled embedding (the adaLN modulation of every block),
  so patching every head does not give the clean picture by itself; with `patch_pooled` the patched rows'
  pooled embedding is the source prompt's too, and then patching every head gives the source picture
  exactly (tests/models/test_dit_patching.py holds both).
Diffusers pipelines (SD3, Flux, PixArt, Sana) sample through their own pipeline call and are refused
with one sentence.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from analytics.attribution import patching_effect
from capture.dit.adapter import check_guidance
from capture.dit.model import ShapesDit, initial_noise, to_pixels
from capture.engine.handle import ModelHandle
from capture.engine.session import session
from core.errors import InputError
from core.probe_results import DitPatchingParams
from core.progress import Progress, no_progress
from core.types import MAX_STEPS
from probes.common import top_heads
from probes.patch_runs import DIRECTIONS

MAX_ROWS = 64  # sampling trajectories per batch (each with its unconditional row)
Steps = list[list[torch.Tensor]]  # step -> layer -> z  # [1, token, head, head_dim]


def sampler_of(handle: ModelHandle) -> ShapesDit:
    if handle.meta.modality != "dit" or not isinstance(handle.tokenizer, ShapesDit):
        raise InputError(f"DiT patching runs on shapes-dit's own sampler; {handle.meta.name} is not shapes-dit.")
    return handle.tokenizer


def prompt_pair(pipe: ShapesDit, clean: str, corrupted: str) -> tuple[str, str]:
    """The two prompts, stripped; one sentence unless they can be patched into each other."""
    clean, corrupted = clean.strip(), corrupted.strip()
    if not clean or not corrupted:
        raise InputError("DiT patching needs two non-empty prompts, a clean one and a corrupted one.")
    if clean == corrupted:
        raise InputError("The clean and corrupted prompts are the same; change a word of the corrupted one.")
    limit = pipe.text.text_len
    for name, prompt in (("clean", clean), ("corrupted", corrupted)):
        if len(pipe.text.tokenizer(prompt)["input_ids"]) > limit:
            raise InputError(f"The {name} prompt is longer than the {limit} tokens shapes-dit reads; shorten it.")
    a, b = pipe.text.n_real(clean), pipe.text.n_real(corrupted)
    if a != b:
        raise InputError(f"The clean prompt is {a} tokens and the corrupted one {b}; patching needs the same number "
                         "of tokens in both (swap words for words of as many tokens).")
    return clean, corrupted


def sample_rows(pipe: ShapesDit, prompt: str, seed: int, steps: int, rows: int = 1,
                patches_at: Callable[[int], dict] | None = None, take: Callable[[int, int, torch.Tensor], None] | None = None,
                pooled: torch.Tensor | None = None, guidance: float | None = None) -> torch.Tensor:
    """`rows` sampling trajectories of `prompt` from the noise of `seed`, as ShapesDit.sample runs them (CFG at
    scale `guidance`, None: the model's; no PAG); before step i the session gets `patches_at(i)` as its
    head_patches (masks over the 2 x rows batch: conditional rows first) and `take(step, layer, z)` receives the
    conditional row 0's head outputs.  `pooled`  # [rows, 384] replaces the conditional rows' pooled embedding.
    Returns x  # [rows, 3, H, W]."""
    cfg = pipe.guidance if guidance is None else guidance
    use_cfg = cfg != 1.0
    states, pooled_all = pipe.text.encode([prompt] + ([""] if use_cfg else []))
    cond_s = states[:1].expand(rows, -1, -1)
    cond_p = pooled_all[:1].expand(rows, -1) if pooled is None else pooled
    parts_s, parts_p = [cond_s], [cond_p]
    if use_cfg:
        parts_s.append(states[1:].expand(rows, -1, -1))
        parts_p.append(pooled_all[1:].expand(rows, -1))
    all_s, all_p = torch.cat(parts_s), torch.cat(parts_p)
    branches = len(parts_s)
    scheduler = pipe.scheduler()
    scheduler.set_timesteps(steps)
    x = initial_noise([seed] * rows, pipe.image_size)
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            record = None if take is None else (lambda layer, z, i=i: take(i, layer, z[:1].clone()))
            with session(head_patches=patches_at(i) if patches_at else None, head_outputs=record):
                v = pipe.velocity(torch.cat([x] * branches), t.expand(rows * branches), all_s, all_p)
            out = v[:rows]
            if use_cfg:
                out = v[rows:] + cfg * (v[:rows] - v[rows:])
            x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def recorded_run(pipe: ShapesDit, prompt: str, seed: int, steps: int, n_layers: int,
                 guidance: float | None = None) -> tuple[torch.Tensor, Steps]:
    """One plain sampling run: its final x  # [1, 3, H, W] and every step's head outputs (conditional branch)."""
    z: Steps = [[None] * n_layers for _ in range(steps)]

    def take(step: int, layer: int, heads: torch.Tensor) -> None:
        z[step][layer] = heads

    return sample_rows(pipe, prompt, seed, steps, take=take, guidance=guidance), z


def distance(x: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Mean squared difference  # [rows] of pictures x  # [rows, 3, H, W] to reference  # [1, 3, H, W], in [-1, 1]."""
    a, b = x.double().clamp(-1, 1), reference.double().clamp(-1, 1)
    return ((a - b) ** 2).mean(dim=(1, 2, 3)).numpy()


def dit_patching_sweep(handle: ModelHandle, source: str, dest: str, clean: str, seed: int, steps: int,
                       heads_list: list[tuple[int, int]] | None = None, patch_pooled: bool = False,
                       batch_size: int | None = None, progress: Progress = no_progress,
                       guidance: float | None = None) -> tuple[float, float, np.ndarray, dict]:
    """(source metric, destination metric, patched metric  # [layer, head], pictures): each head's output,
    at every position and step, taken from the source prompt's run into the destination prompt's, one head
    per trajectory, B trajectories per batch, at classifier-free guidance scale `guidance` (None: the model's);
    the metric is the distance to the `clean` prompt's picture.  pictures: "source", "dest"  # [H, W, 3] uint8."""
    pipe = sampler_of(handle)
    guidance = pipe.guidance if guidance is None else guidance
    meta = handle.meta
    heads_list = sorted(heads_list if heads_list is not None else
                        [(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)])
    x_source, z_source = recorded_run(pipe, source, seed, steps, meta.n_layers, guidance)
    x_dest = sample_rows(pipe, dest, seed, steps, guidance=guidance)
    x_clean = x_source if clean == source else x_dest
    source_value, dest_value = float(distance(x_source, x_clean)[0]), float(distance(x_dest, x_clean)[0])
    progress(0.1, "the two prompts sampled")
    pooled_source = pipe.text.encode([source])[1] if patch_pooled else None  # [1, 384]
    batch_size = max(1, min(batch_size or MAX_ROWS, MAX_ROWS))
    branches = 2 if guidance != 1.0 else 1
    patched = np.full((meta.n_layers, meta.n_heads), np.nan)
    for start in range(0, len(heads_list), batch_size):
        batch = heads_list[start : start + batch_size]
        B = len(batch)
        masks: dict[int, torch.Tensor] = {}
        for b, (l, h) in enumerate(batch):
            masks.setdefault(l, torch.zeros(B * branches, meta.n_heads, dtype=torch.bool))[b, h] = True  # cond row b

        def patches_at(i: int) -> dict:
            return {l: (mask, z_source[i][l]) for l, mask in masks.items()}

        pooled = None if pooled_source is None else pooled_source.expand(B, -1)
        x = sample_rows(pipe, dest, seed, steps, B, patches_at, pooled=pooled, guidance=guidance)
        for b, (l, h) in enumerate(batch):
            patched[l, h] = float(distance(x[b : b + 1], x_clean)[0])
        progress(0.1 + 0.88 * (start + B) / len(heads_list), f"patched {start + B}/{len(heads_list)} heads")
    pictures = {"source": to_pixels(x_source)[0], "dest": to_pixels(x_dest)[0]}
    return source_value, dest_value, patched, pictures


def dit_patching_probe(handle: ModelHandle, p: DitPatchingParams, put, progress: Progress,
                       batch_size: int | None = None) -> dict:
    """Every head patched alone between the two prompts (DitPatchingParams).  Stores patched  # [layer, head]
    (the distance to the clean picture with that head patched; NaN where not measured) and the clean and
    corrupted pictures; the record holds both metrics and the prompts' tokens."""
    pipe = sampler_of(handle)
    if p.direction not in DIRECTIONS:
        raise InputError(f"Unknown patching direction {p.direction!r}; use denoise or noise.")
    if p.metric != "mse":
        raise InputError(f"Unknown DiT patching metric {p.metric!r}; use mse (the distance to the clean picture).")
    if not 1 <= p.steps <= MAX_STEPS:
        raise InputError(f"DiT patching samples 1 to {MAX_STEPS} steps.")
    check_guidance(p.guidance)
    clean, corrupted = prompt_pair(pipe, p.clean, p.corrupted)
    meta = handle.meta
    if any(not 0 <= l < meta.n_layers for l in p.layers):
        raise InputError(f"Patched layers must lie in 0..{meta.n_layers - 1}.")
    denoise = p.direction == "denoise"
    source, dest = (clean, corrupted) if denoise else (corrupted, clean)
    heads_list = [(l, h) for l in (sorted(set(p.layers)) or range(meta.n_layers)) for h in range(meta.n_heads)]
    source_value, dest_value, patched, pictures = dit_patching_sweep(
        handle, source, dest, clean, p.seed, p.steps, heads_list, p.patch_pooled, batch_size, progress, p.guidance)
    put("patched", patched.astype(np.float32))
    put("clean_image", pictures["source" if denoise else "dest"])
    put("corrupted_image", pictures["dest" if denoise else "source"])
    clean_value, corrupted_value = (source_value, dest_value) if denoise else (dest_value, source_value)
    effect = patching_effect(patched, clean_value, corrupted_value, p.direction)
    return {"tokens": pipe.text.tokens(clean), "corrupted_tokens": pipe.text.tokens(corrupted),
            "summary": {"clean": clean_value, "corrupted": corrupted_value, "metric": p.metric,
                        "direction": p.direction, "top": top_heads(np.nan_to_num(effect, nan=-np.inf))}}
