"""Diffusion transformers: text -> image sampling with the joint-attention maps of every step recorded.

A capture samples the prompt once (`spec.seed`, `spec.steps`, 20 when 0) with the model's
classifier-free guidance, and records the maps of batch row 0 (the conditional branch) at every
sampling step, every layer, every head (capture.dit.attention).  The sampled image is the image of
that very run: recording computes the maps on the side and never changes the output.

The spec's intervention acts as capture.dit.presets says: a SoftPAG / PAG preset adds a perturbed
branch and guides away from it; any other intervention edits every branch directly.

Stored (core.dit_capture): per layer T<layer> [step, head, query, key] and L<layer> (mean over
steps), the overview thumbnails, the image "generated"; tokens "patch(r,c)" then MiniLM's tokens;
spans "image", "text", "prompt" ([CLS] .. [SEP]) and "padding".
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from capture.dit import attention as dit_attention
from capture.dit import model as dit_model
from capture.dit import presets as dit_presets
from capture.engine.handle import ModelHandle
from core import dit_capture
from core.errors import InputError
from core.progress import Progress
from core.types import MAX_STEPS, OVERVIEW_BINS, Capture, ModelMeta, Output, RunSpec
from core.layouts import max_pool, overview_name

MAX_PROMPT_CHARS = 500


def token_layout(grid: tuple[int, int], text_tokens: list[str], n_real: int) -> tuple[list[str], dict[str, range]]:
    """Axis labels and spans of a joint-attention map: patches row by row, then the text tokens."""
    rows, cols = grid
    n_img = rows * cols
    tokens = [f"patch({r},{c})" for r in range(rows) for c in range(cols)] + list(text_tokens)
    n = len(tokens)
    spans = {"image": range(0, n_img), "text": range(n_img, n), "prompt": range(n_img, n_img + n_real),
             "padding": range(n_img + n_real, n)}
    return tokens, spans


class DitAdapter:
    """The embedded shapes-dit (and any capture.dit.model.ShapesDit)."""

    def __init__(self, handle: ModelHandle, record_steps: set[int] | None = None):
        self.handle = handle
        self.pipe: dit_model.ShapesDit = handle.tokenizer
        self.record_steps = record_steps  # None: every step

    def layout(self, prompt: str) -> tuple[list[str], dict[str, range]]:
        text = self.pipe.text
        return token_layout(self.pipe.grid, text.tokens(prompt), text.n_real(prompt))

    def guidance(self, spec: RunSpec) -> tuple[dit_model.Guidance, object]:
        """(how branches combine, the intervention applied to every branch)."""
        from core.interventions import Intervention

        iv = spec.intervention
        if dit_presets.is_guidance(iv):
            return dit_model.Guidance(cfg=self.pipe.guidance, pag=dit_presets.pag_scale(iv), perturbation=iv), Intervention()
        return dit_model.Guidance(cfg=self.pipe.guidance), iv

    def capture(self, spec: RunSpec, key: str, store, progress: Progress) -> Capture:
        meta: ModelMeta = self.handle.meta
        t0 = time.perf_counter()
        prompt = spec.prompt.strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"The prompt is {len(prompt)} characters; {meta.name} reads at most {MAX_PROMPT_CHARS}.")
        steps = spec.steps or dit_model.DEFAULT_STEPS
        if not 1 <= steps <= MAX_STEPS:
            raise InputError(f"Steps must be between 1 and {MAX_STEPS}.")
        if not 0 <= spec.seed < 2**31:
            raise InputError("The seed must be a whole number from 0 to 2147483647.")
        notes = []
        if spec.image is not None:
            notes.append(f"{meta.name} generates images from text: the input image was ignored.")
        if spec.max_new_tokens:
            notes.append(f"{meta.name} generates an image, not text: max new tokens was ignored.")
        n_text = self.pipe.text.text_len
        if len(self.pipe.text.tokenizer(prompt)["input_ids"]) > n_text:
            notes.append(f"The prompt is longer than the {n_text} tokens {meta.name} reads; the rest was cut.")
        tokens, spans = self.layout(prompt)
        n = len(tokens)
        wanted = sorted(self.record_steps) if self.record_steps is not None else list(range(steps))
        wanted = [s for s in wanted if 0 <= s < steps]
        slot = {s: i for i, s in enumerate(wanted)}
        maps = [np.zeros((len(wanted), meta.n_heads, n, n), dtype=np.float16) for _ in range(meta.n_layers)]
        timesteps: dict[int, float] = {}

        def on_map(step: int, layer: int, kind: str, weights: np.ndarray) -> None:
            if kind != "cross":
                maps[layer][slot[step]] = weights

        recorder = dit_attention.DitRecorder(on_map, steps=set(wanted))

        def on_step(info: dit_model.StepInfo) -> None:
            recorder.step = info.index
            timesteps[info.index] = info.timestep
            progress(0.9 * info.index / steps, f"denoising step {info.index + 1}/{steps}")

        guidance, direct = self.guidance(spec)
        with dit_attention.recording(recorder):
            image = self.pipe.sample([prompt], [spec.seed], steps=steps, guidance=guidance, intervention=direct,
                                     on_step=on_step, spans=spans)[0]
        t_sample = time.perf_counter()
        progress(0.9, "writing the maps")
        write(store, key, maps, image)
        if guidance.pag:
            notes.append(f"SoftPAG: {len(spec.intervention.heads())} head(s) perturbed in a guidance branch, "
                         f"scale {guidance.pag:g}; the maps shown are the conditional branch's.")
        output = Output(notes=notes, recorded_steps=wanted, timesteps=[timesteps.get(s, float("nan")) for s in wanted])
        return Capture(key=key, spec=spec, meta=meta, tokens=tokens, spans=spans, output=output, layout="full",
                       store=store, timings={"sample_s": t_sample - t0, "write_s": time.perf_counter() - t_sample})


def write(store, key: str, maps: list[np.ndarray], image: np.ndarray) -> None:
    """Per layer its steps (T) and their mean (L), the overview and the image; written on two threads."""
    n = maps[0].shape[-1]
    bins = min(OVERVIEW_BINS, n)
    means = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="headscope-dit-writer") as pool:
        jobs = [pool.submit(store.put_array, key, dit_capture.IMAGE_NAME, np.ascontiguousarray(image))]
        for layer, steps in enumerate(maps):
            jobs.append(pool.submit(store.put_array, key, dit_capture.steps_name(layer), steps))
            mean = steps.astype(np.float32).mean(0).astype(np.float16) if len(steps) else np.zeros(steps.shape[1:], np.float16)
            means.append(mean)
            jobs.append(pool.submit(store.put_array, key, f"L{layer:03d}", mean))
        thumbs = np.stack([max_pool(m, bins) for m in means])
        jobs.append(pool.submit(store.put_array, key, overview_name(bins), thumbs))
        for job in jobs:
            job.result()


def handle(name: str = "shapes-dit", folder=None, minilm=None) -> ModelHandle:
    """A ModelHandle for a ShapesDit folder (the pipeline sits in the handle's `tokenizer` slot)."""
    import threading

    pipe = dit_model.load(minilm, folder or dit_model.MODEL_DIR)
    config = pipe.transformer.config
    layers = [m for _p, m, kind in dit_attention.attention_modules(pipe.transformer) if kind != "cross"]
    meta = ModelMeta(name=name, family="sd3", modality="dit", n_layers=len(layers),
                     n_heads=int(config.num_attention_heads), n_kv_heads=int(config.num_attention_heads),
                     head_dim=int(config.attention_head_dim), causal=False,
                     grid=pipe.grid)
    return ModelHandle(name=name, model=pipe.transformer, tokenizer=pipe, meta=meta, attention_modules=layers,
                       lock=threading.Lock())


__all__ = ["DitAdapter", "token_layout", "handle", "write"]
