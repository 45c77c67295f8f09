"""DiT benchmark: sampling speed, the cost of capturing every head at every step, bytes per step.

On the embedded shapes-dit (32 x 32, 20 steps, classifier-free guidance: 2 rows per step):
  sample    pipe.sample, nothing recorded (diffusers' own attention path)           target <= 3 s
  record    the same sampling with every layer's maps of every head recorded in memory
  capture   a full capture: sampling + recording + writing every map to the cache    target <= 1.5 x sample
  read      warm-cache read of one layer's maps at one step (a memory-mapped slice)
plus bytes on disk per captured step.  Times are medians of --repeats runs; wall and CPU seconds
(the CPU ratio is what the capture costs when the machine is shared).  Prints a Markdown table.

    .venv/bin/python bench/dit.py [--repeats 5] [--steps 20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import table

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def measure(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from cache.store import Store
    from capture import registry
    from capture.dit import attend as dit_attend
    from capture.dit import attention as dit_attention
    from capture.dit.adapter import DitAdapter
    from core import dit_capture
    from core.types import RunSpec

    prompt = "a red circle at the top left and a blue square at the bottom right"
    handle = registry.load("shapes-dit")
    pipe = handle.tokenizer
    steps = args.steps
    pipe.sample([prompt], [0], steps=steps)  # warm-up (text encoding cached, kernels ready)

    sample_wall, sample_cpu = measure(lambda: pipe.sample([prompt], [0], steps=steps), args.repeats)

    def record():
        recorder = dit_attention.DitRecorder(lambda *a: None)

        def on_step(info):
            recorder.step = info.index

        with dit_attend.recording(recorder):
            pipe.sample([prompt], [0], steps=steps, on_step=on_step)

    record_wall, record_cpu = measure(record, args.repeats)

    workdir = Path(tempfile.mkdtemp(prefix="hs-dit-bench-"))
    store = Store(workdir / "cache", size_limit=2**30)
    adapter = DitAdapter(handle)
    counter = iter(range(10**6))
    made = []

    def capture():
        spec = RunSpec(model="shapes-dit", prompt=prompt, seed=next(counter), steps=steps)
        key = spec.key(registry.revision("shapes-dit"))
        cap = adapter.capture(spec, key, store, lambda f, m: None)
        store.put_meta(key, cap.record())
        made.append(cap)

    capture_wall, capture_cpu = measure(capture, args.repeats)
    cap = made[-1]
    t_bytes = sum(np.asarray(store.get_array(cap.key, dit_capture.steps_name(l))).nbytes for l in range(cap.meta.n_layers))
    total_bytes = folder_bytes(workdir / "cache") / len(made)
    per_step = t_bytes / steps

    def read():
        fresh = Store(workdir / "cache", size_limit=2**30)
        from capture.api import load_capture

        c = load_capture(cap.key, fresh)
        dit_capture.step_attention(c, steps // 2, 2)
        fresh.close()

    read_wall, _ = measure(read, args.repeats)
    store.close()
    shutil.rmtree(workdir, ignore_errors=True)

    n_tokens = len(cap.tokens)
    rows = [
        ["sample (no capture)", f"{sample_wall:.2f} s", f"{sample_cpu:.2f} s", "1.00", "<= 3 s",
         "yes" if sample_wall <= 3 else "NO"],
        ["record every head, every step (memory)", f"{record_wall:.2f} s", f"{record_cpu:.2f} s",
         f"{record_wall / sample_wall:.2f}", "", ""],
        ["capture (record + write to cache)", f"{capture_wall:.2f} s", f"{capture_cpu:.2f} s",
         f"{capture_wall / sample_wall:.2f}", "<= 1.5 x sample",
         "yes" if capture_wall <= 1.5 * sample_wall else "NO"],
        ["read one layer at one step (fresh process view)", f"{read_wall * 1000:.1f} ms", "", "", "", ""],
        ["bytes per captured step (maps, fp16)", f"{per_step / 1024:.1f} KiB", "", "", "", ""],
        ["bytes on disk per capture (all files)", f"{total_bytes / 2**20:.2f} MiB", "", "", "", ""],
    ]
    print(f"shapes-dit, {steps} steps, {n_tokens} tokens per map ({cap.meta.n_layers} layers x {cap.meta.n_heads} "
          f"heads), CFG (2 rows per step), {args.threads} threads, median of {args.repeats}\n")
    print(table(["measure", "wall", "CPU", "x sample (wall)", "target", "met"], rows))


if __name__ == "__main__":
    main()
