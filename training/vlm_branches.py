"""Branched sequences: many single-question prompts over one shared image prefix, in one forward.

Used by the shapes-vlm's training (training/shapes_vlm.py) and its held-out evaluation
(training/eval_vlm.py).  One sequence per scene holds the shared prefix (system prompt,
"<|im_start|>user\\n", 64 image tokens) once, then one branch per question:
"\\n{question}<|im_end|>\\n<|im_start|>assistant\\n" + answer + "<|im_end|>".  A 4-D attention mask
lets each branch see the prefix and itself only, and its position ids continue from the prefix, so
every branch is exactly the single-question prompt the model answers at inference
(tests/models/test_vlm_model.py checks the logits against the plain forward).  The LM head is applied at the
answer targets only (each answer token and the closing <|im_end|>, predicted from the position before
it), plus, when training asks for them, at dense image-token targets (training.vlm_data); `exact`
reads greedy exact answers off those logits: a question is right when every target is the argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from capture.vlm import model as vlm_model
from core import scenes


@dataclass
class Branch:
    ids: list[int]  # the tokens after the prefix: question part + answer + <|im_end|>
    n_prompt: int  # how many of `ids` belong to the prompt (the rest are targets)
    kind: str
    answer: str


class BranchMaker:
    """Token ids of the shared prefix and of each (question, answer) branch, cached per pair."""

    def __init__(self, processor: vlm_model.VlmProcessor):
        self.processor = processor
        self.end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = processor.token_ids(processor.prompt("what colour is the circle?"))
        last = max(i for i, t in enumerate(ids) if t == processor.image_token_id)
        self.prefix = ids[: last + 1]
        self.image_start = self.prefix.index(processor.image_token_id)
        self._cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def branch(self, qa: scenes.QA) -> Branch:
        key = (qa.question, qa.answer)
        if key not in self._cache:
            ids = self.processor.token_ids(self.processor.prompt(qa.question))
            if ids[: len(self.prefix)] != self.prefix:
                raise ValueError(f"the prompt of {qa.question!r} does not start with the shared prefix")
            prompt = ids[len(self.prefix):]
            target = self.processor.token_ids(qa.answer) + [self.end]
            self._cache[key] = (prompt + target, len(prompt))
        ids, n_prompt = self._cache[key]
        return Branch(ids, n_prompt, scenes.kind_of(qa), qa.answer)


@dataclass
class Packed:
    ids: torch.Tensor  # [B, L] long
    mask: torch.Tensor  # [B, 1, L, L] bool (True: may attend)
    positions: torch.Tensor  # [B, L] long
    rows: torch.Tensor  # [N] batch row of each target
    cols: torch.Tensor  # [N] sequence index whose logits predict the target
    targets: torch.Tensor  # [N] target token ids
    question: torch.Tensor  # [N] which question (over the batch) each target belongs to
    kinds: list[str]  # per question
    answers: list[str]  # per question
    dense_rows: torch.Tensor | None = None  # [M] batch row of each dense (image token) target
    dense_cols: torch.Tensor | None = None  # [M] sequence index of the image token
    dense_targets: torch.Tensor | None = None  # [M] colour word (or the background word) token ids

    def to(self, device: torch.device | str) -> "Packed":
        """The same batch with every tensor on `device` (a GPU when training there)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Packed(**moved)


def pack(maker: BranchMaker, per_scene: list[list[Branch]],
         dense: list[list[tuple[int, int]]] | None = None) -> Packed:
    """One sequence per scene: prefix, then its branches; padded to the longest.  `dense[r]` lists
    (image token index, target id) pairs of scene r, predicted from the image token's own position."""
    p = len(maker.prefix)
    lengths = [p + sum(len(b.ids) for b in branches) for branches in per_scene]
    n, length = len(per_scene), max(lengths)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, 1, length, length, dtype=torch.bool)
    positions = torch.zeros(n, length, dtype=torch.long)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    rows, cols, targets, question, kinds, answers = [], [], [], [], [], []
    for r, branches in enumerate(per_scene):
        ids[r, :p] = torch.tensor(maker.prefix)
        mask[r, 0, :p, :p] = causal[:p, :p]
        positions[r, :p] = torch.arange(p)
        start = p
        for b in branches:
            m = len(b.ids)
            ids[r, start:start + m] = torch.tensor(b.ids)
            mask[r, 0, start:start + m, :p] = True
            mask[r, 0, start:start + m, start:start + m] = causal[:m, :m]
            positions[r, start:start + m] = torch.arange(p, p + m)
            q = len(kinds)
            for j in range(b.n_prompt, m):  # logits at j - 1 predict token j
                rows.append(r)
                cols.append(start + j - 1)
                targets.append(b.ids[j])
                question.append(q)
            kinds.append(b.kind)
            answers.append(b.answer)
            start += m
        for i in range(start, length):  # padding rows see themselves only (no empty softmax rows)
            mask[r, 0, i, i] = True
            positions[r, i] = i
    packed = Packed(ids, mask, positions, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets),
                    torch.tensor(question), kinds, answers)
    if dense:
        pairs = [(r, maker.image_start + i, t) for r, items in enumerate(dense) for i, t in items]
        packed.dense_rows, packed.dense_cols, packed.dense_targets = (torch.tensor(v) for v in zip(*pairs))
    return packed


def branched_logits(model, packed: Packed, image_embeds: torch.Tensor, image_start: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits  # [N, vocab] at the answer targets, dense  # [M, vocab] at the dense image-token targets
    or None); image_embeds  # [B, 64, hidden] (projected)."""
    lm = model.model.language_model
    embeds = lm.embed_tokens(packed.ids)
    n_img = image_embeds.shape[1]
    embeds = torch.cat([embeds[:, :image_start], image_embeds.to(embeds.dtype), embeds[:, image_start + n_img:]], 1)
    hidden = lm(inputs_embeds=embeds, attention_mask=packed.mask, position_ids=packed.positions).last_hidden_state
    dense = None if packed.dense_rows is None else model.lm_head(hidden[packed.dense_rows, packed.dense_cols])
    return model.lm_head(hidden[packed.rows, packed.cols]), dense


def exact(logits: torch.Tensor, packed: Packed) -> np.ndarray:
    """[question] bool: greedy decoding reproduces the answer (every target token is the argmax)."""
    hit = (logits.argmax(-1) == packed.targets).cpu().numpy()
    q = packed.question.cpu().numpy()
    ok = np.ones(len(packed.kinds), dtype=bool)
    np.logical_and.at(ok, q, hit)
    return ok
