"""What the text probes share: the haystack text as token ids, the causal-LM check, a score table's top
heads, a model with its weights frozen.

assets/haystack.txt is the filler text of the needle prompts (probes.needle), the default ablation
prompt (probes.ablation), the gradient probe's texts (probes.gradient) and the passkey contexts
(probes.duo); it is tokenized once per tokenizer.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from core.errors import InputError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def require_causal_lm(handle: ModelHandle, probe: str) -> None:
    """Raise InputError unless `handle` is a causal language model (every text probe needs one)."""
    if handle.meta.modality != "text" or not handle.meta.causal:
        raise InputError(f"The {probe} probe needs a causal language model; {handle.meta.name} is not one.")


def haystack_ids(tokenizer, n: int, start: int = 0) -> list[int]:
    """n token ids of assets/haystack.txt from token `start` on (the text repeats as needed)."""
    ids = _haystack_tokens(tokenizer)
    out = []
    while len(out) < start + n:
        out += ids
    return out[start : start + n]


_HAYSTACK: dict[int, tuple[int, ...]] = {}


def _haystack_tokens(tokenizer) -> list[int]:
    """assets/haystack.txt as token ids (tokenized once per tokenizer)."""
    if id(tokenizer) not in _HAYSTACK:
        text = (ASSETS / "haystack.txt").read_text(encoding="utf-8")
        _HAYSTACK[id(tokenizer)] = tuple(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(_HAYSTACK[id(tokenizer)])


def top_heads(scores: np.ndarray, k: int = 5) -> list[list]:
    """[[layer, head, score], ...] of the k highest scores  # [layer, head], for a result's summary."""
    order = np.argsort(-scores, axis=None, kind="stable")[:k]
    H = scores.shape[1]
    return [[int(i // H), int(i % H), round(float(scores.flat[i]), 4)] for i in order]


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients for the duration (only the gates are trained / differentiated)."""
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)
