"""VLM capture against transformers' eager path, and the Gaze page's measurements (shapes-vlm, CPU).

  answer    `vlm_model.answer`: plain greedy generation of the answer (the speed floor)
  eager     the same answer, then transformers' eager forward with output_attentions=True over
            prompt + answer (what BertViz-style tools do); persists nothing
  capture   HeadScope `run()`: the answer on the fast path, one recorded pass of all 30 x 9 LM maps and
            the residual stream written to the cache; a fresh cache key each repeat
  max |Δ|   largest difference between the captured maps and eager's (fp16 storage)
  gaze      the pointing game on held-out scenes: how often the GIFT saliency peak falls in the asked
            object's box, against a uniformly random patch
  batch     exact-answer accuracy before | after VAR and GIFT on held-out scenes (absent objects apart)
Prints Markdown tables.  Usage:
    .venv/bin/python bench/vlm.py [--repeats 3] [--gaze-scenes 100] [--batch-scenes 100] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from common import table

QUESTION = "what colour is the circle?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-vlm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gaze-scenes", type=int, default=100)
    parser.add_argument("--batch-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HEADSCOPE_CACHE_DIR", os.path.join(os.getcwd(), "cache_data"))
    from transformers import LlavaForConditionalGeneration

    from cache.store import Store
    from capture import images, registry
    from capture.api import run
    from capture.vlm import model as vlm_model
    from core.types import RunSpec
    from probes import vlm_accuracy as vlm_batch

    handle = registry.load(args.model)
    folder = vlm_model.assembled_folder() if args.model == "shapes-vlm" else args.model
    eager = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    picture = images.scene_picture(3)
    workdir = tempfile.mkdtemp(prefix="hs-bench-vlm-")
    store = Store(os.path.join(workdir, "cache"), size_limit=8 * 2**30)
    times: dict[str, list[float]] = {"answer": [], "eager": [], "capture": []}
    worst = 0.0
    try:
        for repeat in range(args.repeats):
            t0 = time.perf_counter()
            said = vlm_model.answer(handle, picture, QUESTION)
            times["answer"].append(time.perf_counter() - t0)
            inputs = handle.tokenizer.encode(picture, QUESTION)
            t0 = time.perf_counter()
            with torch.inference_mode():
                ids = eager.generate(**inputs.model_inputs(), max_new_tokens=vlm_model.MAX_NEW_TOKENS, do_sample=False,
                                     eos_token_id=[handle.tokenizer.tokenizer.eos_token_id], pad_token_id=0)
                out = eager(input_ids=ids, pixel_values=inputs.pixel_values, output_attentions=True)
            times["eager"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            capture = run(RunSpec(model=args.model, prompt=QUESTION, image="scene-3", seed=repeat,
                                  max_new_tokens=vlm_model.MAX_NEW_TOKENS), store)
            times["capture"].append(time.perf_counter() - t0)
            assert capture.output.text == said and capture.output.token_ids == ids[0].tolist()
            for layer, ref in enumerate(out.attentions):
                worst = max(worst, float(np.abs(capture.attention(layer).astype(np.float32) - ref[0].numpy()).max()))
        floor = min(times["answer"])
        print(table(["variant", "best s", "× answer"],
                    [[k, f"{min(v):.2f}", f"{min(v) / floor:.2f}"] for k, v in times.items()]))
        print(f"\nanswer {said!r}; captured maps vs eager output_attentions: max |Δ| = {worst:.1e}\n")
    finally:
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)

    if args.gaze_scenes:
        t0 = time.perf_counter()
        found = vlm_batch.gaze_pointing(args.model, n_scenes=args.gaze_scenes)
        print(table(["pointing game", "questions", "saliency peak in box", "random patch", "seconds"],
                    [["GIFT saliency (layers 2..L-1, mean of heads)", len(found.hits), f"{found.hit_rate:.1%}",
                      f"{found.chance_rate:.1%}", f"{time.perf_counter() - t0:.0f}"]]))
    for method in ("var", "gift") if args.batch_scenes else ():  # one table per method, printed as it finishes
        t0 = time.perf_counter()
        result = vlm_batch.accuracy_change(args.model, method, n_scenes=args.batch_scenes)
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
