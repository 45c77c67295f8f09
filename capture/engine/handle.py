"""A loaded model as HeadScope holds it (`ModelHandle`), and `prepare`, which routes its attention through HeadScope.

`prepare` registers HeadScope's attention function with transformers, tells every self-attention
module its layer index, and puts the head-output pre-hook on every output projection (`o_proj`,
`out_proj`, `c_proj`, `dense`, T5's `o`, or BERT's sibling `output.dense`): the one place head-output
edits, head gates (ablation sweeps, gradient importance) and their recording happen (DESIGN.md,
"Attention capture and interventions: one mechanism").  Attention modules are found by their query
projection, separate (`q_proj`, `query`, T5's `q`) or fused (`c_attn`, `qkv`, `qkv_proj`,
`query_key_value`: GPT-2, Phi-3, GPT-NeoX, Falcon, BLOOM).

A model switches to the "headscope" implementation after loading with the one it accepts (SDPA, or
eager for Gemma 2, GPT-OSS, BLOOM): each attention module keeps that one as `headscope_native`, the
fast path of capture.engine.attention, so a call with nothing to record or edit computes exactly what
the model as loaded computes.  Models whose attention does not go through transformers' attention
interface (Falcon, BLOOM) get their forward from capture.text.families before `prepare`.  The registry
fills in `meta.revision`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import ModelUnavailable
from core.types import ModelMeta

if TYPE_CHECKING:  # torch is imported only when a model is actually loaded: cache hits never need it
    from torch import nn


@dataclass
class ModelHandle:
    """A loaded model, ready for capture."""

    name: str
    model: nn.Module
    tokenizer: object  # vision models: their capture.images.ImagePrep
    meta: ModelMeta
    attention_modules: list[nn.Module]  # the module that computes attention, per layer
    lock: threading.Lock  # one forward at a time per loaded model
    _blocks: list | None = field(default=None, init=False, repr=False)

    def decoder_layers(self) -> list[nn.Module] | None:
        """The block (decoder layer) around each attention module, or None when they cannot be found
        (looked up once: walking the module tree takes ~2 ms)."""
        if self._blocks is None:
            names = {id(m): n for n, m in self.model.named_modules()}
            modules = dict(self.model.named_modules())
            paths = [names.get(id(attn), "") for attn in self.attention_modules]
            blocks = [modules.get(path.rsplit(".", 1)[0]) if "." in path else None for path in paths]
            self._blocks = [] if any(b is None for b in blocks) else blocks
        return self._blocks or None


QUERY_PROJECTIONS = ("q_proj", "query", "c_attn", "qkv", "qkv_proj", "query_key_value")
OUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense")
CROSS_ATTENTION = ("encoder_attn", "EncDecAttention", "crossattention")  # BART / Whisper, T5, GPT-2's cross layer


def attention_layers(model: nn.Module, cross: bool = False) -> list[tuple[nn.Module, nn.Module]]:
    """(attention module, its output projection) for each self-attention layer (cross=True: each
    cross-attention layer), in depth order."""
    from torch import nn

    modules = dict(model.named_modules())
    found = []
    for path, module in modules.items():
        is_cross = getattr(module, "is_cross_attention", False) or path.rsplit(".", 1)[-1] in CROSS_ATTENTION
        if is_cross != cross:
            continue
        t5_style = all(hasattr(module, a) for a in ("q", "k", "v", "o"))
        if not t5_style and not any(hasattr(module, a) for a in QUERY_PROJECTIONS):
            continue
        names = ("o",) if t5_style else OUT_PROJECTIONS
        out = next((getattr(module, a) for a in names if hasattr(module, a)), None)
        if out is None:  # BERT / ViT style: the projection sits in the sibling `output.dense`
            parent = modules.get(path.rsplit(".", 1)[0]) if "." in path else None
            out = getattr(getattr(parent, "output", None), "dense", None)
        if isinstance(out, nn.Module):
            found.append((module, out))
    return found


def native_attention(module: nn.Module):
    """The attention function `module` ran before the switch to "headscope": SDPA, or its family's eager
    function where the model refuses SDPA (Gemma 2's soft-capping, GPT-OSS's sink logits)."""
    import sys

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    return sdpa_attention_forward


def prepare(name: str, model: nn.Module, tokenizer: object, modality: str = "text",
            grid: tuple[int, int] | None = None, layers_of: nn.Module | None = None,
            layers: list[tuple[nn.Module, nn.Module]] | None = None,
            groups: dict[str, tuple[int, int]] | None = None) -> ModelHandle:
    """Route a loaded model's attention through HeadScope and describe it.

    `layers_of`: the submodule whose attention layers HeadScope indexes, edits and records (a VLM's
    language model); attention elsewhere (its vision tower) runs plain SDPA.  `layers` (with `groups`,
    ModelMeta.groups): the layers in HeadScope's order when they are not one model's self-attention
    (an encoder-decoder: capture.text.seq2seq)."""
    from capture.engine import attention
    from capture.engine.head_outputs import scale_head_outputs

    attention.register()
    model.eval()
    if layers is None:
        layers = attention_layers(model if layers_of is None else layers_of)
    if not layers:
        raise ModelUnavailable(f"{name} has no self-attention layers HeadScope can find.")
    for attn, _out in layers:
        if not hasattr(attn, "headscope_native"):  # capture.text.families set their own
            attn.headscope_native = native_attention(attn)  # before the switch: the implementation it was loaded with
    if model._can_set_attn_implementation():  # Falcon and BLOOM: capture.text.families serves their attention
        model.set_attn_implementation(attention.IMPLEMENTATION)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or n_heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        n_kv = 1  # Falcon-7B: one key/value head
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // n_heads
    for index, (attn, out) in enumerate(layers):
        attn.headscope_layer = index
        out.register_forward_pre_hook(scale_head_outputs(index, n_heads))
    meta = ModelMeta(
        name=name,
        family=model.config.model_type if modality == "vlm" else config.model_type,
        modality=modality,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        causal=False if modality == "vision" or groups else bool(getattr(layers[0][0], "is_causal", True)),
        grid=grid,
        groups=groups,
    )
    return ModelHandle(name=name, model=model, tokenizer=tokenizer, meta=meta,
                       attention_modules=[a for a, _ in layers], lock=threading.Lock())
