"""Which scenes are for training and which are held out for evaluation (both shapes models).

The split is of the caption space: `held_out(caption)` is a fixed hash of the caption text, True for
~10% of captions.  Training never draws a held-out caption (`random_caption(..., split="train")` for
shapes-dit's captions, `training_scene_seeds` for shapes-vlm's scenes); evaluations and the probes that
measure the models on new pictures use only held-out ones (`random_caption(..., split="held_out")`,
`held_out_scenes`).  The shapes-vlm's scenes are also apart by seed: training scenes have seeds from
TRAIN_SEED_BASE on, held-out scenes the first seeds from 0 whose caption is held out.
"""
from __future__ import annotations

import hashlib

import numpy as np

from core.scenes import DIT, VLM, Scene, SceneConfig, caption_of, make_scene, random_specs

TRAIN_SEED_BASE = 1_000_000  # shapes-vlm training scenes are make_scene(TRAIN_SEED_BASE + i); evaluation uses seeds below


def held_out(caption: str, fraction: float = 0.1) -> bool:
    """A fixed split of the caption space (by hash): True for the captions kept out of training."""
    digest = hashlib.sha256(caption.encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def random_caption(rng: np.random.Generator, config: SceneConfig = DIT, split: str = "train") -> str:
    """A caption drawn from the training ("train") or the held-out ("held_out") part of the space."""
    if split not in ("train", "held_out"):
        raise ValueError("split is 'train' or 'held_out'")
    while True:
        caption = caption_of(random_specs(rng, config))
        if held_out(caption) == (split == "held_out"):
            return caption


def training_scene_seeds(n: int) -> list[int]:
    """The first `n` shapes-vlm scene seeds (from TRAIN_SEED_BASE) whose caption is not held out."""
    out, seed = [], TRAIN_SEED_BASE
    while len(out) < n:
        if not held_out(make_scene(seed, VLM).caption):
            out.append(seed)
        seed += 1
    return out


def held_out_scenes(n: int) -> list[Scene]:
    """The first `n` shapes-vlm scenes (seeds 0, 1, ...) whose caption is held out of training."""
    out, seed = [], 0
    while len(out) < n:
        scene = make_scene(seed, VLM)
        if held_out(scene.caption):
            out.append(scene)
        seed += 1
        if seed >= TRAIN_SEED_BASE:
            raise RuntimeError("evaluation seeds ran into the training seeds")
    return out


__all__ = ["TRAIN_SEED_BASE", "held_out", "random_caption", "training_scene_seeds", "held_out_scenes"]
