"""Multi-pass probes for vision captures (they need the model; results are stored with the capture).

Each probe takes a vision `Capture`, reruns its image through the model (with the capture's
intervention active) and stores its result beside the capture's maps, so analytics/vision.py reads
it without torch and it is evicted with the capture:

- `token_norms`  -> "vit_token_norms"  [layer+1, token]: L2 norm of every hidden state
  (transformers' hidden_states: index 0 the embeddings, l the output of block l-1), for the
  high-norm artifact tokens of Darcet et al. 2024.  Read from `output_hidden_states` in a plain
  forward, never from the attention function.
- `ablation`     -> "vit_ablation"  [3, layer, head], each head's output zeroed alone (METHODS §3.2,
  the pruning importance of Michel et al. 2019), batched: one forward per `batch` heads, each batch
  row ablating a different head through the per-row `head_gates` of capture.engine.session:
    [0] 1 - cos(CLS embedding ablated, CLS embedding) (SigLIP, which has no CLS: the mean patch),
    [1] mean over patches of 1 - cos(patch feature ablated, patch feature),
    [2] classifiers: p(c*) - p_ablated(c*), c* the predicted class (NaN for plain encoders).
  Features are the model's last_hidden_state (classifiers: the last block's output).
- `grad_gate`    -> "vit_grad_gate"  [layer, head]: |dL/dξ_h| at ξ = 1 for a gate ξ on each head's
  output (Michel et al.); L = -log p(c*) for classifiers and, for encoders (no labels), the CLS
  embedding's projection on its own unablated direction, <cls(ξ), ĉ>, whose first-order change
  when ξ_h -> 0 estimates how much removing head h moves the CLS embedding.
"""
from __future__ import annotations

import numpy as np
import torch

from capture import registry
from capture.engine.handle import ModelHandle
from capture.engine.session import session
from capture.vision.adapter import VisionAdapter
from core.types import Capture

TOKEN_NORMS = "vit_token_norms"
ABLATION = "vit_ablation"
GRAD_GATE = "vit_grad_gate"


def _setup(capture: Capture) -> tuple[ModelHandle, VisionAdapter, dict]:
    if capture.meta.modality != "vision":
        raise ValueError(f"{capture.meta.name} is not a vision model; these probes need one.")
    handle = registry.load(capture.spec.model)
    adapter = VisionAdapter(handle)
    pixels, _ = adapter.encode(capture.spec)
    return handle, adapter, adapter.forward_kwargs(pixels)


def _stored(capture: Capture, name: str) -> np.ndarray | None:
    if capture.store is None:
        return None
    try:
        return np.asarray(capture.store.get_array(capture.key, name))
    except Exception:  # noqa: BLE001 - absent or unreadable: recompute
        return None


def _keep(capture: Capture, name: str, value: np.ndarray) -> np.ndarray:
    if capture.store is not None:
        capture.store.put_array(capture.key, name, value)
    return value


def token_norms(capture: Capture, refresh: bool = False) -> np.ndarray:
    """norms  # [layer+1, token] float32, the L2 norm of each token's hidden state after each block."""
    found = None if refresh else _stored(capture, TOKEN_NORMS)
    if found is not None:
        return found
    handle, _, kwargs = _setup(capture)
    with handle.lock, session(capture.spec.intervention, spans=capture.spans), torch.inference_mode():
        out = handle.model(**kwargs, output_hidden_states=True)
    norms = torch.stack([h[0].float().norm(dim=-1) for h in out.hidden_states]).numpy()
    return _keep(capture, TOKEN_NORMS, norms.astype(np.float32))


def _features(adapter: VisionAdapter, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(cls  # [batch, dim], patches  # [batch, patch, dim], probs  # [batch, class] or None)."""
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1]
    patches = hidden[:, adapter.n_prefix:]
    cls = hidden[:, 0] if adapter.n_prefix else patches.mean(1)
    probs = torch.softmax(out.logits.float(), -1) if adapter.classifier and hasattr(out, "logits") else None
    return cls.float(), patches.float(), probs


def _call(handle, adapter: VisionAdapter, kwargs: dict, batch: int, gates: dict, capture: Capture):
    inputs = dict(kwargs, pixel_values=kwargs["pixel_values"].expand(batch, -1, -1, -1))
    with session(capture.spec.intervention, spans=capture.spans, head_gates=gates):
        return handle.model(**inputs, output_hidden_states=adapter.classifier)


def ablation(capture: Capture, batch: int = 12, refresh: bool = False, progress=None,
             heads: list[tuple[int, int]] | None = None) -> np.ndarray:
    """result  # [3, layer, head]: CLS change, patch change, predicted-class probability drop.

    `heads` limits the sweep to some (layer, head) pairs (the rest stay NaN; nothing is stored).
    """
    found = None if refresh or heads is not None else _stored(capture, ABLATION)
    if found is not None:
        return found
    handle, adapter, kwargs = _setup(capture)
    n_layers, n_heads = handle.meta.n_layers, handle.meta.n_heads
    partial = heads is not None
    heads = list(heads) if partial else [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    result = np.full((3, n_layers, n_heads), np.nan, dtype=np.float32)
    with handle.lock, torch.inference_mode():
        cls0, patches0, probs0 = _features(adapter, _call(handle, adapter, kwargs, 1, {}, capture))
        target = int(probs0[0].argmax()) if probs0 is not None else None
        for start in range(0, len(heads), batch):
            chunk = heads[start : start + batch]
            gates = {}
            for row, (layer, head) in enumerate(chunk):
                gates.setdefault(layer, torch.ones(len(chunk), n_heads))[row, head] = 0.0
            cls, patches, probs = _features(adapter, _call(handle, adapter, kwargs, len(chunk), gates, capture))
            cls_change = 1 - torch.nn.functional.cosine_similarity(cls, cls0, dim=-1)  # [rows]
            patch_change = (1 - torch.nn.functional.cosine_similarity(patches, patches0, dim=-1)).mean(-1)
            for row, (layer, head) in enumerate(chunk):
                result[0, layer, head] = cls_change[row]
                result[1, layer, head] = patch_change[row]
                if probs is not None:
                    result[2, layer, head] = probs0[0, target] - probs[row, target]
            if progress is not None:
                progress(min(1.0, (start + len(chunk)) / len(heads)), f"ablated {start + len(chunk)}/{len(heads)} heads")
    return result if partial else _keep(capture, ABLATION, result)


def grad_gate(capture: Capture, refresh: bool = False) -> np.ndarray:
    """importance  # [layer, head] = |dL/dξ| at ξ = 1 (Michel et al. 2019); see the module docstring for L."""
    found = None if refresh else _stored(capture, GRAD_GATE)
    if found is not None:
        return found
    handle, adapter, kwargs = _setup(capture)
    n_layers, n_heads = handle.meta.n_layers, handle.meta.n_heads
    with handle.lock:
        with torch.inference_mode():
            cls0, _, probs0 = _features(adapter, _call(handle, adapter, kwargs, 1, {}, capture))
        gates = {layer: torch.ones(1, n_heads, requires_grad=True) for layer in range(n_layers)}
        with torch.enable_grad():
            cls, _, probs = _features(adapter, _call(handle, adapter, kwargs, 1, gates, capture))
            if probs is not None:
                loss = -torch.log(probs[0, int(probs0[0].argmax())])
            else:
                direction = (cls0[0] / cls0[0].norm()).clone()
                loss = cls[0] @ direction
            grads = torch.autograd.grad(loss, [gates[layer] for layer in range(n_layers)])
    importance = torch.cat(grads).abs().numpy().astype(np.float32)  # [layer, head]
    return _keep(capture, GRAD_GATE, importance)
