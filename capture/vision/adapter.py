"""Vision transformers: one recorded forward over an image (ViT, DeiT, DINOv2, CLIP / SigLIP towers).

The image comes from the RunSpec (`image`: a sample name or "sha256:<hex>" of a stored upload; see
capture.images), is preprocessed as the model's image processor would (resize, centre crop,
normalise: capture.images.preprocess), and runs once with the recorder on ("full" layout: every
query row over every key).  The picture as the model saw it is stored with the capture ("image"),
so overlays need neither the upload nor the model.

Tokens: "CLS", "DIST" (DeiT's distillation token), "reg0".. (register tokens), then "patch(r,c)" in
row-major order; spans "cls", "distill", "registers" where present, and "patches".
For image classifiers the Output carries the top-5 (label, probability).
"""
from __future__ import annotations

import dataclasses
import inspect
import time

import numpy as np
import torch

import capture.images as images
from capture.engine import linears
from capture.engine.handle import ModelHandle
from capture.engine.recorder import Recorder, small_pass
from capture.engine.session import session
from capture.engine.writer import LayerWriter
from capture.text.adapter import stored_bytes
from core.errors import InputError
from core.progress import Progress
from core.types import Capture, Output, RunSpec

TOP_K = 5


def token_layout(model_type: str, n_tokens: int, grid: tuple[int, int]) -> tuple[list[str], dict[str, range]]:
    """Axis labels and spans of a vision sequence: the prefix tokens, then the patch grid row by row."""
    rows, cols = grid
    n_prefix = n_tokens - rows * cols
    if n_prefix < 0:
        raise InputError(f"The model returned {n_tokens} tokens, fewer than its {rows} x {cols} patches.")
    tokens: list[str] = []
    spans: dict[str, range] = {}
    if n_prefix and not model_type.startswith("siglip"):
        tokens.append("CLS")
        spans["cls"] = range(0, 1)
    if model_type == "deit" and len(tokens) < n_prefix:
        spans["distill"] = range(len(tokens), len(tokens) + 1)
        tokens.append("DIST")
    if len(tokens) < n_prefix:
        spans["registers"] = range(len(tokens), n_prefix)
        tokens += [f"reg{i}" for i in range(n_prefix - len(tokens))]
    tokens += [f"patch({r},{c})" for r in range(rows) for c in range(cols)]
    spans["patches"] = range(n_prefix, n_tokens)
    return tokens, spans


class VisionAdapter:
    """Image encoders and image classifiers from transformers."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self.prep: images.ImagePrep = handle.tokenizer
        config = handle.model.config
        patch = config.patch_size
        self.patch = patch if isinstance(patch, int) else int(patch[0])
        size = config.image_size
        self.image_size = size if isinstance(size, int) else int(size[0])
        self.model_type = config.model_type
        # tokens before the patches: CLS (none in SigLIP), DeiT's distillation token, registers
        self.n_prefix = 0 if self.model_type.startswith("siglip") else (
            1 + (self.model_type == "deit") + int(getattr(config, "num_register_tokens", 0) or 0))
        self.classifier = hasattr(handle.model, "classifier") and getattr(config, "id2label", None) is not None
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(handle.model.forward).parameters

    # ---- inputs -------------------------------------------------------------------------------
    def encode(self, spec: RunSpec) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values  # [3, H, W] float32, shown  # [H, W, 3] uint8) for the spec's image."""
        picture = images.load_image(spec.image)
        pixels, shown = images.preprocess(picture, self.prep)
        height, width = pixels.shape[1:]
        if height < self.patch or width < self.patch:
            raise InputError(f"The image is too small for {spec.model}'s {self.patch}-pixel patches.")
        return pixels, shown

    def grid(self, pixels: np.ndarray) -> tuple[int, int]:
        return pixels.shape[1] // self.patch, pixels.shape[2] // self.patch

    def forward_kwargs(self, pixels: np.ndarray) -> dict:
        """Model inputs; asks for position-embedding interpolation when the size is not the trained one."""
        kwargs = {"pixel_values": torch.from_numpy(pixels)[None]}
        if self._interpolate and tuple(pixels.shape[1:]) != (self.image_size, self.image_size):
            kwargs["interpolate_pos_encoding"] = True
        return kwargs

    def top_classes(self, logits: torch.Tensor) -> list[tuple[str, float]]:
        probs = torch.softmax(logits.float(), dim=-1)  # [class]
        top = torch.topk(probs, min(TOP_K, probs.shape[-1]))
        labels = self.handle.model.config.id2label
        return [(str(labels.get(int(i), int(i))), float(p)) for p, i in zip(top.values, top.indices)]

    # ---- the recorded pass --------------------------------------------------------------------
    def capture(self, spec: RunSpec, key: str, store, progress: Progress) -> Capture:
        meta = self.handle.meta
        t0 = time.perf_counter()
        pixels, shown = self.encode(spec)
        grid = self.grid(pixels)
        notes = []
        if spec.prompt.strip():
            notes.append(f"{meta.name} is an image encoder: the prompt was ignored.")
        if spec.max_new_tokens:
            notes.append(f"{meta.name} is an image encoder: it does not generate.")
        n_tokens = grid[0] * grid[1] + self.n_prefix
        tokens, spans = token_layout(self.model_type, n_tokens, grid)
        need = stored_bytes(meta.n_layers, meta.n_heads, n_tokens, causal=False)
        if need > store.size_limit:
            raise InputError(f"Capturing {n_tokens} tokens needs {need / 2**30:.1f} GB of cache but the cache holds "
                             f"{store.size_limit / 2**30:.1f} GB; raise HEADSCOPE_CACHE_GB.")
        store.put_array(key, "image", shown)
        t_prep = time.perf_counter()
        seen: dict[str, int] = {}

        small = small_pass(meta.n_layers, meta.n_heads, n_tokens)
        with LayerWriter(store, key, meta.n_layers, progress, 0.0, defer=small) as writer:
            def on_layer(layer: int, maps: np.ndarray, *extra) -> None:
                seen["n"] = maps.shape[-1]
                writer.submit(layer, maps, *extra)

            recorder = Recorder(meta.n_heads, "full", on_layer, defer=small)
            with session(spec.intervention, recorder=recorder, spans=spans):
                with torch.inference_mode(), linears.packed(self.handle.model):
                    out = self.handle.model(**self.forward_kwargs(pixels))
            recorder.finish()
        classes = self.top_classes(out.logits[0]) if self.classifier and hasattr(out, "logits") else []
        t_cap = time.perf_counter()
        if seen.get("n", n_tokens) != n_tokens:  # a prefix this adapter did not expect: label what came out
            tokens, spans = token_layout(self.model_type, seen["n"], grid)
        return Capture(
            key=key, spec=spec, meta=dataclasses.replace(meta, grid=grid), tokens=tokens, spans=spans,
            output=Output(notes=notes, classes=classes), layout="full", store=store,
            timings={"preprocess_s": t_prep - t0, "capture_s": t_cap - t_prep},
        )
