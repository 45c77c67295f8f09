"""A loaded model as HeadScope holds it (`ModelHandle`), and `prepare`, which routes its attention through HeadScope.

`prepare` registers HeadScope's attention function with transformers, tells every self-attention
module its layer index, and puts the head-output pre-hook on every output projection (`o_proj`,
`out_proj`, `c_proj`, `dense`, or BERT's sibling `output.dense`): the one place head-output edits,
head gates (ablation sweeps, gradient importance) and their recording happen (DESIGN.md, "Attention
capture and interventions: one mechanism").  The registry fills in `meta.revision`.
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


def attention_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention module, its output projection) for each self-attention layer, in depth order."""
    from torch import nn

    modules = dict(model.named_modules())
    found = []
    for path, module in modules.items():
        if getattr(module, "is_cross_attention", False):
            continue
        if not any(hasattr(module, a) for a in ("q_proj", "query", "c_attn", "qkv")):
            continue
        out = next((getattr(module, a) for a in ("o_proj", "out_proj", "c_proj") if hasattr(module, a)), None)
        if out is None:  # BERT / ViT style: the projection sits in the sibling `output.dense`
            parent = modules.get(path.rsplit(".", 1)[0]) if "." in path else None
            out = getattr(getattr(parent, "output", None), "dense", None)
        if isinstance(out, nn.Module):
            found.append((module, out))
    return found


def prepare(name: str, model: nn.Module, tokenizer: object, modality: str = "text",
            grid: tuple[int, int] | None = None, layers_of: nn.Module | None = None) -> ModelHandle:
    """Route a loaded model's attention through HeadScope and describe it.

    `layers_of`: the submodule whose attention layers HeadScope indexes, edits and records (a VLM's
    language model); attention elsewhere (its vision tower) runs plain SDPA."""
    from capture.engine import attention
    from capture.engine.head_outputs import scale_head_outputs

    attention.register()
    model.eval()
    model.set_attn_implementation(attention.IMPLEMENTATION)
    layers = attention_layers(model if layers_of is None else layers_of)
    if not layers:
        raise ModelUnavailable(f"{name} has no self-attention layers HeadScope can find.")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
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
        causal=False if modality == "vision" else bool(getattr(layers[0][0], "is_causal", True)),
        grid=grid,
    )
    return ModelHandle(name=name, model=model, tokenizer=tokenizer, meta=meta,
                       attention_modules=[a for a, _ in layers], lock=threading.Lock())


