"""Diffusion transformers: text -> image sampling with the attention maps of every step recorded.

One adapter for the embedded shapes-dit (capture.dit.model.ShapesDit) and for diffusers pipeline
folders (capture.dit.pipeline.PipelineDit: SD3 / SD3.5, Flux, Chroma, PixArt, Sana); both sit in the
ModelHandle's `tokenizer` slot and share `run`, `grid_of`, `check_size`, `text_length`,
`default_steps`, `default_side` and `cross_heads`.

A capture samples the prompt once (`spec.seed`, `spec.steps` or the model's default, `spec.height` x
`spec.width` or its default size) with the model's classifier-free guidance, and records the maps of
the conditional branch at every sampling step, every layer, every head, as capture.dit.record plans
(core.dit_capture describes the two layouts; `spec.keep` names the steps whose full maps a capture of real
size keeps, by default the middle one).  The sampled image is the image of that very run:
recording computes the maps on the side and never changes the output.  Before it runs, the capture's
disk and memory are estimated (capture.dit.write) and a run that would not fit is refused with one
sentence, as is a prompt, seed, step count or picture size out of range: nothing is cached then.

The spec's intervention acts as capture.dit.presets says: a SoftPAG / PAG preset adds a perturbed
branch and guides away from it; any other intervention edits every branch directly.
"""
from __future__ import annotations

import dataclasses
import time

from capture.dit import presets as dit_presets
from capture.dit.record import MapRecorder, RecordPlan
from capture.dit.write import ArrayWriter, check, estimate
from capture.engine.handle import ModelHandle
from core.errors import InputError
from core.keys import stable_hash
from core.progress import Progress
from core.types import MAX_GUIDANCE, MAX_KEPT, MAX_STEPS, Capture, Output, RunSpec

MAX_PROMPT_CHARS = 500


def check_guidance(scale: float | None) -> None:
    """InputError (one sentence) unless a classifier-free guidance scale is unset (the model's) or 0 to
    MAX_GUIDANCE: a capture's, HeadHunter-lite's, DiT patching's."""
    if scale is not None and not 0 <= scale <= MAX_GUIDANCE:
        raise InputError(f"The guidance scale must be from 0 to {MAX_GUIDANCE:g}.")


class DitAdapter:
    """Captures of a diffusion transformer (module docstring).  `record_steps` limits the recorded steps
    of a "full" capture; `plan` says what a capture keeps (capture.dit.record.RecordPlan)."""

    def __init__(self, handle: ModelHandle, record_steps: set[int] | None = None, plan: RecordPlan | None = None):
        self.handle = handle
        self.sampler = handle.tokenizer
        steps = tuple(sorted(record_steps)) if record_steps is not None else None
        self.plan = plan or RecordPlan(steps=steps)

    def size(self, spec: RunSpec) -> tuple[int, int]:
        """(height, width) in pixels: the spec's, else the model's default; InputError when out of range."""
        side = self.sampler.default_side
        height, width = spec.height or side, spec.width or side
        if height < 0 or width < 0:
            raise InputError("A picture size is a whole number of pixels.")
        self.sampler.check_size(self.handle.meta.name, height, width)
        return height, width

    def check(self, spec: RunSpec) -> tuple[str, int, tuple[int, int], list[str]]:
        """(prompt, steps, (height, width), notes) of a spec, or InputError with one sentence."""
        name = self.handle.meta.name
        prompt = spec.prompt.strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"The prompt is {len(prompt)} characters; {name} reads at most {MAX_PROMPT_CHARS}.")
        steps = spec.steps or self.sampler.default_steps
        if not 1 <= steps <= MAX_STEPS:
            raise InputError(f"Steps must be between 1 and {MAX_STEPS}.")
        if not 0 <= spec.seed < 2**31:
            raise InputError("The seed must be a whole number from 0 to 2147483647.")
        check_guidance(spec.guidance)
        size = self.size(spec)
        if not all(0 <= s < steps for s in spec.keep) or len(set(spec.keep)) > MAX_KEPT:
            raise InputError(f"The steps whose full maps are kept are at most {MAX_KEPT} of the sampling steps "
                             f"0 to {steps - 1}.")
        notes = []
        if spec.image is not None:
            notes.append(f"{name} generates images from text: the input image was ignored.")
        if spec.max_new_tokens:
            notes.append(f"{name} generates an image, not text: max new tokens was ignored.")
        if spec.guidance is not None:
            notes.append(f"Guidance scale {spec.guidance:g} (the model's default: {self.sampler.guidance:g}).")
        return prompt, steps, size, notes

    def capture(self, spec: RunSpec, key: str, store, progress: Progress) -> Capture:
        meta = self.handle.meta
        t0 = time.perf_counter()
        prompt, steps, (height, width), notes = self.check(spec)
        grid = self.sampler.grid_of(height, width)
        n_image = grid[0] * grid[1]
        n_text, n_columns = self.sampler.text_length(prompt)
        cross_heads = self.sampler.cross_heads
        # a cross-attention family's self-attention sees the image tokens only: its maps are stored as that block
        plan = dataclasses.replace(self.plan, kept=tuple(sorted(set(spec.keep)))) if spec.keep else self.plan
        plan = plan.resolve(meta.n_layers, meta.n_heads, n_image if cross_heads else n_image + n_text, steps)
        recorded = len(plan.recorded(steps))
        read = n_columns if getattr(self.sampler, "masks_padding", True) else n_text  # word maps' columns read
        word_layers = getattr(self.sampler, "word_layers", None)  # None: every layer (shapes-dit)
        parts = getattr(self.sampler, "parts", None)  # each layer's map: the whole axis, or the image's or text's part
        sides = None if parts is None else [{"all": n_image + n_text, "image": n_image, "caption": n_text}[part]
                                             for part in parts]
        need = estimate(plan.mode, meta.n_layers, meta.n_heads, meta.head_dim, n_image, n_text, n_columns, recorded,
                        bool(cross_heads), cross_heads, len(plan.kept), len(plan.full_layers), read,
                        image_bytes=height * width * 3,
                        word_layers=meta.n_layers if word_layers is None else len(word_layers), sides=sides,
                        joint_mask=getattr(self.sampler, "joint_mask", False))
        check(need, meta.name, (height, width), steps, _disk_budget(store))
        with ArrayWriter(store, key) as writer:
            recorder = MapRecorder(plan, steps, meta.n_layers, meta.n_heads, bool(cross_heads), cross_heads, writer,
                                   word_layers)

            def on_step(step: int) -> None:
                progress(0.9 * step / steps, f"denoising step {step + 1}/{steps}")

            image, _layout, timesteps, run_notes = self.sampler.run(prompt, spec.seed, steps, height, width,
                                                                    spec.intervention, recorder, on_step,
                                                                    guidance=spec.guidance)
            t_sample = time.perf_counter()
            progress(0.9, "writing the maps")
            recorder.finish()
            writer.finish(image)
            recorder.release()
        notes += run_notes
        if dit_presets.is_guidance(spec.intervention):
            notes.append(f"SoftPAG: {len(spec.intervention.heads())} head(s) perturbed in a guidance branch, "
                         f"scale {dit_presets.pag_scale(spec.intervention):g}; the maps shown are the conditional "
                         "branch's.")
        if plan.mode == "split":
            kept = ", ".join(str(s) for s in plan.kept)
            notes.append(f"{width} x {height} px: the word maps and text -> image maps of every step are kept, the "
                         f"full maps at step {kept} (recomputed from its queries and keys); the views show image "
                         "regions.")
        tokens, spans, layout_info = recorder.tokens_and_info()
        wanted = recorder.wanted
        output = Output(notes=notes, recorded_steps=wanted, timesteps=[timesteps[s] for s in wanted])
        return Capture(key=key, spec=spec, meta=dataclasses.replace(meta, grid=grid), tokens=tokens, spans=spans,
                       output=output, layout="full", store=store, layout_info=layout_info,
                       timings={"sample_s": t_sample - t0, "write_s": time.perf_counter() - t_sample,
                                "estimate_mb": need.memory_bytes / 2**20, "disk_mb": need.disk_bytes / 2**20})


def plan_key(spec: RunSpec, plan: RecordPlan, revision: str) -> str:
    """The cache key of a capture of `spec` that keeps what `plan` says: the spec's own key for the default
    plan, else one that also hashes the plan, so a capture with picked steps and layers never stands in
    for (nor is served as) the default capture of the same spec.  Use with `DitAdapter(handle, plan=plan)`."""
    key = spec.key(revision)
    return key if plan == RecordPlan() else stable_hash({"capture": key, "plan": dataclasses.asdict(plan)})


def _disk_budget(store) -> int:
    """What the cache can take: its size limit, and the free disk under it."""
    import shutil

    limit = int(getattr(store, "size_limit", 1 << 62))
    try:
        return min(limit, shutil.disk_usage(store.directory).free)
    except (OSError, AttributeError, TypeError):
        return limit


def handle(name: str = "shapes-dit", folder=None, minilm=None) -> ModelHandle:
    """A ModelHandle for a ShapesDit folder (the pipeline sits in the handle's `tokenizer` slot)."""
    import threading

    from capture.dit import model as dit_model
    from capture.dit.attention import attention_modules
    from core.types import ModelMeta

    pipe = dit_model.load(minilm, folder or dit_model.MODEL_DIR)
    config = pipe.transformer.config
    layers = [m for _p, m, kind in attention_modules(pipe.transformer) if kind != "cross"]
    meta = ModelMeta(name=name, family="sd3", modality="dit", n_layers=len(layers),
                     n_heads=int(config.num_attention_heads), n_kv_heads=int(config.num_attention_heads),
                     head_dim=int(config.attention_head_dim), causal=False, grid=pipe.grid)
    return ModelHandle(name=name, model=pipe.transformer, tokenizer=pipe, meta=meta, attention_modules=layers,
                       lock=threading.Lock())


__all__ = ["DitAdapter", "MAX_PROMPT_CHARS", "check_guidance", "handle", "plan_key"]
