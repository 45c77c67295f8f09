"""VLM capture against transformers' own generate + eager forward, per family, and the Gaze page's
measurements (shapes-vlm, CPU).

Per model (shapes-vlm; with --tiny the tiny random LLaVA-OneVision, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
Idefics3, Gemma 3 and PaliGemma of tests/models/tiny_vlms.py; any folder with --model), taken in turn (round
robin, three at a time: more would evict each other from the registry's cache of loaded models, and
every capture would load its model again), median of --repeats:
  plain     the model's processor on the picture and question, the plain transformers model's greedy
            `generate` (SDPA), then the eager model's forward with output_attentions=True over prompt +
            answer (what BertViz-style tools do); persists nothing
  capture   HeadScope `run()`: the same processor, the answer on the fast path, one recorded pass of every
            LM map, the residual stream, the picture and its token boxes and the vision tower's maps
            written to the cache; a fresh cache key each repeat (target <= 1.5 x plain)
  CPU       the same two, timed as this process's CPU time (time.process_time: both threads, not
            the time other work on a shared machine takes from it), beside the wall-clock times
  max |Δ|   largest difference between the captured maps and eager's (fp16 storage)
shapes-vlm only:
  gaze      the pointing game on held-out scenes: how often the GIFT saliency peak falls in the asked
            object's box, against a uniformly random patch
  batch     exact-answer accuracy before | after VAR and GIFT on held-out scenes (absent objects apart)
Prints Markdown tables.  Usage:
    .venv/bin/python bench/vlm.py [--repeats 5] [--tiny] [--model FOLDER] [--no-shapes]
                                  [--gaze-scenes 100] [--batch-scenes 100] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, table

QUESTION = "what colour is the circle?"
PICTURE = "scene-3"  # 112 x 112 px; the tiny models cut it into their tiles / dynamic grids as any picture
TARGET = 1.5
GROUP = 3  # models taken in turn at a time


class Bench:
    """One model's plain and HeadScope runs."""

    def __init__(self, model: str, folder: str, store):
        from transformers import AutoModelForImageTextToText

        from capture import registry

        self.model, self.store = model, store
        self.handle = registry.load(model)
        load = AutoModelForImageTextToText.from_pretrained
        self.plain = load(folder, dtype=torch.float32, attn_implementation="sdpa")
        self.eager = load(folder, dtype=torch.float32, attn_implementation="eager")
        self.times: dict[str, list[float]] = {"plain": [], "capture": [], "plain_cpu": [], "capture_cpu": []}
        self.worst = 0.0
        self.said = ""

    def round(self, repeat: int) -> None:
        from capture import images
        from capture.api import run
        from capture.vlm.model import MAX_NEW_TOKENS, greedy_settings
        from core.types import RunSpec

        processor = self.handle.tokenizer
        t0, c0 = time.perf_counter(), time.process_time()
        inputs = processor.encode(images.load_image(PICTURE), QUESTION)
        n = inputs.input_ids.shape[1]
        with torch.inference_mode():
            ids = self.plain.generate(**inputs.model_inputs(), **greedy_settings(processor.tokenizer, MAX_NEW_TOKENS))
            out = self.eager(**inputs.answered(ids[0].tolist()), output_attentions=True)
        self.times["plain"].append(time.perf_counter() - t0)
        self.times["plain_cpu"].append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        capture = run(RunSpec(model=self.model, prompt=QUESTION, image=PICTURE, seed=repeat,
                              max_new_tokens=MAX_NEW_TOKENS), self.store)
        self.times["capture"].append(time.perf_counter() - t0)
        self.times["capture_cpu"].append(time.process_time() - c0)
        assert capture.output.token_ids == ids[0].tolist(), self.model
        self.said = processor.tokenizer.decode(ids[0, n:], skip_special_tokens=True).strip()
        for layer, ref in enumerate(out.attentions):
            ours = capture.attention(layer).astype(np.float32)
            self.worst = max(self.worst, float(np.abs(ours - ref[0].numpy()).max()))

    def row(self) -> list:
        plain, captured, plain_cpu, captured_cpu = (statistics.median(self.times[k]) for k in
                                                    ("plain", "capture", "plain_cpu", "capture_cpu"))
        ratio, ratio_cpu = captured / plain, captured_cpu / plain_cpu
        name = self.handle.meta.family if self.model != "shapes-vlm" else "shapes-vlm (llava)"
        return [name, f"{plain * 1000:.0f}", f"{captured * 1000:.0f}", f"{ratio:.2f}", f"{plain_cpu * 1000:.0f}",
                f"{captured_cpu * 1000:.0f}", f"{ratio_cpu:.2f}", f"{self.worst:.1e}",
                "yes" if ratio <= TARGET else "no"]


def speed(models: list[tuple[str, str]], repeats: int) -> None:
    from cache.store import Store

    workdir = tempfile.mkdtemp(prefix="hs-bench-vlm-")
    store = Store(os.path.join(workdir, "cache"), size_limit=8 * 2**30)
    try:
        rows = []
        for start in range(0, len(models), GROUP):  # the registry keeps 4 loaded models: a group stays loaded
            benches = [Bench(model, folder, store) for model, folder in models[start:start + GROUP]]
            for bench in benches:  # warm-up: first loads, the fused kernel, the writer thread
                bench.round(-1)
                bench.times = {k: [] for k in bench.times}
            for repeat in range(repeats):
                for bench in benches:
                    bench.round(repeat)
            rows += [b.row() for b in benches]
        print(f"answer + capture against plain generate + eager output_attentions ({PICTURE}, {QUESTION!r}, "
              f"median of {repeats}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores)\n")
        print(table(["model", "plain ms", "capture ms", "x plain", "plain CPU ms", "capture CPU ms", "x plain (CPU)",
                     "max |Δ| vs eager", f"<= {TARGET}x (wall)"],
                    rows))
    finally:
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="also the tiny random families of tests/models/tiny_vlms.py")
    parser.add_argument("--model", action="append", default=[], help="a VLM folder (repeatable)")
    parser.add_argument("--no-shapes", action="store_true", help="skip shapes-vlm")
    parser.add_argument("--gaze-scenes", type=int, default=100)
    parser.add_argument("--batch-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HEADSCOPE_CACHE_DIR", str(ROOT / "cache_data"))
    from capture.vlm import model as vlm_model
    from probes import vlm_accuracy as vlm_batch

    models = [] if args.no_shapes else [("shapes-vlm", str(vlm_model.assembled_folder()))]
    models += [(folder, folder) for folder in args.model]
    workdir = None
    if args.tiny:
        import sys

        sys.path.insert(0, str(ROOT / "tests" / "models"))
        import tiny_vlms

        workdir = Path(tempfile.mkdtemp(prefix="hs-bench-tiny-vlms-"))
        models += [(str(tiny_vlms.save(f, workdir / f)),) * 2 for f in tiny_vlms.FAMILIES]
    try:
        speed(models, args.repeats)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.no_shapes:
        return
    if args.gaze_scenes:
        t0 = time.perf_counter()
        found = vlm_batch.gaze_pointing("shapes-vlm", n_scenes=args.gaze_scenes)
        print()
        print(table(["pointing game", "questions", "saliency peak in box", "random patch", "seconds"],
                    [["GIFT saliency (layers 2..L-1, mean of heads)", len(found.hits), f"{found.hit_rate:.1%}",
                      f"{found.chance_rate:.1%}", f"{time.perf_counter() - t0:.0f}"]]))
    for method in ("var", "gift") if args.batch_scenes else ():  # one table per method, printed as it finishes
        t0 = time.perf_counter()
        result = vlm_batch.accuracy_change("shapes-vlm", method, n_scenes=args.batch_scenes)
        seconds = f"{time.perf_counter() - t0:.0f} s"
        rows = []
        for kind in [None, *result.kinds()]:
            before, after, n = result.accuracy(kind)
            rows.append([method, kind or "all", n, f"{before:.1%}", f"{after:.1%}", f"{after - before:+.1%}",
                         seconds if kind is None else ""])
        print()
        print(table(["method", "questions", "n", "before", "after", "change", "time"], rows), flush=True)


if __name__ == "__main__":
    main()
