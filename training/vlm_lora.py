"""What the shapes-vlm trains and saves: LoRA on SmolLM2's projections and LLaVA's projector on
standardised DINOv2 features.

LoRA (Hu et al. 2021): y = W x + (alpha / r) B A x, A Kaiming-uniform and B zero, so training starts
at the base model; the shipped recipe takes rank 8, alpha 16 on q, k, v and o of all 30 layers
(LORA_TARGETS; `--lora-mlp` adds MLP_TARGETS).  The projector is trained on standardised features
(`standardising`: per-dimension mean and std of the training features); `trained_state` folds the
standardisation into its first linear layer and the LoRA scale into B, so the saved part is LLaVA's
projector reading raw features plus plain LoRA pairs (capture.vlm.model.merge_trained reads them).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoraLinear(nn.Module):
    """y = W x + scale * B (A x); A Kaiming-uniform, B zero (the start is the base model)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def add_lora(model, rank: int, alpha: float, targets=LORA_TARGETS) -> dict[str, LoraLinear]:
    """Wrap the language model's projections named in `targets` ("self_attn.q_proj", "mlp.up_proj", ...)
    in every layer; returns {parameter prefix: wrapper}."""
    out = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for name in targets:
            owner_name, attr = name.split(".")
            owner = getattr(layer, owner_name)
            wrapped = LoraLinear(getattr(owner, attr), rank, alpha)
            setattr(owner, attr, wrapped)
            out[f"model.language_model.layers.{i}.{name}"] = wrapped
    return out


def trained_state(model, loras: dict[str, LoraLinear], norm: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """What is saved (fp16): the projector's weights and each LoRA pair, B scaled.  `norm` = (mean, std)
    of the features the projector was trained on, folded into linear_1 (so the saved projector reads
    raw DINOv2 features, as LLaVA's does): W x' + b with x' = (x - m) / s is (W / s) x + b - W (m / s)."""
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()
             if k.startswith("model.multi_modal_projector.")}
    if norm is not None:
        mean, std = norm
        w = state["model.multi_modal_projector.linear_1.weight"]
        state["model.multi_modal_projector.linear_1.bias"] = state["model.multi_modal_projector.linear_1.bias"] - w @ (mean / std)
        state["model.multi_modal_projector.linear_1.weight"] = w / std
    state = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    for prefix, w in loras.items():
        state[prefix + ".lora_A"] = w.lora_A.detach().to(torch.float16).contiguous()
        state[prefix + ".lora_B"] = (w.lora_B.detach() * w.scale).to(torch.float16).contiguous()
    return state


@contextlib.contextmanager
def standardising(projector: nn.Module, norm: tuple[torch.Tensor, torch.Tensor] | None):
    """Inside this block the projector standardises the raw DINOv2 features it is given (the training
    step, LLaVA's get_image_features in the held-out evaluation), as the saved projector does with the
    standardisation folded into its first layer (trained_state)."""
    if norm is None:
        yield
        return
    mean, std = norm
    handle = projector.register_forward_pre_hook(lambda _, args: ((args[0] - mean.to(args[0].device)) / std.to(args[0].device),))
    try:
        yield
    finally:
        handle.remove()
