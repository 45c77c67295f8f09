"""The shapes-vlm's training data: which questions each scene asks, dense image-token targets, and the
frozen DINOv2 features of the training scenes.

Scenes are core.scenes' VLM scenes from core.scene_splits.training_scene_seeds (captions never held
out).  Per scene and step, `pick_questions` spreads up to k of its VQA pairs (`scenes.questions`) over
the question types, and `caption_qa` adds the caption as the answer to "describe the picture." (LLaVA's
stage-1 task; dense supervision of every object).  Optional dense targets (`--dense`): each image token
predicts the colour word of the object covering its patch, or "none" over background.

DINOv2 is frozen, so its features (hidden states at LLaVA's feature layer, CLS dropped: [64, 384] per
scene) are computed once for the training scenes and kept in ./cache_data/training/ (`feature_table`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from capture.vlm import model as vlm_model
from core import scenes

FEATURE_CACHE = Path(__file__).resolve().parent.parent / "cache_data" / "training"  # DINOv2 features of training scenes
CAPTION_QUESTION = "describe the picture."  # an extra training task: the scene's caption (LLaVA's stage-1 kind)


def caption_qa(scene: scenes.Scene) -> scenes.QA:
    """The scene's caption as the answer to CAPTION_QUESTION (kind "caption", about every object)."""
    return scenes.QA(CAPTION_QUESTION, scene.caption, "caption", tuple(range(len(scene.objects))))


def pick_questions(qas: list[scenes.QA], k: int, rng: np.random.Generator) -> list[scenes.QA]:
    """Up to k questions, spread over the question types (round robin over kinds in random order)."""
    groups: dict[str, list[scenes.QA]] = {}
    for qa in qas:
        groups.setdefault(scenes.kind_of(qa), []).append(qa)
    for g in groups.values():
        rng.shuffle(g)
    order = list(groups)
    rng.shuffle(order)
    out = []
    while len(out) < k and any(groups.values()):
        for kind in order:
            if groups[kind] and len(out) < k:
                out.append(groups[kind].pop())
    return out


# ---- dense patch supervision: each image token names the colour under it --------------------------------

DENSE_BACKGROUND = "none"  # the target of an image token over background
DENSE_COVER = 0.4  # an image token is labelled with an object's colour when the object covers >= 40% of its patch


def patch_colours(scene: scenes.Scene, grid: int = 8) -> list[str | None]:
    """Per image token (row-major over the grid): the colour of the object covering >= DENSE_COVER of
    its patch, DENSE_BACKGROUND where no object touches it, None for partly covered patches (no target)."""
    size = scene.image.shape[0]
    step = size // grid
    out: list[str | None] = []
    cover = np.stack([o.mask for o in scene.objects]).reshape(len(scene.objects), grid, step, grid, step).mean((2, 4))
    for r in range(grid):
        for c in range(grid):
            best = int(cover[:, r, c].argmax())
            if cover[best, r, c] >= DENSE_COVER:
                out.append(scene.objects[best].colour)
            elif cover[:, r, c].max() == 0:
                out.append(DENSE_BACKGROUND)
            else:
                out.append(None)
    return out


def dense_targets(labels: list[str | None], token_of: dict[str, int], rng: np.random.Generator
                  ) -> list[tuple[int, int]]:
    """(image token index, target token id): every object patch and as many background patches."""
    objects = [(i, token_of[w]) for i, w in enumerate(labels) if w not in (None, DENSE_BACKGROUND)]
    background = [i for i, w in enumerate(labels) if w == DENSE_BACKGROUND]
    keep = rng.permutation(len(background))[: len(objects)]
    return objects + [(background[int(k)], token_of[DENSE_BACKGROUND]) for k in sorted(keep)]


# ---- frozen DINOv2 features ---------------------------------------------------------------------------

def vision_features(model, processor, images: list[np.ndarray], batch: int = 32) -> np.ndarray:
    """[n, 64, 384] float16: DINOv2 hidden states at LLaVA's feature layer, CLS dropped (pre-projector)."""
    config = model.config
    out = np.empty((len(images), vlm_model.N_IMAGE_TOKENS, config.vision_config.hidden_size), dtype=np.float16)
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = torch.from_numpy(np.stack([processor.pixels(im)[0] for im in images[start:start + batch]]))
            hs = model.model.vision_tower(pixels.to(model.device), output_hidden_states=True).hidden_states
            feats = hs[config.vision_feature_layer][:, 1:]  # [batch, 64, 384]: CLS dropped
            out[start:start + len(feats)] = feats.float().cpu().numpy().astype(np.float16)
    return out


def feature_table(model, processor, seeds: list[int]) -> np.ndarray:
    """[scene, 64, 384] float16: `vision_features` of the scenes `seeds`, computed once and kept in
    FEATURE_CACHE (one file per seed list)."""
    cache = FEATURE_CACHE / f"shapes-vlm-feats-{len(seeds)}-{seeds[0]}-{seeds[-1]}.npy"
    if cache.exists():
        table = np.load(cache)
        if table.shape[0] == len(seeds):
            return table
    t0 = time.time()
    parts = []
    for start in range(0, len(seeds), 256):
        chunk = seeds[start:start + 256]
        parts.append(vision_features(model, processor, [scenes.make_scene(s, scenes.VLM).image for s in chunk]))
        print(f"  DINOv2 features {start + len(chunk)}/{len(seeds)} ({time.time() - t0:.0f} s)", flush=True)
    table = np.concatenate(parts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, table)
    return table
