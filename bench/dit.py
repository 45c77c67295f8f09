"""DiT benchmark: sampling speed, the cost of capturing every head at every step, bytes per step.

On the embedded shapes-dit (32 x 32, 20 steps, classifier-free guidance: 2 rows per step):
  sample    pipe.sample, nothing recorded (diffusers' own attention path)           target <= 3 s
  record    the same sampling with every layer's maps of every head recorded in memory
  capture   a full capture: sampling + recording + writing every map to the cache    target <= 1.5 x sample
  read      warm-cache read of one layer's maps at one step (a memory-mapped slice)
plus bytes on disk per captured step.

On diffusers pipeline folders (`--pipeline FOLDER`, repeatable; `--tiny` builds the tiny random SD3,
Flux, Chroma, PixArt-Σ, Sana, Qwen-Image, FLUX.2 [klein] and [dev], CogView 4, AuraFlow, HunyuanDiT, Lumina 2 and
Z-Image pipelines of tests/models/tiny_pipelines.py in a temporary folder; `--wide` SD3 and PixArt-Σ with two
transformer layers of the real models' width, so the recording's share is a real layer's, at a picture size of the
tiny VAE):
  plain     the pipeline as diffusers loads it, its own attention processors
  headscope the same call through HeadScope's processors, nothing recorded
  capture   a capture with every step's maps (its default layout: full maps when they fit)   target <= 1.5 x plain
  split     a capture in the layout of real sizes: every step's image -> text and text -> image maps,
            pooled image maps, coarse maps, the middle step's queries and keys             target <= 1.5 x plain
Times are medians of --repeats runs (the runs of one table taken in turn, so a slow spell of a shared
machine hits each alike); wall and CPU seconds (the CPU ratio is what the capture costs when the
machine is shared).  Prints Markdown tables.

`--fold` times the fold of a split capture's row block onto its coarse tokens (capture.dit.fold) against
index_add_, on a tiny Flux's block and on SD3-medium's at 1,024².

    .venv/bin/python bench/dit.py [--repeats 5] [--steps 20] [--tiny] [--wide] [--fold] [--pipeline FOLDER] [--size 32]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, table



def measure(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def in_turn(runs: list, repeats: int) -> list[tuple[float, float]]:
    """(median wall, median CPU) of each run, the runs taken in turn (round robin), so a slow spell of a
    shared machine hits each alike."""
    times: list[list[tuple[float, float]]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            times[i].append(measure(run, 1))
    return [(statistics.median(w for w, _c in t), statistics.median(c for _w, c in t)) for t in times]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def shapes_dit(args) -> None:
    import numpy as np

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

    def sample():
        pipe.sample([prompt], [0], steps=steps)

    def record():
        recorder = dit_attention.DitRecorder(lambda *a: None)

        def on_step(info):
            recorder.step = info.index

        with dit_attend.recording(recorder):
            pipe.sample([prompt], [0], steps=steps, on_step=on_step)

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

    (sample_wall, sample_cpu), (record_wall, record_cpu), (capture_wall, capture_cpu) = in_turn(
        [sample, record, capture], args.repeats)
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


def pipeline(folder: Path, args, side: int | None = None) -> list[list[str]]:
    """One table row per measure of one pipeline folder."""
    import torch

    from cache.store import Store
    from capture import registry
    from capture.dit.adapter import DitAdapter
    from capture.dit.load import from_folder
    from capture.dit.record import RecordPlan
    from core.types import RunSpec

    prompt = "a red circle at the top left"
    size, steps = side or args.size, args.pipeline_steps
    handle = registry.load(str(folder))
    runner = handle.tokenizer
    plain = from_folder(folder, runner.family, torch.float32)  # diffusers' own processors
    plain.set_progress_bar_config(disable=True)
    call = runner.call_kwargs()

    def plain_call():
        plain(prompt=prompt, height=size, width=size, num_inference_steps=steps, output_type="np",
              generator=torch.Generator().manual_seed(0), **call)

    def headscope_call():
        runner.run(prompt, 0, steps, size, size)

    workdir = Path(tempfile.mkdtemp(prefix="hs-dit-bench-"))
    counter = iter(range(10**6))
    made, disk = {}, {}

    stores = {}

    def capture_with(plan: RecordPlan | None, label: str):
        store = stores[label] = Store(workdir / label, size_limit=2**31)

        def go():
            spec = RunSpec(model=str(folder), prompt=prompt, seed=next(counter), steps=steps, height=size, width=size)
            key = spec.key(registry.revision(spec.model))
            cap = DitAdapter(handle, plan=plan).capture(spec, key, store, lambda f, m: None)
            store.put_meta(key, cap.record())
            made[label] = cap
        return go

    runs = {"plain": plain_call, "headscope": headscope_call, "capture": capture_with(None, "capture"),
            "split": capture_with(RecordPlan(mode="split"), "split")}
    for run in runs.values():  # warm-up
        run()
    results = dict(zip(runs, in_turn(list(runs.values()), args.repeats)))
    for label, store in stores.items():
        store.close()
        disk[label] = folder_bytes(workdir / label) / (args.repeats + 1)
    shutil.rmtree(workdir, ignore_errors=True)
    base = results["plain"][0]
    meta = handle.meta
    name = f"{meta.family} ({meta.n_layers} layers x {meta.n_heads} heads, {made['capture'].n_tokens} tokens)"
    rows = []
    for label, (wall, cpu) in results.items():
        target = "<= 1.5 x plain" if label in ("capture", "split") else ""
        met = ("yes" if wall <= 1.5 * base else "NO") if target else ""
        stored = f"{disk[label] / 2**20:.2f} MiB" if label in disk else ""  # all files of one capture
        rows.append([name if label == "plain" else "", label, f"{wall * 1000:.0f} ms", f"{cpu * 1000:.0f} ms",
                     f"{wall / base:.2f}", stored, target, met])
    return rows


def fold_kernels(args) -> None:
    """capture.dit.fold.CoarseFold against index_add_ over the last axis, on one recorded row block of a tiny
    Flux (8 x 8 patches, 512 T5 tokens: 2 heads x 576 rows x 576 keys) and of SD3-medium at 1,024²
    (64 x 64 patches pooled 4 x 4, 333 text tokens: 24 heads x 256 rows x 4,429 keys)."""
    import numpy as np
    import torch

    from capture.dit.fold import CoarseFold, pieces_of
    from capture.dit.tokens import TokenLayout
    from core.dit_capture import pool_for, region_of

    rows = []
    for name, heads, block, grid, text, pads in [
            ("tiny Flux", 2, 576, (8, 8), 512, [range(9, 512)]),
            ("SD3-medium 1,024²", 24, 256, (64, 64), 333, [range(10, 77), range(89, 333)])]:
        layout = TokenLayout(grid=grid, text=[f"t{i}" for i in range(text)], padding=pads)
        pool = pool_for(grid)
        columns = [p for _label, p in layout.columns(grouped=True)]
        n_regions = -(-grid[0] // pool) * -(-grid[1] // pool)
        coarse = np.zeros(layout.n, np.int64)
        coarse[layout.image.start:layout.image.stop] = region_of(grid, pool)
        for c, positions in enumerate(columns):
            coarse[positions] = n_regions + c
        m, index = n_regions + len(columns), torch.as_tensor(coarse)
        fold = CoarseFold(index, m, pieces_of(layout.image, pool, 0, n_regions, columns))
        weights = torch.rand(heads, block, layout.n)  # [head, rows, key]

        def by_index():
            torch.zeros(heads, block, m).index_add_(2, index, weights)

        (plain, _), (sliced, _) = in_turn([by_index, lambda: fold.fold(weights, 0)], args.repeats * 4)
        rows.append([name, f"{heads} x {block} x {layout.n}", f"{plain * 1000:.2f} ms", f"{sliced * 1000:.2f} ms",
                     f"{plain / sliced:.1f}"])
    print(f"\nfolding one row block onto the coarse tokens, {args.threads} threads, median of {args.repeats * 4}\n")
    print(table(["map", "block", "index_add_", "CoarseFold", "x faster"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="shapes-dit sampling steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="also the tiny random pipelines of tests/models/tiny_pipelines.py")
    parser.add_argument("--pipeline", action="append", default=[], help="a diffusers pipeline folder (repeatable)")
    parser.add_argument("--size", type=int, default=32, help="pipelines: picture side in pixels")
    parser.add_argument("--pipeline-steps", type=int, default=2, help="pipelines: sampling steps")
    parser.add_argument("--no-shapes", action="store_true", help="skip shapes-dit")
    parser.add_argument("--fold", action="store_true",
                        help="also the coarse fold of a split capture against index_add_")
    parser.add_argument("--wide", action="store_true", help="also SD3 and PixArt with two layers of the real models' "
                        "width (SD3-medium: 24 heads x 64; PixArt-Sigma: 16 x 72), tiny text encoders and VAE")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not args.no_shapes:
        shapes_dit(args)
    if args.fold:
        fold_kernels(args)
    folders = [Path(p) for p in args.pipeline]
    sides: dict[Path, int] = {}  # a tiny folder's picture side where it is not --size
    workdir = None
    if args.tiny or args.wide:
        import sys

        sys.path.insert(0, str(ROOT / "tests" / "models"))
        import tiny_pipelines

        workdir = Path(tempfile.mkdtemp(prefix="hs-dit-pipelines-"))
        if args.tiny:  # each at its tests' size (HunyuanDiT's pipeline wants 8 px a latent: 128 px)
            folders += [tiny_pipelines.save(family, workdir / family) for family in tiny_pipelines.FAMILIES]
            sides.update({workdir / family: tiny_pipelines.size(family) for family in tiny_pipelines.FAMILIES})
        if args.wide:
            folders += [tiny_pipelines.save(family, workdir / f"{family}-wide", wide=True)
                        for family in tiny_pipelines.WIDE]
    if folders:
        rows = [row for folder in folders for row in pipeline(folder, args, sides.get(folder))]
        print(f"\npipelines, {args.size} x {args.size} px (tiny HunyuanDiT: 128), {args.pipeline_steps} steps, "
              f"{args.threads} threads, median of {args.repeats}\n")
        print(table(["pipeline", "run", "wall", "CPU", "x plain (wall)", "stored", "target", "met"], rows))
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
