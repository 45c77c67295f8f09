"""DiT capture on a GPU (issue 22's GPU targets): random-weight transformers of SD3-medium's shape at 1,024², 28
steps, and of Flux-dev's at 1,024², 4 steps; HeadScope's default capture against the plain pipeline.

Built in memory, in bfloat16 on the GPU (no download, nothing saved: Flux-dev's 12 B parameters would be 24 GB
on disk): the real transformer (SD3-medium: 24 joint blocks x 24 heads x 64; Flux-dev: 19 double- and 38
single-stream blocks x 24 heads x 128), the tiny random text encoders of tests/models/tiny_pipelines.py (their
width is not the transformer's cost) and a 4-channel VAE of the real 8x scale, so the picture is 1,024² and the
transformer sees 4,096 image tokens.
  plain    the pipeline with diffusers' own processors
  capture  HeadScope's default capture (the split layout at this size: every step's word maps, text -> image
           and pooled maps, the middle step's queries and keys), into a temporary cache   target <= 1.5 x plain
  peak     the GPU allocator's peak above the loaded pipeline during a run          target <= plain's + 2 GB
Medians of --repeats runs after a warm-up, runs taken in turn.  Prints the GPU's name and a Markdown table.

    .venv/bin/python bench/dit_gpu.py [--repeats 2] [--only sd3|flux]
    .venv/bin/python bench/dit_gpu.py --small       # 2 layers at 64 x 64 px, 2 steps: the same code on a CPU
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, table

sys.path.insert(0, str(ROOT / "tests" / "models"))
TARGET_RATIO, TARGET_GB = 1.5, 2.0


def vae8():
    """A 4-channel AutoencoderKL of the real 8x scale, 16 latent channels (SD3's and Flux's)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,) * 4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def sd3(layers: int, side: int):
    """SD3-medium's transformer (its width; `layers` joint blocks) at `side` px by default."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    import tiny_pipelines as tiny

    clip, t5 = tiny.clip_tokenizer(), tiny.t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=side // 8, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=layers, attention_head_dim=64, num_attention_heads=24,
                                        caption_projection_dim=1536, joint_attention_dim=32, pooled_projection_dim=32,
                                        pos_embed_max_size=max(side // 16, 192))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae8(),
                                    text_encoder=tiny.clip_encoder(len(clip)), tokenizer=clip,
                                    text_encoder_2=tiny.clip_encoder(len(clip)), tokenizer_2=tiny.clip_tokenizer(),
                                    text_encoder_3=tiny.t5_encoder(len(t5)), tokenizer_3=t5)


def flux(layers: int, side: int):
    """Flux-dev's transformer (its width; `layers` double- and 2 x `layers` single-stream blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    import tiny_pipelines as tiny

    clip, t5 = tiny.clip_tokenizer(), tiny.t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=[16, 56, 56], guidance_embeds=True)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae8(),
                        text_encoder=tiny.clip_encoder(len(clip), projection=False), tokenizer=clip,
                        text_encoder_2=tiny.t5_encoder(len(t5)), tokenizer_2=t5)
    pipe.default_sample_size = side // 8
    return pipe


def measure(run, device: torch.device) -> tuple[float, float]:
    """(seconds, peak bytes above what was allocated before) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    run()
    if device.type != "cuda":
        return time.perf_counter() - t0, float("nan")
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - before


def bench(name: str, build, family: str, steps: int, side: int, args, device: torch.device) -> list[str]:
    from cache.store import Store
    from capture.dit.adapter import DitAdapter
    from capture.dit.load import handle_of
    from core.types import RunSpec

    torch.manual_seed(0)
    with torch.device(device):
        pipe = build()
    pipe.to(device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle at the top left"
    call = importlib.import_module(f"capture.dit.families.{family}").FAMILY
    from capture.dit.pipeline import PipelineDit

    fixed = PipelineDit(pipe, call).call_kwargs()  # the family's arguments, as HeadScope calls the pipeline

    def plain():
        pipe(prompt=prompt, height=side, width=side, num_inference_steps=steps, output_type="np",
             generator=torch.Generator().manual_seed(0), **fixed)

    plain()  # warm-up, then the plain runs before HeadScope's processors go in
    plains = [measure(plain, device) for _ in range(args.repeats)]
    handle = handle_of(name, pipe, call)
    work = Path(tempfile.mkdtemp(prefix="hs-dit-gpu-"))
    store = Store(work, size_limit=2**40)
    seeds, made = iter(range(10**6)), []

    def capture():
        spec = RunSpec(model=name, prompt=prompt, seed=next(seeds), steps=steps, height=side, width=side)
        DitAdapter(handle).capture(spec, spec.key(), store, lambda f, m: None)
        made.append(spec.key())

    def timed_capture() -> tuple[float, float]:
        found = measure(capture, device)
        store.evict(made.pop())  # SD3-medium's 28 steps at 1,024² keep ~10 GB: one capture on the disk at a time
        return found

    timed_capture()
    captures = [timed_capture() for _ in range(args.repeats)]
    store.close()
    shutil.rmtree(work, ignore_errors=True)  # its index (the captures were evicted one by one)
    t_plain, t_cap = (statistics.median(t for t, _ in runs) for runs in (plains, captures))
    m_plain, m_cap = (max(m for _, m in runs) / 2**30 for runs in (plains, captures))
    ratio, extra = t_cap / t_plain, m_cap - m_plain
    met = ("yes" if ratio <= TARGET_RATIO else "NO") + (
        "" if device.type != "cuda" else " / " + ("yes" if extra <= TARGET_GB else "NO"))
    del pipe, handle
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [name, f"{side}² x {steps} steps", f"{t_plain:.2f} s", f"{t_cap:.2f} s", f"{ratio:.2f}",
            f"{m_plain:.2f} GB", f"{m_cap:.2f} GB", f"{extra:+.2f} GB", met]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("sd3", "flux"))
    parser.add_argument("--small", action="store_true", help="2 layers at 64 x 64 px, 2 steps (a CPU check)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers, side = (1, 64) if args.small else (None, 1024)
    runs = {"sd3": ("SD3-medium shape", lambda: sd3(layers or 24, side), "sd3", 2 if args.small else 28),
            "flux": ("Flux-dev shape", lambda: flux(layers or 19, side), "flux", 2 if args.small else 4)}
    rows = [bench(name, build, family, steps, side, args, device)
            for key, (name, build, family, steps) in runs.items() if args.only in (None, key)]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no GPU: --small checks the code)"
    print(f"{where}, {args.dtype}, median of {args.repeats} runs after a warm-up\n")
    print(table(["transformer", "picture", "plain", "capture", "x plain", "plain peak", "capture peak",
                 "extra memory", f"met (<= {TARGET_RATIO} x / <= +{TARGET_GB:g} GB)"], rows))


if __name__ == "__main__":
    main()
