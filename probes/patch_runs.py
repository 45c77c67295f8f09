"""The runs activation patching is made of (probes.patching, path_patching, vlm_patching, vit_patching): the
prompt pair, the answer metric, one run's head outputs, batches that share their unpatched prefix, and the
sweep that patches every head alone, B heads per forward, whatever the model reads (`Logits`: a function of
the batch width giving the logits the metric scores, one per row).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from analytics.attribution import patching_effect
from capture.engine.handle import ModelHandle
from capture.engine.hooks import hidden_arg, removing, with_hidden
from capture.engine.session import session
from core.errors import InputError
from core.probe_results import PatchingParams
from core.progress import Progress
from probes.common import top_heads
from probes.dla import one_token

METRICS = ("logit_diff", "prob")
ROWS_BUDGET = 8192  # batch rows x tokens per patched forward: bounds the activations of one batch
DIRECTIONS = ("denoise", "noise")  # source -> destination: clean into corrupted, or corrupted into clean
Logits = Callable[[int], torch.Tensor]  # batch width -> the logits the metric scores  # [batch, vocab or class]


@dataclass(frozen=True)
class Answer:
    """The metric at the last position: logit(target) - logit(foil), or p(target)."""

    target: int
    foil: int | None
    metric: str

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """logits  # [batch, vocab] at the last position -> the metric  # [batch] float64."""
        logits = logits.double()
        if self.metric == "prob":
            return torch.softmax(logits, dim=-1)[:, self.target]
        return logits[:, self.target] - logits[:, self.foil]


def prompt_pair(tokenizer, clean: str, corrupted: str) -> tuple[list[int], list[int]]:
    """Token ids of the two prompts (as a capture tokenizes them); one sentence unless they are usable."""
    a = [int(i) for i in tokenizer(clean)["input_ids"]]
    b = [int(i) for i in tokenizer(corrupted)["input_ids"]]
    if not a or not b:
        raise InputError("Patching needs two non-empty prompts, a clean one and a corrupted one.")
    if len(a) != len(b):
        raise InputError(f"The clean prompt is {len(a)} tokens and the corrupted one {len(b)}; patching needs the same "
                         "number of tokens in both (swap words for words of as many tokens).")
    if a == b:
        raise InputError("The clean and corrupted prompts are the same tokens; change a word of the corrupted one.")
    return a, b


def answer_of(tokenizer, p: PatchingParams) -> Answer:
    if p.metric not in METRICS:
        raise InputError(f"Unknown patching metric {p.metric!r}; use logit_diff or prob.")
    target = one_token(tokenizer, p.target, "target")
    if p.metric == "prob":
        return Answer(target, None, "prob")
    if not p.foil:
        raise InputError("A logit difference needs a foil token as well as the target (or use the metric prob).")
    foil = one_token(tokenizer, p.foil, "foil")
    if foil == target:
        raise InputError("The target and the foil are the same token; their logit difference is always 0.")
    return Answer(target, foil, "logit_diff")


def last_logits(handle: ModelHandle, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits at the last position  # [batch, vocab]."""
    return handle.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def recorded_heads(handle: ModelHandle, logits: Logits, answer: Answer) -> tuple[list[torch.Tensor], float]:
    """One plain forward: every layer's head outputs z  # [1, token, head, head_dim] and the metric."""
    z: list = [None] * handle.meta.n_layers

    def take(layer: int, heads: torch.Tensor) -> None:
        z[layer] = heads.clone()

    with session(head_outputs=take):
        value = float(answer.score(logits(1))[0])
    return z, value


def metric(logits: Logits, answer: Answer, patches: dict | None = None) -> float:
    """The metric of one forward with `patches` (the session's head_patches) active."""
    with torch.inference_mode(), session(head_patches=patches or {}):
        return float(answer.score(logits(1))[0])


def head_outputs(handle: ModelHandle, ids: list[int], answer: Answer) -> tuple[list[torch.Tensor], float]:
    """A prompt's head outputs z  # [1, token, head, head_dim] and the metric at its last position."""
    return recorded_heads(handle, lambda rows: last_logits(handle, torch.tensor([ids] * rows)), answer)


def patch_each_head(handle: ModelHandle, z_source: list[torch.Tensor], dest: Logits, answer: Answer,
                    heads_list: list[tuple[int, int]], batch_size: int, progress: Progress) -> np.ndarray:
    """The destination run's metric with each head of `heads_list` patched alone  # [layer, head] (NaN where
    not patched): head (l, h)'s output z from `z_source[l]`, one head per batch row, `batch_size` rows per
    forward, the rows widened at the first patched layer of their batch (`widened`)."""
    meta = handle.meta
    patched = np.full((meta.n_layers, meta.n_heads), np.nan)
    heads_list = sorted(heads_list)
    for start in range(0, len(heads_list), batch_size):
        batch = heads_list[start : start + batch_size]
        B = len(batch)
        patches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for b, (l, h) in enumerate(batch):
            if l not in patches:
                patches[l] = (torch.zeros(B, meta.n_heads, dtype=torch.bool), z_source[l])
            patches[l][0][b, h] = True  # row b takes head (l, h) from the source run
        with widened(handle, batch[0][0], B, lambda: session(head_patches=patches)) as blocks:
            values = answer.score(dest(1 if blocks is not None else B))  # [B]
        for b, (l, h) in enumerate(batch):
            patched[l, h] = float(values[b])
        progress(0.1 + 0.88 * (start + B) / len(heads_list), f"patched {start + B}/{len(heads_list)} heads")
    return patched


def heads_to_patch(meta, layers: list[int], direction: str) -> list[tuple[int, int]]:
    """Every head of `layers` (all layers when empty), after checking the direction and the layers."""
    if direction not in DIRECTIONS:
        raise InputError(f"Unknown patching direction {direction!r}; use denoise or noise.")
    if any(not 0 <= l < meta.n_layers for l in layers):
        raise InputError(f"Patched layers must lie in 0..{meta.n_layers - 1}.")
    return [(l, h) for l in (sorted(set(layers)) or range(meta.n_layers)) for h in range(meta.n_heads)]


@contextlib.contextmanager
def widened(handle: ModelHandle, layer: int, rows: int, open_session: Callable) -> Iterator[torch.Tensor | None]:
    """Run the model's next forward at width 1 up to block `layer`, then as `rows` batch rows under
    `open_session()` (rows that differ only from there share the prefix's compute).  Yields None when
    the blocks cannot be found: then the caller passes `rows` copies of the input, all under the session."""
    blocks = handle.decoder_layers()
    opened: list = []
    hooks = []
    if blocks is not None:
        def widen(_module, args, kwargs):
            opened.append(open_session())
            opened[-1].__enter__()  # the session starts where the rows start to differ
            x = hidden_arg(args, kwargs)
            return with_hidden(args, kwargs, x.expand(rows, *x.shape[1:]).contiguous())
        hooks.append(blocks[layer].register_forward_pre_hook(widen, with_kwargs=True))
    else:
        opened.append(open_session())
        opened[-1].__enter__()
    try:
        with removing(hooks), torch.inference_mode():
            yield blocks
    finally:
        for cm in reversed(opened):
            cm.__exit__(None, None, None)


def batch_rows(n_tokens: int, n_heads: int) -> int:
    """Heads per patched forward: every head of a few layers, within ROWS_BUDGET rows x tokens."""
    return max(1, min(10 * n_heads, ROWS_BUDGET // max(1, n_tokens)))


def patching_summary(patched: np.ndarray, source_value: float, dest_value: float, p) -> dict:
    """A sweep's summary: the clean and corrupted metrics (source and destination, by `p.direction`), the
    metric, the direction and the heads of largest effect."""
    clean, corrupted = (source_value, dest_value) if p.direction == "denoise" else (dest_value, source_value)
    effect = patching_effect(patched, clean, corrupted, p.direction)  # [layer, head]
    return {"clean": clean, "corrupted": corrupted, "metric": p.metric, "direction": p.direction,
            "top": top_heads(np.nan_to_num(effect, nan=-np.inf))}
