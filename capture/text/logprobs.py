"""Teacher-forced log-probabilities of a fixed continuation, with or without an intervention.

The Intervene page scores the baseline's continuation under both runs: one full forward over
prompt + continuation (SDPA where no attention-level edit is active), with spans "prompt" and
"response" set as during generation, so position sets and sink detection resolve the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from capture.engine.session import session
from core.errors import InterventionError
from core.interventions import Intervention


@dataclass
class TeacherForced:
    logprobs: np.ndarray  # [continuation] natural-log probability of each continuation token
    top_ids: np.ndarray  # [continuation] the model's own argmax at each step


def continuation_logprobs(handle: ModelHandle, token_ids: list[int], n_prompt: int,
                          intervention: Intervention = Intervention()) -> TeacherForced:
    """Log-prob of token_ids[n_prompt:] given everything before it, under `intervention`."""
    n_cont = len(token_ids) - n_prompt
    if n_prompt < 1 or n_cont < 1:
        raise InterventionError("Scoring needs a non-empty prompt and a non-empty continuation.")
    meta = handle.meta
    if not meta.causal:
        raise InterventionError(f"{meta.name} is not a causal language model; it has no continuation to score.")
    intervention.validate(meta.n_layers, meta.n_heads, meta.head_dim)
    ids = torch.tensor([token_ids], device=handle.model.device)
    spans = {"prompt": range(n_prompt), "response": range(n_prompt, len(token_ids))}
    with handle.lock, session(intervention, spans=spans), torch.inference_mode():
        logits = handle.model(input_ids=ids, use_cache=False, logits_to_keep=n_cont + 1).logits[0, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [continuation, vocab]
    target = ids[0, n_prompt:]
    return TeacherForced(logprobs=logprobs.gather(1, target[:, None])[:, 0].cpu().numpy(),
                         top_ids=logprobs.argmax(-1).cpu().numpy())


__all__ = ["TeacherForced", "continuation_logprobs"]
