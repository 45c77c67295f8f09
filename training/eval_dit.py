"""Quality of the shapes-dit, measured on generated pixels with the scene generator's knowledge.

    nice -n 19 .venv/bin/python training/eval_dit.py                 # 200 held-out captions, writes results
    nice -n 19 .venv/bin/python training/eval_dit.py --n 40 --no-write

For each held-out caption (never drawn in training: `scene_splits.held_out`) one sample (seed = its index)
is generated with the model's default steps and guidance, then read back with `scene_reading.check_image`:
per requested object, the largest blob of its colour (palette distance on high-chroma pixels) -
colour right if the blob is there, position right if its centroid lies in the requested 3 x 3 cell,
shape right if its outline best matches the requested shape.  A sample is right for colour
(position, shape) when every object it asks for is.  Reported per sample and per object, for one-
and two-object captions, and written to the model's headscope.json ("quality") with a sample grid,
assets/models/shapes-dit/samples.png.

`--choose-guidance` first picks the classifier-free guidance scale on *training* captions (never the
held-out ones) and stores it in headscope.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from core import scene_reading, scene_splits, scenes  # noqa: E402

BAR = 0.80  # the bar: colour and position right in >= 80% of held-out samples


def held_out_captions(n: int, seed: int = 12345) -> list[str]:
    rng = np.random.default_rng(seed)
    return [scene_splits.random_caption(rng, scenes.DIT, split="held_out") for _ in range(n)]


def train_captions(n: int, seed: int = 777) -> list[str]:
    rng = np.random.default_rng(seed)
    return [scene_splits.random_caption(rng, scenes.DIT, split="train") for _ in range(n)]


def generate(pipe, captions: list[str], seeds: list[int], steps: int, guidance=None, batch: int = 50,
             intervention=None) -> np.ndarray:
    out = []
    for start in range(0, len(captions), batch):
        out.append(pipe.sample(captions[start:start + batch], seeds[start:start + batch], steps=steps,
                               guidance=guidance, intervention=intervention))
    return np.concatenate(out)


def score(images: np.ndarray, captions: list[str]) -> dict:
    """Per-sample and per-object accuracies of generated images against their captions."""
    per_sample = {"colour": [], "position": [], "shape": []}
    per_object = {"colour": [], "position": [], "shape": []}
    by_count: dict[int, dict[str, list]] = {}
    for image, caption in zip(images, captions):
        checks = scene_reading.check_image(image, caption)
        c = [x.colour_ok for x in checks]
        p = [x.position_ok for x in checks]
        s = [x.shape_ok for x in checks]
        for name, v in (("colour", c), ("position", p), ("shape", s)):
            per_sample[name].append(all(v))
            per_object[name].extend(v)
            by_count.setdefault(len(checks), {"colour": [], "position": [], "shape": []})[name].append(all(v))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {
        "n": len(captions),
        "sample": {k: mean(v) for k, v in per_sample.items()},
        "object": {k: mean(v) for k, v in per_object.items()},
        "by_objects": {str(k): {"n": len(v["colour"]), **{m: mean(x) for m, x in v.items()}}
                       for k, v in sorted(by_count.items())},
    }


def evaluate(pipe, n: int = 200, steps: int | None = None, guidance: float | None = None, seed: int = 12345) -> dict:
    from capture.dit import model as dit_model

    captions = held_out_captions(n, seed)
    seeds = list(range(n))
    steps = steps or dit_model.DEFAULT_STEPS
    g = dit_model.Guidance(cfg=pipe.guidance if guidance is None else guidance)
    t0 = time.time()
    images = generate(pipe, captions, seeds, steps, g)
    result = score(images, captions)
    result.update(steps=steps, guidance=g.cfg, seconds=round(time.time() - t0, 1), split="held_out",
                  caption_seed=seed)
    result["_images"] = images
    result["_captions"] = captions
    return result


def choose_guidance(pipe, candidates=(1.0, 2.0, 3.0, 4.5, 6.0), n: int = 100, steps: int | None = None) -> tuple[float, dict]:
    """The CFG scale with the best colour + position accuracy on training captions."""
    from capture.dit import model as dit_model

    captions = train_captions(n)
    seeds = [10_000 + i for i in range(n)]
    results = {}
    for cfg in candidates:
        images = generate(pipe, captions, seeds, steps or dit_model.DEFAULT_STEPS, dit_model.Guidance(cfg=cfg))
        r = score(images, captions)
        results[cfg] = r
        print(f"  guidance {cfg}: colour {r['sample']['colour']:.3f} position {r['sample']['position']:.3f} "
              f"shape {r['sample']['shape']:.3f}", flush=True)
    best = max(candidates, key=lambda c: (results[c]["sample"]["colour"] + results[c]["sample"]["position"]
                                          + 0.5 * results[c]["sample"]["shape"]))
    return best, {str(k): v["sample"] for k, v in results.items()}


def sample_grid(images: np.ndarray, captions: list[str], path: Path, n: int = 24, per_row: int = 6,
                upscale: int = 4) -> None:
    """A labelled grid of the first n samples (nearest-neighbour upscaled, caption under each)."""
    from PIL import Image, ImageDraw, ImageFont

    n = min(n, len(images))
    size = images.shape[1] * upscale
    label_h = 30
    cell_w = max(size, 236)
    rows = -(-n // per_row)
    sheet = Image.new("RGB", (per_row * cell_w, rows * (size + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, per_row)
        img = Image.fromarray(np.repeat(np.repeat(images[i], upscale, 0), upscale, 1))
        x0 = c * cell_w + (cell_w - size) // 2
        y0 = r * (size + label_h)
        sheet.paste(img, (x0, y0))
        words = captions[i].split(" and ")
        for j, line in enumerate(words[:2]):
            draw.text((c * cell_w + 2, y0 + size + 2 + 13 * j), line[:40], fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def table(result: dict) -> str:
    from bench.common import table as md

    rows = [["all (per sample)", result["n"], f"{result['sample']['colour']:.1%}", f"{result['sample']['position']:.1%}",
             f"{result['sample']['shape']:.1%}"],
            ["all (per object)", "", f"{result['object']['colour']:.1%}", f"{result['object']['position']:.1%}",
             f"{result['object']['shape']:.1%}"]]
    for k, v in result["by_objects"].items():
        rows.append([f"{k} object(s) (per sample)", v["n"], f"{v['colour']:.1%}", f"{v['position']:.1%}",
                     f"{v['shape']:.1%}"])
    return md(["held-out captions", "n", "colour", "position", "shape"], rows)


def main(argv: list[str] | None = None) -> None:
    import torch

    from capture import registry
    from capture.dit import model as dit_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=dit_model.MODEL_DIR)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--choose-guidance", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = dit_model.load(registry.load("minilm"), args.model)
    settings_path = Path(args.model) / "headscope.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    if args.choose_guidance:
        best, sweep = choose_guidance(pipe, steps=args.steps)
        print(f"guidance chosen on training captions: {best}")
        pipe.settings["guidance"] = best
        settings["guidance"] = best
        settings["guidance_sweep_train_captions"] = sweep
    result = evaluate(pipe, args.n, args.steps, args.guidance)
    images, captions = result.pop("_images"), result.pop("_captions")
    print(table(result))
    ok = result["sample"]["colour"] >= BAR and result["sample"]["position"] >= BAR
    print(f"bar (colour and position >= {BAR:.0%} of samples): {'met' if ok else 'NOT met'}")
    if not args.no_write:
        settings["quality"] = {k: v for k, v in result.items()}
        settings_path.write_text(json.dumps(settings, indent=1))
        sample_grid(images, captions, Path(args.model) / "samples.png")
        print(f"wrote {settings_path} and {Path(args.model) / 'samples.png'}")


if __name__ == "__main__":
    main()
