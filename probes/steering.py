"""Steering directions for ITI-style head steering (Li et al. 2023, METHODS §6.1), from two small sets
of contrasting prompts typed by the user.

For every prompt, one forward (SDPA fast path, nothing recorded) collects each head's output z (the
o_proj input, METHODS notation) at the prompt's last token.  Per (layer, head):
  theta      = (mean z over the positive set - mean z over the negative set), normalised to unit length
  sigma      = std of every prompt's z projected on theta (ITI's sigma; population std)
  separation = |mean projection difference| / sigma, used to rank heads (ITI ranks by the validation
               accuracy of a logistic probe, which a few prompts cannot estimate)
`capture.text.presets.iti` turns these into `add` edits of value alpha * sigma on direction theta.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from capture.engine.session import session
from core.errors import InterventionError


@dataclass
class SteeringDirections:
    directions: np.ndarray  # [layer, head, head_dim] float32, unit theta (positive minus negative)
    sigma: np.ndarray  # [layer, head] std of the projections on theta
    separation: np.ndarray  # [layer, head] |mean(pos) - mean(neg)| along theta, in units of sigma
    n_positive: int
    n_negative: int


def _prompt_ids(handle: ModelHandle, prompt: str, chat: bool) -> list[int]:
    from capture.text.adapter import TextAdapter
    from core.types import RunSpec

    return TextAdapter(handle).encode(RunSpec(model=handle.name, prompt=prompt, chat=chat))


def last_token_head_outputs(handle: ModelHandle, prompts: list[str], chat: bool = False) -> np.ndarray:
    """z  # [prompt, layer, head, head_dim] float32: each head's output at each prompt's last token."""
    meta = handle.meta
    out = np.zeros((len(prompts), meta.n_layers, meta.n_heads, meta.head_dim), dtype=np.float32)
    for p, prompt in enumerate(prompts):
        ids = torch.tensor([_prompt_ids(handle, prompt, chat)])

        def keep(layer: int, z: torch.Tensor, p=p) -> None:  # z  # [batch, query, head, head_dim]
            out[p, layer] = z[0, -1].float().numpy()

        with handle.lock, session(head_outputs=keep), torch.inference_mode():
            handle.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return out


def steering_directions(handle: ModelHandle, positive: list[str], negative: list[str],
                        chat: bool = False) -> SteeringDirections:
    """Mass-mean steering directions per head from two sets of prompts (see the module docstring)."""
    positive = [p for p in positive if p.strip()]
    negative = [p for p in negative if p.strip()]
    if not positive or not negative:
        raise InterventionError("Steering needs at least one prompt on each side.")
    z = last_token_head_outputs(handle, positive + negative, chat).astype(np.float64)
    pos, neg = z[: len(positive)], z[len(positive):]
    diff = pos.mean(0) - neg.mean(0)  # [layer, head, head_dim]
    norm = np.linalg.norm(diff, axis=-1, keepdims=True)
    theta = np.where(norm > 0, diff / np.maximum(norm, 1e-30), 0.0)
    proj = np.einsum("plhd,lhd->plh", z, theta)  # [prompt, layer, head]
    sigma = proj.std(axis=0)
    gap = np.abs(proj[: len(positive)].mean(0) - proj[len(positive):].mean(0))
    separation = gap / np.maximum(sigma, 1e-12)
    return SteeringDirections(directions=theta.astype(np.float32), sigma=sigma, separation=separation,
                              n_positive=len(positive), n_negative=len(negative))


__all__ = ["SteeringDirections", "last_token_head_outputs", "steering_directions"]
