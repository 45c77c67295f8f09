"""The runs activation patching is made of (probes.patching, probes.path_patching): the prompt pair, the
answer metric at the last position, one run's head outputs, and batches that share their unpatched prefix.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from capture.engine.handle import ModelHandle
from capture.engine.hooks import hidden_arg, removing, with_hidden
from capture.engine.session import session
from core.errors import InputError
from core.probe_results import PatchingParams
from probes.dla import one_token

METRICS = ("logit_diff", "prob")
ROWS_BUDGET = 8192  # batch rows x tokens per patched forward: bounds the activations of one batch


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
def head_outputs(handle: ModelHandle, ids: list[int], answer: Answer) -> tuple[list[torch.Tensor], float]:
    """One plain forward: every layer's head outputs z  # [1, token, head, head_dim] and the metric."""
    z: list = [None] * handle.meta.n_layers

    def take(layer: int, heads: torch.Tensor) -> None:
        z[layer] = heads.clone()

    with session(head_outputs=take):
        value = float(answer.score(last_logits(handle, torch.tensor([ids])))[0])
    return z, value


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
