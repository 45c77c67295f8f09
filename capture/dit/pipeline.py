"""Sampling from a diffusers pipeline with HeadScope's recording, edits and SoftPAG / PAG guidance.

`PipelineDit.run` calls the pipeline exactly as a person would (`pipe(prompt, height, width,
num_inference_steps, generator=seed, output_type="np")`, plus the family's fixed arguments), with
HeadScope's processors installed in its transformer (capture.dit.attention.install), so without an
intervention the picture is the plain pipeline's, bit for bit.  Around the transformer it hangs:

- forward pre-hooks on the text encoders that catch the prompt's token ids (the labels of the text
  tokens; the encoders themselves run outside the recorded pass, untouched);
- a forward pre-hook on the transformer that, before each call, tells the recorder the step and the
  batch row of the conditional branch (the last row of the pipeline's batch: [unconditional,
  conditional] with classifier-free guidance, the only row without; Z-Image's first, `cond_first`; a family
  that calls the transformer a second time per step for the negative prompt, Chroma, has that call left
  unrecorded, and where that call's text is not as long as the prompt's (Qwen-Image, CogView 4, Lumina 2) a
  direct intervention acts there on that call's own axis: capture.dit.presets.moved),
  and at the first call builds the run's token axis (capture.dit.tokens) for the recorder and the
  session's spans;
- for SoftPAG / PAG (capture.dit.presets): the pre-hook appends a copy of the conditional row, which
  the session perturbs (its row intervention), and a forward hook folds it back into the conditional
  output, c' = c + (s / g) (c - p), so the pipeline's own guidance u + g (c' - u) becomes
  u + g (c - u) + s (c - p) (Ahn et al. 2024, PAG; g = 1 without classifier-free guidance, e.g. Flux;
  Z-Image guides as c' + g (c' - u): 1 + g there, the family's `cond_weight`).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import numpy as np
import torch

from capture.dit import presets
from capture.dit.attend import recording
from capture.dit.attention import attention_modules, refiner_part
from capture.dit.families import Family, text_tokenizer
from capture.dit.tokens import TokenLayout, leading_padding, padding_start
from capture.engine.session import session
from core.errors import InputError
from core.interventions import Intervention


def _expand(value, batch: int, row: int):
    """A transformer argument with the conditional row `row` appended (tensors of `batch` rows, lists of one tensor
    per row as Z-Image's, in dicts too)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value, value[row:row + 1]])
    if isinstance(value, list) and len(value) == batch and all(isinstance(v, torch.Tensor) for v in value):
        return value + [value[row]]
    if isinstance(value, dict):
        return {k: _expand(v, batch, row) for k, v in value.items()}
    return value


class PipelineDit:
    """A loaded diffusers pipeline of a known family (held in the ModelHandle's `tokenizer` slot)."""

    def __init__(self, pipe, family: Family):
        self.pipe, self.family = pipe, family
        params = inspect.signature(type(pipe).__call__).parameters
        self.defaults = {name: params[name].default for name in ("num_inference_steps", family.guidance_arg,
                                                                 "max_sequence_length") if name in params}
        side = getattr(pipe, "default_sample_size", None) or getattr(pipe.transformer.config, "sample_size", None)
        self.default_side = family.default_side or int(side) * int(pipe.vae_scale_factor)
        self.unit = int(family.unit_of(pipe))
        self.max_side = int(family.max_side(pipe, self.default_side))
        found = attention_modules(pipe.transformer)
        cross = [m for _p, m, kind in found if kind == "cross"]
        self.cross_heads = int(cross[0].heads) if cross else 0  # PixArt, Sana, HunyuanDiT: the word maps' heads
        # per layer, the part of the token axis its map covers: "all", or a "self" layer's "image" (SD3.5's extra
        # self-attention, the image refiners, a cross family's self-attention) or "caption" (the caption refiners)
        self.parts = ["all" if kind != "self" else refiner_part(path, module) or "image"
                      for path, module, kind in found if kind != "cross"]
        # the layers whose picture reads the text: a cross family's all, a joint family's that cover the whole axis
        self.word_layers = [i for i, part in enumerate(self.parts) if part == "all" or cross]
        self.masks_padding, self.joint_mask = family.masks_padding, family.joint_mask

    def text_length(self, prompt: str) -> tuple[int, int]:
        """(text positions the transformer reads, word-map columns of a "split" capture), estimated from
        the tokenizers before the run: every position, and the prompt's tokens plus one column per
        padding run (a family whose text is not padded: its very positions, from `read_ids`)."""
        extra = self.family.n_extra(self.pipe)
        if self.family.read_ids is not None:
            ids = self.family.read_ids(self.pipe, prompt)
            pad = text_tokenizer(self.pipe, self.family.encoders[0][2]).pad_token_id
            padding = leading_padding(ids, pad) if self.family.pads_left else len(ids) - padding_start(ids, pad, None)
            return extra + len(ids), extra + len(ids) - padding + min(padding, 1)  # a padding run: one column
        total = columns = extra
        for segment, _encoder, attr in self.family.encoders:
            tokenizer = text_tokenizer(self.pipe, attr)
            length = self._padded_length(segment, tokenizer)
            if tokenizer is None:
                length = self.family.missing(self.pipe, segment) if self.family.missing else 0
                total, columns = total + length, columns + min(length, 1)
                continue
            words = len(self.family.encode(self.pipe, prompt, length) if self.family.encode is not None else
                        tokenizer(prompt, truncation=True, max_length=length)["input_ids"])
            total, columns = total + length, columns + min(words, length) + 1
        return total, columns

    def _padded_length(self, segment: str, tokenizer) -> int:
        """The length the pipeline pads a text segment to: the family's (HunyuanDiT), CLIP's
        `tokenizer_max_length`, the call's `max_sequence_length`, else the tokenizer's own."""
        if segment in self.family.lengths:
            return int(self.family.lengths[segment])
        if segment == "clip":
            return int(self.pipe.tokenizer_max_length)
        return int(self.defaults.get("max_sequence_length", 0) or getattr(tokenizer, "model_max_length", 0))

    @property
    def default_steps(self) -> int:
        return int(self.defaults.get("num_inference_steps", 20))

    @property
    def skips_guidance(self) -> bool:
        """True where the pipeline skips guidance at any scale (a distilled FLUX.2 [klein]: one call a step)."""
        return self.family.guides is not None and not self.family.guides(self.pipe)

    @property
    def guidance(self) -> float:
        """The pipeline's default guidance scale (the family's `cfg_from`, no guidance, where it skips guidance)."""
        if self.skips_guidance:
            return self.family.cfg_from
        scale = self.defaults.get(self.family.guidance_arg)
        return self.family.cfg_from if scale is None else float(scale)

    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        return height // self.unit, width // self.unit

    def check_size(self, name: str, height: int, width: int) -> None:
        """InputError unless both sides are whole patches, from two patches to the family's largest side (and
        the patches a multiple of the family's `image_multiple`)."""
        low, multiple = 2 * self.unit, self.family.image_multiple
        sides_fit = low <= height <= self.max_side and low <= width <= self.max_side
        rows, cols = self.grid_of(height, width)
        if height % self.unit or width % self.unit or not sides_fit or (rows * cols) % multiple:
            count = f" and whose {self.unit} px patches number a multiple of {multiple}" if multiple > 1 else ""
            raise InputError(f"{name} samples pictures whose sides are multiples of {self.unit} px from {low} to "
                             f"{self.max_side} px{count}; {width} x {height} is not one.")

    def call_kwargs(self) -> dict:
        kwargs = dict(self.family.call_kwargs)
        if "max_sequence_length" in self.defaults:
            kwargs["max_sequence_length"] = self.defaults["max_sequence_length"]
        return kwargs

    def sample_many(self, prompts: list[str], seeds: list[int], steps: int, height: int, width: int,
                    intervention: Intervention = Intervention(), guidance: float | None = None) -> np.ndarray:
        """images  # [B, H, W, 3] uint8, one run per (prompt, seed), at guidance scale `guidance` (None: default)."""
        return np.stack([self.run(p, s, steps, height, width, intervention, guidance=guidance)[0]
                         for p, s in zip(prompts, seeds)])

    def run(self, prompt: str, seed: int, steps: int, height: int, width: int,
               intervention: Intervention = Intervention(), recorder=None,
               on_step: Callable[[int], None] | None = None,
               guidance: float | None = None) -> tuple[np.ndarray, TokenLayout, list[float], list[str]]:
        """(image  # [H, W, 3] uint8, token axis, scheduler timesteps, notes) of one sampling run; `guidance` the
        classifier-free guidance scale, passed as the family's `guidance_arg` (None: the pipeline's default)."""
        pipe, family = self.pipe, self.family
        guided = presets.is_guidance(intervention)
        direct = Intervention() if guided else intervention
        scale = presets.pag_scale(intervention)
        call = self.call_kwargs()
        skips = self.skips_guidance
        g = self.guidance if guidance is None or skips else float(guidance)
        if guidance is not None and not skips:
            call[family.guidance_arg] = g
        ignored = [f"{family.name}: this model's guidance is distilled into it; the guidance scale was ignored."] \
            if guidance is not None and skips else []
        branches = 2 if family.cfg and g > family.cfg_from else 1
        calls = 2 if family.separate_cfg and g > family.cfg_from else 1  # transformer calls per step
        rows = [Intervention()] * branches + [intervention] if guided else None
        caught: dict[str, list[int]] = {}
        state: dict = {"calls": 0, "layout": None, "notes": []}
        hooks = []

        def catch(attr: str):
            def hook(_module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if attr not in caught and ids is not None:
                    caught[attr] = [int(i) for i in ids[0].tolist()]
            return hook

        for _segment, attr, _tokenizer in family.encoders:
            encoder = getattr(pipe, attr, None)
            if encoder is not None:
                hooks.append(encoder.register_forward_pre_hook(catch(attr), with_kwargs=True))

        def before(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(hidden, list):  # Z-Image: one tensor per batch row
                batch, device = len(hidden), hidden[0].device
            else:
                batch, device = hidden.shape[0], hidden.device
            row = 0 if family.cond_first else batch - 1  # the conditional row
            if state["layout"] is None:
                text = family.n_read(pipe, args, kwargs)
                state["layout"], state["notes"] = family.layout(pipe, caught, self.grid_of(height, width), text, call)
                active.spans.update(state["layout"].spans())
                if recorder is not None:
                    recorder.start(state["layout"], device)
            step, branch = divmod(state["calls"], calls)
            state["calls"] += 1
            state["conditional"] = branch == 0  # a separate negative call (Chroma) is neither recorded nor guided
            if branch and not direct.empty:
                negative_call(family.n_read(pipe, args, kwargs))
            if recorder is not None:
                recorder.begin_step(step if branch == 0 else -1)  # step -1: nothing recorded
                recorder.row = row
            if on_step is not None and branch == 0:
                on_step(step)
            if not guided or branch:
                return None
            state["batch"], state["row"] = batch, row
            return (tuple(_expand(a, batch, row) for a in args),  # (Flux's *_ids carry no batch)
                    {k: v if k.endswith("_ids") else _expand(v, batch, row) for k, v in kwargs.items()})

        def negative_call(n_text: int) -> None:
            """The negative prompt's own call reads a text of another length (Qwen-Image, CogView 4, Lumina 2):
            the intervention's positions moved onto its axis (presets.moved), for this call."""
            layout = state["layout"]
            if n_text != len(layout.text):
                other = layout.with_text(n_text)
                state["negative"] = session(presets.moved(direct, layout, other), spans=other.spans())
                state["negative"].__enter__()

        def negative_done(_module, _args, _output):
            moved = state.pop("negative", None)
            if moved is not None:
                moved.__exit__(None, None, None)

        def ended(_module, _args, _output):
            recorder.end_step()

        def after(_module, _args, _kwargs, output):
            if not state["conditional"]:
                return None
            batch, row = state["batch"], state["row"]
            sample = output[0]
            cond, perturbed = sample[row], sample[batch]
            weight = family.cond_weight(g) if batch > 1 or calls > 1 else 1.0
            guided_cond = cond + (scale / weight) * (cond - perturbed)
            if isinstance(sample, list):  # Z-Image: one tensor per row
                sample = sample[:row] + [guided_cond] + sample[row + 1:batch]
            else:
                sample = torch.cat([sample[:row], guided_cond[None], sample[row + 1:batch]])
            if isinstance(output, tuple):
                return (sample,) + tuple(output[1:])
            output.sample = sample
            return output

        transformer = pipe.transformer
        hooks.append(transformer.register_forward_pre_hook(before, with_kwargs=True))
        if guided:
            hooks.append(transformer.register_forward_hook(after, with_kwargs=True))
        if recorder is not None:
            hooks.append(transformer.register_forward_hook(ended))
        if calls > 1 and not direct.empty:
            hooks.append(transformer.register_forward_hook(negative_done))
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        try:
            with contextlib.ExitStack() as stack:
                active = stack.enter_context(session(direct, row_interventions=rows))
                if recorder is not None:
                    stack.enter_context(recording(recorder))
                result = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                              generator=generator, output_type="np", **call)
        finally:
            for hook in hooks:
                hook.remove()
            negative_done(None, None, None)  # a call that raised
        image = (np.asarray(result.images[0]) * 255).round().astype(np.uint8)
        timesteps = [float(t) for t in pipe.scheduler.timesteps][:steps]
        return image, state["layout"], timesteps, state["notes"] + ignored


__all__ = ["PipelineDit"]
