"""HeadScope's attention processors for diffusers transformers, the recorder protocol, and `install`.

`install(transformer)` swaps every attention module's processor for HeadScope's and numbers the layers
HeadScope edits: each self-attention or joint-attention module, in depth order, gets `headscope_layer`
0, 1, ... (a cross-attention module - PixArt's and Sana's `attn2` - gets the index of the
self-attention layer of its block and is recorded under kind "cross").  Which processor a module gets:

- SD3 / SD3.5 joint attention (`attn.add_q_proj` present): `HeadScopeProcessor`, step for step
  `JointAttnProcessor2_0` (the sequence is [image tokens, text tokens] on both axes); SD3.5's extra
  image self-attention (`attn2` of its first blocks) is a "self" layer of its own; AuraFlow's MM-DiT and
  single blocks likewise (`AuraFlowAttnProcessor2_0`, [text tokens, image tokens]: `text_first`);
- self- and cross-attention (DiT, PixArt, Sana's cross-attention, HunyuanDiT): `HeadScopeProcessor`, step for
  step `AttnProcessor2_0` (Sana's `SanaAttnProcessor2_0`: q / k norms across heads, before the split;
  `HunyuanAttnProcessor2_0`: rotary embeddings on the image queries and self-attention keys);
- Flux's double- and single-stream blocks, FLUX.2's double-stream blocks: capture.dit.families.flux.FluxProcessor;
- FLUX.2's single-stream blocks: capture.dit.families.flux2.Flux2SingleProcessor;
- Qwen-Image's double-stream blocks: capture.dit.families.qwenimage.QwenProcessor;
- Lumina 2's layers: capture.dit.families.lumina2.Lumina2Processor, Z-Image's: .zimage.ZImageProcessor (their
  caption-only and image-only refiners are "self" layers on their part of the token axis: `refiner_part`);
- CogView 4's joint attention: capture.dit.families.cogview4.CogView4Processor;
- Sana's linear self-attention: capture.dit.families.sana.SanaLinearProcessor.

The attention itself (plain, edited, recorded) is capture.dit.attend.Attend, shared by all of them.
With no HeadScope session and no recording, or a session with no attention-level edit on a layer,
every processor makes the very same calls as diffusers' own, so images are bit-identical
(tests/models/test_dit.py, tests/models/test_dit_pipelines.py hold this).

Recording: `capture.dit.attend.recording(recorder)` makes a recorder active (a ContextVar).  A recorder has `step` (set
by the sampler before each transformer call), `row` (the batch row it records: the conditional
branch), `wants(layer)`, `wants_qk(layer)` / `qk(...)` (queries and keys kept for recomputing maps),
and `open(layer, kind, frame, heads, n_q, n_k)`, which returns a sink taking the module's map of that
row block by block (`rows(r0, weights  # [head, rows, key] float32)`) and `close()`.  `DitRecorder`
here hands each module's whole map to a callback; capture.dit.record.MapRecorder writes a capture.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from capture.dit.attend import Attend, Frame

OnMap = Callable[[int, int, str, np.ndarray], None]


class _ModuleMap:
    """A sink that assembles one module's map  # [head, n_q, n_k] float16 and hands it on when closed."""

    def __init__(self, done: Callable[[np.ndarray], None], heads: int, n_q: int, n_k: int):
        self.done = done
        self.buf = np.zeros((heads, n_q, n_k), dtype=np.float16)

    def rows(self, r0: int, weights: torch.Tensor) -> None:
        self.buf[:, r0:r0 + weights.shape[1]] = weights.to(torch.float16).cpu().numpy()

    def close(self) -> None:
        self.done(self.buf)


class DitRecorder:
    """Collects the attention maps of one batch row (`row`, 0 unless set) at chosen sampling steps.

    steps   the step indices to record (None: every step); `step` is set by the sampler.
    on_map  called with (step, layer, kind, maps  # [head, query, key] float16) on the module's own axes,
            kind "joint" | "self" | "cross".
    """

    def __init__(self, on_map: OnMap, steps: set[int] | None = None, layers: set[int] | None = None):
        self.on_map = on_map
        self.steps = steps
        self.layers = layers
        self.step = 0
        self.row = 0

    def wants(self, layer: int) -> bool:
        return (self.steps is None or self.step in self.steps) and (self.layers is None or layer in self.layers)

    def wants_qk(self, layer: int) -> bool:
        return False

    def open(self, layer: int, kind: str, frame: Frame, heads: int, n_q: int, n_k: int) -> _ModuleMap:
        step = self.step
        return _ModuleMap(lambda buf: self.on_map(step, layer, kind, buf), heads, n_q, n_k)


def _split_heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, norm_first: bool = False):
    """[batch, tokens, heads * head_dim] projections -> [batch, head, tokens, head_dim] each, q / k normed
    as diffusers' processors do (per head after the split; Sana's cross-attention across heads before it)."""
    if norm_first:
        query = attn.norm_q(query) if attn.norm_q is not None else query
        key = attn.norm_k(key) if attn.norm_k is not None else key
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(t.shape[0], -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if not norm_first:
        query = attn.norm_q(query) if attn.norm_q is not None else query
        key = attn.norm_k(key) if attn.norm_k is not None else key
    return query, key, value, head_dim


class HeadScopeProcessor:
    """A drop-in for JointAttnProcessor2_0 / AuraFlowAttnProcessor2_0 (`text_first`) / AttnProcessor2_0 /
    SanaAttnProcessor2_0 / HunyuanAttnProcessor2_0 that records and edits."""

    def __init__(self, layer: int, kind: str, n_heads: int, routed: bool = False, norm_first: bool = False,
                 text_first: bool = False):
        self.attend = Attend(layer, kind, n_heads, routed)
        self.layer, self.kind, self.norm_first, self.text_first = layer, kind, norm_first, text_first

    def _attend(self, attn, frame: Frame, query, key, value, attention_mask) -> torch.Tensor:
        """query, key, value  # [batch, head, n, head_dim] -> [batch, n_q, head * head_dim] (before to_out)."""
        batch, heads, _n, head_dim = query.shape

        def plain() -> torch.Tensor:
            hidden = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                    is_causal=False)
            return hidden.transpose(1, 2).reshape(batch, -1, heads * head_dim)

        return self.attend(frame, query, key, value, attention_mask, attn.scale, plain)

    # ---- diffusers' entry point ------------------------------------------------------------------
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, *args, **kwargs):
        if self.kind == "joint":
            return self._joint(attn, hidden_states, encoder_hidden_states)
        return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)

    def _joint(self, attn, hidden_states, encoder_hidden_states):
        """JointAttnProcessor2_0 ([image, text]), or AuraFlowAttnProcessor2_0 with `text_first` ([text, image];
        its single blocks have no text stream of their own), step for step."""
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value, head_dim = _split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                                   attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            pairs = ((eq, query), (ek, key), (ev, value)) if self.text_first else ((query, eq), (key, ek), (value, ev))
            query, key, value = (torch.cat(pair, dim=2) for pair in pairs)
        hidden_states = self._attend(attn, Frame(), query, key, value, None)
        if encoder_hidden_states is not None:
            cut = encoder_hidden_states.shape[1] if self.text_first else residual.shape[1]
            first, second = hidden_states[:, :cut], hidden_states[:, cut:]
            hidden_states, encoder_hidden_states = (second, first) if self.text_first else (first, second)
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _plain(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb=None):
        """AttnProcessor2_0 (and SanaAttnProcessor2_0 with `norm_first`; HunyuanAttnProcessor2_0 with
        `image_rotary_emb`: the image queries rotated, and the keys of a self-attention), step for step."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value, _ = _split_heads(attn, query, attn.to_k(encoder_hidden_states),
                                            attn.to_v(encoder_hidden_states), self.norm_first)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb)
            key = key if self.kind == "cross" else apply_rotary_emb(key, image_rotary_emb)
        frame = Frame(0, query.shape[2]) if self.kind == "cross" else Frame()  # cross: image rows, text keys
        hidden_states = self._attend(attn, frame, query, key, value, attention_mask)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _original(module) -> str:
    """The class name of diffusers' own processor of a module (kept by `install` while HeadScope's runs)."""
    return type(getattr(module, "headscope_original", module.processor)).__name__


def _kind(path: str, module) -> str:
    if refiner_part(path, module) is not None:
        return "self"  # Lumina 2's and Z-Image's refiners: the caption's or the image's tokens alone
    if getattr(module, "add_q_proj", None) is not None:
        return "joint"
    if _original(module) in ("CogView4AttnProcessor", "AuraFlowAttnProcessor2_0", *REFINING):
        return "joint"  # one set of projections over text and image (CogView 4, AuraFlow's single blocks, Lumina 2 ...)
    if getattr(module, "is_cross_attention", False):
        return "cross"
    if type(module).__name__ in ("FluxAttention", "Flux2ParallelSelfAttention"):  # single-stream: [text, image]
        return "joint"
    return "self"


REFINING = ("Lumina2AttnProcessor2_0", "ZSingleStreamAttnProcessor")  # processors of families with refiner layers
REFINERS = {"context_refiner.": "caption", "noise_refiner.": "image"}  # their layers before the joint ones


def refiner_part(path: str, module) -> str | None:
    """"caption" or "image" for a refiner layer of Lumina 2 or Z-Image (the part of the token axis it attends
    over), else None."""
    if _original(module) not in REFINING:
        return None
    return next((part for prefix, part in REFINERS.items() if path.startswith(prefix)), None)


def attention_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(path, module, kind) of every diffusers attention module (Attention, FluxAttention), in depth order."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [(path, module, _kind(path, module)) for path, module in transformer.named_modules()
            if isinstance(module, (Attention, AttentionModuleMixin))]


def _processor(path: str, module, layer: int, kind: str, routed: bool):
    """HeadScope's processor for one module, chosen by the processor it replaces."""
    name = type(module.processor).__name__
    if type(module).__name__ == "FluxAttention" or name == "Flux2AttnProcessor":
        from capture.dit.families.flux import FluxProcessor

        return FluxProcessor(layer, module.heads)
    if name == "Flux2ParallelSelfAttnProcessor":
        from capture.dit.families.flux2 import Flux2SingleProcessor

        return Flux2SingleProcessor(layer, module.heads)
    if name == "CogView4AttnProcessor":
        from capture.dit.families.cogview4 import CogView4Processor

        return CogView4Processor(layer, module.heads)
    if name == "QwenDoubleStreamAttnProcessor2_0":
        from capture.dit.families.qwenimage import QwenProcessor

        return QwenProcessor(layer, module.heads)
    if name == "Lumina2AttnProcessor2_0":
        from capture.dit.families.lumina2 import Lumina2Processor

        return Lumina2Processor(layer, module.heads, refiner_part(path, module))
    if name == "ZSingleStreamAttnProcessor":
        from capture.dit.families.zimage import ZImageProcessor

        return ZImageProcessor(layer, module.heads, refiner_part(path, module))
    if name == "SanaLinearAttnProcessor2_0":
        from capture.dit.families.sana import SanaLinearProcessor

        return SanaLinearProcessor(layer, module.heads, routed)
    if name not in ("AttnProcessor2_0", "JointAttnProcessor2_0", "SanaAttnProcessor2_0", "HunyuanAttnProcessor2_0",
                    "AuraFlowAttnProcessor2_0"):
        raise ValueError(f"HeadScope does not know the {name} attention processor")
    return HeadScopeProcessor(layer, kind, module.heads, routed, norm_first=name == "SanaAttnProcessor2_0",
                              text_first=name == "AuraFlowAttnProcessor2_0")


def install(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Swap in HeadScope's processors everywhere; returns the edited (self / joint) attention module of
    each layer.  diffusers' own processors are kept on the modules for `uninstall`.  Raises ValueError
    for a processor HeadScope does not know or a model with no attention module it can drive."""
    found = attention_modules(transformer)
    routed = any(kind == "cross" for _p, _m, kind in found)  # edits on text keys go to the cross modules
    plans, layers = [], []
    for path, module, kind in found:
        original = getattr(module, "headscope_original", module.processor)
        module.headscope_original = original
        module.processor = original  # so `_processor` sees diffusers' class, also on a second install
        if kind == "cross":
            index = max(0, len(layers) - 1)  # the block's self-attention came just before it
        else:
            index = len(layers)
            layers.append(module)
        plans.append((module, index, _processor(path, module, index, kind, routed)))
    if not layers:
        raise ValueError("this transformer has no self- or joint-attention modules HeadScope can drive")
    for module, index, processor in plans:
        module.headscope_layer = index
        module.set_processor(processor)
    return layers


def uninstall(transformer: torch.nn.Module) -> None:
    """Back to diffusers' own processors (for comparisons)."""
    for _path, module, _kind in attention_modules(transformer):
        original = getattr(module, "headscope_original", None)
        if original is not None:
            module.set_processor(original)


__all__ = ["DitRecorder", "HeadScopeProcessor", "attention_modules", "install", "uninstall"]
