"""HeadScope's attention processor for diffusers transformers: capture per timestep and head edits.

`install(transformer)` swaps every `Attention` module's processor for a `HeadScopeProcessor` and
numbers the layers HeadScope edits: each self-attention or joint-attention module, in depth order,
gets `headscope_layer` 0, 1, ...  (a cross-attention module - PixArt's `attn2` - gets the index of the
self-attention layer of its block and is recorded under kind "cross"; edits never touch it.)

The processor reproduces diffusers' default processors operation by operation:
- joint attention (SD3 / MM-DiT, `attn.add_q_proj` present): `JointAttnProcessor2_0`; the sequence is
  [image tokens, text tokens] on both axes;
- self- and cross-attention (DiT, PixArt): `AttnProcessor2_0`.
With no HeadScope session and no recording, or a session with no attention-level edit on a layer,
the layer's output is computed by the very same calls (SDPA), so images are bit-identical to the
default processors' (tests/test_dit.py holds this).  Recording does not change the output either:
the weights are computed on the side, softmax(q k^T * scale) in fp32, for the recorded batch row.

Edits come from the active `capture.engine.session.session` (the one mechanism of DESIGN.md):
- attention-level edits (mix, logit, redistribute, window) on a layer: the layer's attention is
  computed by `capture.engine.attention.headscope_attention`, which applies them per head and batch row
  (row interventions: the perturbed branch of PAG / SoftPAG) and hands the edited weights of batch
  row 0 to the session's recorder;
- output-level edits (scale, add) and head gates: `capture.engine.head_outputs.scale_head_outputs`, applied to
  the concatenated head outputs of the whole joint sequence before the output projections.

Recording: `recording(...)` makes a `DitRecorder` active (a ContextVar); the sampler sets its `step`
before each transformer call, and each layer's maps  # [head, query, key] float16 of batch row 0 are
handed to `on_map(step, layer, kind, maps)` at the steps asked for.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from capture.engine import attention
from capture.engine.head_outputs import scale_head_outputs
from capture.engine.session import current_session
from core.errors import InterventionError

OnMap = Callable[[int, int, str, np.ndarray], None]


class DitRecorder:
    """Collects the attention maps of batch row 0 at chosen sampling steps.

    steps   the step indices to record (None: every step); `step` is set by the sampler.
    on_map  called with (step, layer, kind, maps  # [head, query, key] float16), kind "joint" | "self" | "cross".
    Also usable as a `capture.engine.session` session recorder (`take`): edited layers hand their rows to it.
    """

    def __init__(self, on_map: OnMap, steps: set[int] | None = None, layers: set[int] | None = None):
        self.on_map = on_map
        self.steps = steps
        self.layers = layers
        self.step = 0
        self._rows: dict[int, np.ndarray] = {}
        self._done: dict[int, int] = {}
        self.kind_of: dict[int, str] = {}

    def wants(self, layer: int) -> bool:
        return (self.steps is None or self.step in self.steps) and (self.layers is None or layer in self.layers)

    def put(self, layer: int, kind: str, weights: torch.Tensor) -> None:
        """weights  # [head, query, key] (any float dtype)."""
        self.on_map(self.step, layer, kind, weights.to(torch.float16).numpy())

    # the session-recorder interface of capture.engine.recorder (edited layers)
    def take(self, layer: int, first_head: int, first_row: int, n: int, weights: torch.Tensor) -> None:
        if not self.wants(layer):
            return
        n_block, n_rows, n_keys = weights.shape
        if layer not in self._rows:
            self._rows[layer] = np.zeros((n_block if first_head == 0 else first_head + n_block, n, n_keys),
                                         dtype=np.float16)
            self._done[layer] = 0
        buf = self._rows[layer]
        if buf.shape[0] < first_head + n_block:
            grown = np.zeros((first_head + n_block,) + buf.shape[1:], dtype=np.float16)
            grown[: buf.shape[0]] = buf
            buf = self._rows[layer] = grown
        buf[first_head:first_head + n_block, first_row:first_row + n_rows] = weights.to(torch.float16).numpy()
        self._done[layer] += n_block * n_rows

    def flush(self, layer: int, n_heads: int, n: int) -> None:
        """Hand on a layer assembled by `take` once all its rows are in."""
        buf = self._rows.get(layer)
        if buf is not None and self._done[layer] >= n_heads * n:
            del self._rows[layer], self._done[layer]
            self.on_map(self.step, layer, self.kind_of.get(layer, "joint"), buf)


_RECORDER: contextvars.ContextVar[DitRecorder | None] = contextvars.ContextVar("headscope_dit_recorder", default=None)


@contextlib.contextmanager
def recording(recorder: DitRecorder) -> Iterator[DitRecorder]:
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def current_recorder() -> DitRecorder | None:
    return _RECORDER.get()


class _Stub:
    """What `capture.engine.attention.headscope_attention` reads from its module: the layer, not causal."""

    is_causal = False

    def __init__(self, layer: int):
        self.headscope_layer = layer



def _split_heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """[batch, tokens, heads * head_dim] projections -> [batch, head, tokens, head_dim] each, q / k normed
    as diffusers' processors do; also returns head_dim."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(t.shape[0], -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim

class HeadScopeProcessor:
    """A drop-in for JointAttnProcessor2_0 / AttnProcessor2_0 that records and edits (module docstring)."""

    def __init__(self, layer: int, kind: str, n_heads: int):
        if kind not in ("joint", "self", "cross"):
            raise ValueError(f"unknown attention kind {kind!r}")
        self.layer, self.kind, self.n_heads = layer, kind, n_heads
        self._stub = _Stub(layer)
        self._output_hook = scale_head_outputs(layer, n_heads)

    # ---- the core: q, k, v -> per-head outputs, with edits and recording --------------------------------
    def _attend(self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """query, key, value  # [batch, head, n, head_dim] -> [batch, n_q, head * head_dim] (before to_out)."""
        batch, heads, n_q, head_dim = query.shape
        active = current_session() if self.kind != "cross" else None
        recorder = _RECORDER.get()
        record = recorder is not None and recorder.wants(self.layer)
        edited = active is not None and bool(active.attention_edits(self.layer))
        if edited:
            if attention_mask is not None:
                raise InterventionError("HeadScope edits diffusers attention without masks only.")
            if record:
                recorder.kind_of[self.layer] = self.kind
            previous = active.recorder
            active.recorder = recorder if record else None
            try:
                out, _ = attention.headscope_attention(self._stub, query, key, value, None, scaling=attn.scale,
                                                    is_causal=False)  # [batch, n_q, head, head_dim]
            finally:
                active.recorder = previous
            if record:
                recorder.flush(self.layer, heads, n_q)
            hidden = out.reshape(batch, n_q, heads * head_dim)
        else:
            hidden = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                    is_causal=False)
            hidden = hidden.transpose(1, 2).reshape(batch, -1, heads * head_dim)
            if record:
                recorder.put(self.layer, self.kind, self.weights(attn, query[0], key[0], attention_mask))
        hidden = hidden.to(query.dtype)
        if active is not None:
            active.query_positions[self.layer] = range(n_q)
            changed = self._output_hook(None, (hidden,))  # scale / add edits and head gates on z
            if changed is not None:
                hidden = changed[0]
        return hidden

    @staticmethod
    def weights(attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """weights  # [head, query, key] float32 of one batch row: softmax(q k^T * scale (+ mask))."""
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attention_mask[0]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        return torch.softmax(scores, dim=-1)

    # ---- diffusers' entry point ------------------------------------------------------------------
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if self.kind == "joint":
            return self._joint(attn, hidden_states, encoder_hidden_states)
        return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _joint(self, attn, hidden_states, encoder_hidden_states):
        """JointAttnProcessor2_0, step for step."""
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
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
        hidden_states = self._attend(attn, query, key, value, None)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _plain(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        """AttnProcessor2_0, step for step."""
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
                                            attn.to_v(encoder_hidden_states))
        hidden_states = self._attend(attn, query, key, value, attention_mask)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def attention_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(path, module, kind) of every diffusers `Attention` module, in depth order."""
    from diffusers.models.attention_processor import Attention

    found = []
    for path, module in transformer.named_modules():
        if not isinstance(module, Attention):
            continue
        if getattr(module, "add_q_proj", None) is not None:
            kind = "joint"
        elif module.is_cross_attention:
            kind = "cross"
        else:
            kind = "self"
        found.append((path, module, kind))
    return found


def install(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Swap in HeadScopeProcessor everywhere; returns the edited (self / joint) attention modules per layer.

    Works for diffusers' SD3 (joint), DiT and PixArt (self + cross) transformers; raises for a model
    with no attention module HeadScope can drive.
    """
    layers: list[torch.nn.Module] = []
    for _path, module, kind in attention_modules(transformer):
        if kind == "cross":
            index = max(0, len(layers) - 1)  # the block's self-attention came just before it
        else:
            index = len(layers)
            layers.append(module)
        module.headscope_layer = index
        module.set_processor(HeadScopeProcessor(index, kind, module.heads))
    if not layers:
        raise ValueError("this transformer has no self- or joint-attention modules HeadScope can drive")
    return layers


def uninstall(transformer: torch.nn.Module) -> None:
    """Back to diffusers' default processors (for comparisons)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    for _path, module, kind in attention_modules(transformer):
        module.set_processor(JointAttnProcessor2_0() if kind == "joint" else AttnProcessor2_0())
