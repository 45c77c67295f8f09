"""The residual stream of one capture (VAR massive activations): the input of every decoder layer.

`hidden_probe` runs one forward over a capture's tokens and stores each layer's input x^l as it
arrives; analytics.HiddenStates reads them layer by layer (`probes.runner.hidden_states` is the
cached entry point).
"""
from __future__ import annotations

import torch

from cache.store import Store
from capture.engine.handle import ModelHandle
from capture.engine.hooks import hidden_arg, removing
from core.errors import InputError
from core.probe_results import HiddenParams
from core.progress import Progress


def hidden_probe(handle: ModelHandle, p: HiddenParams, put, progress: Progress,
                 store: Store | None = None) -> dict:
    """One forward over a capture's tokens; the input of every decoder layer, x^l  # [token, dim] fp16,
    is stored as X000... as soon as that layer starts (never all layers in memory at once)."""
    from capture.api import load_capture

    capture = load_capture(p.capture, store)
    if capture is None:
        raise InputError(f"No capture with key {p.capture} in the cache; `python -m headscope ls` lists them.")
    blocks = handle.decoder_layers()
    if blocks is None:
        raise InputError(f"HeadScope cannot find the decoder layers of {handle.meta.name} to read its residual stream.")
    ids = capture.output.token_ids
    dim = [0]

    def hook(index: int):
        def pre(_module, args, kwargs):
            x = hidden_arg(args, kwargs)[0]  # [token, dim]
            dim[0] = x.shape[-1]
            put(f"X{index:03d}", x.detach().to(torch.float16).numpy())
            progress(0.05 + 0.9 * (index + 1) / len(blocks), f"layer {index + 1}/{len(blocks)}")
        return pre

    with removing([b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]):
        with torch.inference_mode():
            if handle.meta.causal:
                handle.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
            else:
                handle.model(input_ids=torch.tensor([ids]))
    return {"n_layers": len(blocks), "n_tokens": len(ids), "dim": int(dim[0]), "capture": p.capture,
            "summary": {}}
