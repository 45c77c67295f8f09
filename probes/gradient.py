"""Gradient importance (Michel et al. 2019): |dL/d gate| of a gate on every head's output."""
from __future__ import annotations

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from capture.engine.session import session
from core.probe_results import GradientParams
from core.progress import Progress
from probes.common import frozen, haystack_ids, require_causal_lm, top_heads


def gradient_probe(handle: ModelHandle, p: GradientParams, put, progress: Progress) -> dict:
    """|dL/d xi_h| with xi a gate (= 1) on every head's output, L the mean next-token loss of a text
    (Michel et al. 2019, eq. 2), over `n_texts` consecutive `n_tokens`-token chunks of assets/haystack.txt.
    Stored signed per text: grads  # [text, layer, head]; analytics takes the mean absolute value.
    Deviation: a few hundred tokens of our own text instead of a task's validation set."""
    require_causal_lm(handle, "gradient")
    meta = handle.meta
    grads = np.zeros((p.n_texts, meta.n_layers, meta.n_heads), dtype=np.float32)
    losses = []
    with frozen(handle.model), torch.enable_grad():
        for t in range(p.n_texts):
            ids = torch.tensor([haystack_ids(handle.tokenizer, p.n_tokens, start=t * p.n_tokens)])
            gates = {l: torch.ones(1, meta.n_heads, requires_grad=True) for l in range(meta.n_layers)}
            with session(head_gates=gates):
                logits = handle.model(input_ids=ids, use_cache=False).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
            loss.backward()
            for l, g in gates.items():
                grads[t, l] = g.grad[0].numpy()
            losses.append(float(loss.detach()))
            progress(0.05 + 0.9 * (t + 1) / p.n_texts, f"text {t + 1}/{p.n_texts}")
    put("grads", grads)
    importance = np.abs(grads).mean(axis=0)
    return {"summary": {"mean_loss": float(np.mean(losses)), "top": top_heads(importance)}}
