"""HeadHunter-lite: greedy search for the DiT heads whose SoftPAG perturbation most improves an objective.

After Ahn et al. 2025 (HeadHunter / SoftPAG, METHODS §7.1), scaled down for a CPU:

1. baseline: sample `prompts` x `seeds` with classifier-free guidance only, score the images;
2. every single head h: the same samples with SoftPAG on h (u, scale s), scored -> gain(h);
3. greedy: start from the best single head (none, if no single head beats the baseline); each round tries adding every remaining head of the top
   `candidates` singles and keeps the one that raises the objective most; stop after `rounds` rounds
   or when nothing improves.

The objective is read from generated pixels with the scene generator's knowledge
(core.scene_reading.check_image): "colour" = share of requested objects whose colour is present (the
issue's objective), "position", "shape", or "all" (their mean).  Prompts are training-split
captions (the held-out ones stay for evaluation).  Papers' unverified parts: the objective models
(here: a pixel check), candidates per round and rounds (here: 6 and 3).

Any DiT HeadScope loads is searched the same way (shapes-dit in one batch per run; a diffusers
pipeline one sampling run per prompt and seed, at `height` x `width` or its default size; both at `guidance` or
the model's default scale): its
heads are the layers' self- or joint-attention heads, perturbed as capture.dit.presets.softpag says.

The result is cached in the Store under a key of (model revision, parameters): arrays "single"
[layer, head] (objective with that head perturbed) and "single_images" (the per-head contact sheet
of the first prompt / seed, shrunk to at most THUMB_SIDE pixels a side), and a JSON record (kind
"probe", probe "headhunter") with the baseline, the chosen heads and every round.  A second call with
the same parameters is served from the cache.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from cache.store import Store
from capture import registry
from core.errors import CorruptEntry, InputError
from core.keys import stable_hash
from core.progress import Progress, no_progress
from core.types import RunSpec

PROBE = "headhunter"
VERSION = 2
THUMB_SIDE = 64  # the per-head contact sheet keeps pictures at most this many pixels a side


@dataclass(frozen=True)
class HeadHunterParams:
    n_prompts: int = 8
    n_seeds: int = 2
    steps: int = 12
    u: float = 1.0  # SoftPAG strength (1 = PAG's identity)
    scale: float = 2.0  # PAG guidance scale s
    objective: str = "colour"  # "colour" | "position" | "shape" | "all"
    rounds: int = 3
    candidates: int = 6  # best single heads considered in the greedy rounds
    prompt_seed: int = 4242
    height: int = 0  # picture size in pixels; 0 = the model's default (left out of the key)
    width: int = 0
    guidance: float | None = None  # classifier-free guidance scale; None = the model's default (left out of the key)


@dataclass
class HeadHunterResult:
    key: str
    record: dict
    store: Store

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [tuple(h) for h in self.record["selected"]]

    @property
    def baseline(self) -> float:
        return float(self.record["baseline"])

    @property
    def best(self) -> float:
        return float(self.record["best"])

    def single(self) -> np.ndarray:
        """[layer, head]: the objective with only that head perturbed."""
        return np.asarray(self.store.get_array(self.key, "single"))

    def single_images(self) -> np.ndarray:
        """[layer, head, H, W, 3] uint8: the first prompt / seed with each single head perturbed (thumbnails)."""
        return np.asarray(self.store.get_array(self.key, "single_images"))


def probe_key(revision: str, params: HeadHunterParams) -> str:
    fields = {k: v for k, v in asdict(params).items()  # unset sizes and guidance stay out: the old keys hold
              if (v or k not in ("height", "width")) and (v is not None or k != "guidance")}
    return stable_hash({"revision": revision, "probe": PROBE, "params": fields, "version": VERSION})


def thumbnail(images: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """images  # [..., H, W, 3] uint8 shrunk by a whole factor (block means) until no side exceeds `side`."""
    h, w = images.shape[-3:-1]
    f = max(1, -(-max(h, w) // side))
    if f == 1:
        return images
    h, w = h // f * f, w // f * f
    blocks = images[..., :h, :w, :].reshape(images.shape[:-3] + (h // f, f, w // f, f, 3)).astype(np.float32)
    return blocks.mean(axis=(-4, -2)).round().astype(np.uint8)


def find(store: Store, model: str, params: HeadHunterParams) -> HeadHunterResult | None:
    key = probe_key(registry.revision(model), params)
    try:
        record = store.get_meta(key)
        if not record or record.get("kind") != "probe" or record.get("probe") != PROBE:
            return None
        result = HeadHunterResult(key, record, store)
        result.single()
        return result
    except (CorruptEntry, KeyError, ValueError):
        store.evict(key)
        return None


def objective_of(images: np.ndarray, captions: list[str], objective: str) -> float:
    from core import scene_reading

    values = []
    for image, caption in zip(images, captions):
        for c in scene_reading.check_image(image, caption):
            parts = {"colour": c.colour_ok, "position": c.position_ok, "shape": c.shape_ok}
            values.append(np.mean(list(parts.values())) if objective == "all" else parts[objective])
    return float(np.mean(values)) if values else 0.0


def headhunter(model: str = "shapes-dit", params: HeadHunterParams | None = None, store: Store | None = None,
               progress: Progress = no_progress, force: bool = False) -> HeadHunterResult:
    """Run (or fetch from the cache) the greedy head search; see the module docstring."""
    from capture.dit import presets as dit_presets
    from capture.dit.adapter import DitAdapter, check_guidance
    from core import scene_splits, scenes
    from core.interventions import Intervention

    p = params or HeadHunterParams()
    if p.objective not in ("colour", "position", "shape", "all"):
        raise InputError("The objective is colour, position, shape or all.")
    if not 0.0 <= p.u <= 1.0 or p.n_prompts < 1 or p.n_seeds < 1 or p.steps < 1:
        raise InputError("HeadHunter needs u in [0, 1] and at least one prompt, seed and step.")
    if store is None:
        from capture.api import default_store

        store = default_store()
    if not force:
        found = find(store, model, p)
        if found is not None:
            return found
    key = probe_key(registry.revision(model), p)
    with store.lock(key):
        if not force:
            found = find(store, model, p)
            if found is not None:
                return found
        progress(0.0, f"loading {model}")
        handle = registry.load(model)
        if handle.meta.modality != "dit":
            raise InputError(f"HeadHunter searches diffusion transformers; {model} is not one.")
        check_guidance(p.guidance)
        sampler = handle.tokenizer  # capture.dit.model.ShapesDit or capture.dit.pipeline.PipelineDit
        height, width = DitAdapter(handle).size(RunSpec(model=model, height=p.height, width=p.width))
        rng = np.random.default_rng(p.prompt_seed)
        prompts = [scene_splits.random_caption(rng, scenes.DIT, split="train") for _ in range(p.n_prompts)]
        captions = [c for c in prompts for _ in range(p.n_seeds)]
        seeds = [s for _ in prompts for s in range(p.n_seeds)]
        layers, heads = handle.meta.n_layers, handle.meta.n_heads
        total = 1 + layers * heads + p.rounds * p.candidates
        done = [0]
        t0 = time.perf_counter()

        def run(selected: list[tuple[int, int]]) -> tuple[float, np.ndarray]:
            iv = dit_presets.softpag(selected, p.u, p.scale) if selected else Intervention()
            with handle.lock:
                images = sampler.sample_many(captions, seeds, p.steps, height, width, iv, guidance=p.guidance)
            done[0] += 1
            progress(min(0.99, done[0] / total), f"HeadHunter: {done[0]} sampling runs")
            return objective_of(images, captions, p.objective), images

        baseline, base_images = run([])
        single = np.zeros((layers, heads), dtype=np.float32)
        sheet = np.zeros((layers, heads) + thumbnail(base_images[0]).shape, dtype=np.uint8)
        for layer in range(layers):
            for head in range(heads):
                value, images = run([(layer, head)])
                single[layer, head] = value
                sheet[layer, head] = thumbnail(images[0])
        order = sorted(((float(single[l, h]), l, h) for l in range(layers) for h in range(heads)), reverse=True)
        pool = [(l, h) for _v, l, h in order[: max(1, p.candidates)]]
        if float(single[pool[0]]) > baseline:
            selected = [pool[0]]
            best = float(single[pool[0]])
            history = [{"round": 0, "added": list(pool[0]), "objective": best}]
        else:  # no single head helps: nothing to build on
            selected, best = [], baseline
            history = [{"round": 0, "added": None, "objective": float(single[pool[0]])}]
        for r in range(1, p.rounds if selected else 0):
            trials = []
            for cand in pool:
                if cand in selected:
                    continue
                value, _ = run(selected + [cand])
                trials.append((value, cand))
            if not trials:
                break
            value, cand = max(trials)
            history.append({"round": r, "tried": [[c[0], c[1], v] for v, c in trials], "added": list(cand),
                            "objective": value})
            if value <= best:
                history[-1]["kept"] = False
                break
            selected.append(cand)
            best = value
        if best <= baseline:
            note = "no head improved the objective over the baseline"
        else:
            note = f"{len(selected)} head(s) raise the objective from {baseline:.3f} to {best:.3f}"
        record = {"kind": "probe", "probe": PROBE, "model": model, "revision": registry.revision(model),
                  "params": asdict(p), "prompts": prompts, "baseline": baseline, "best": best,
                  "selected": [list(h) for h in selected], "history": history, "note": note,
                  "arrays": ["single", "single_images", "baseline_images"],
                  "seconds": round(time.perf_counter() - t0, 2)}
        store.evict(key)
        store.put_array(key, "single", single)
        store.put_array(key, "single_images", sheet)
        store.put_array(key, "baseline_images", thumbnail(base_images))
        store.put_meta(key, record)
        progress(1.0, "done")
    found = find(store, model, p)
    assert found is not None
    return found


__all__ = ["HeadHunterParams", "HeadHunterResult", "headhunter", "find", "probe_key", "objective_of"]
