"""Retrieval heads from needle-in-a-haystack decoding: copy-paste (Wu et al. 2024) and semantic
(CompressKV) scores, and the ROUGE-1 recall that decides which tests count.

Input per test (built by `probes.needle.needle_probe`): the last attention row of every decode step
(the row of the query that emitted y_t), the emitted ids y_t, the prompt ids and the needle span [s, e).

- Retrieval score (Wu et al. 2024, `retrieval_calculate`, METHODS.md §1.1): at step t each head takes
  j* = argmax_j A[last, j] (top-1); if s <= j* < e and prompt[j*] == y_t it gains 1 / (e - s).  A test
  counts only if ROUGE-1 recall of the answer against the real needle answer > 0.5; the head's score is
  the mean over the counted tests.  Retrieval heads: score > 0.1.
- Semantic retrieval score (CompressKV, `semantic_retrieval_head_detection.py`, METHODS.md §1.2):
  whenever y_t equals any needle token, the head gains its total attention mass on the needle span,
  sum_{j in [s, e)} A[last, j], once per matching needle position; no argmax condition.  We normalise by
  (e - s) like the copy-paste score so the two share a scale (in [0, 1] when every step copies a
  distinct needle token) and average over counted tests the same way.
- ROUGE-1 recall (Lin 2004, as `rouge_score.rouge_scorer` computes it): unigram overlap of lowercase
  alphanumeric tokens over the number of reference tokens.  Wu et al. run `rouge_score` with the Porter
  stemmer; ours does not stem (no extra dependency), which only matters for inflected answers.

Pure numpy; per-layer functions take one layer's rows so a caller can stream layers.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

RETRIEVAL_THRESHOLD = 0.1  # Wu et al.: a retrieval head scores > 0.1
ROUGE_THRESHOLD = 0.5  # a test counts if ROUGE-1 recall > 50 (on the 0-100 scale)

_WORD = re.compile(r"[a-z0-9]+")


def rouge1_recall(reference: str, candidate: str) -> float:
    """ROUGE-1 recall of `candidate` against `reference`: matched unigrams / reference unigrams."""
    ref = Counter(_WORD.findall(reference.lower()))
    if not ref:
        return 0.0
    cand = Counter(_WORD.findall(candidate.lower()))
    overlap = sum(min(c, cand[w]) for w, c in ref.items())
    return overlap / sum(ref.values())


def step_reductions(last_rows: np.ndarray, span: range) -> tuple[np.ndarray, np.ndarray]:
    """From one layer's decode-step rows, last_rows  # [head, step, key], the two things the scores
    need: (argmax  # [head, step] top-1 key, span_mass  # [head, step] attention mass on the needle)."""
    rows = np.asarray(last_rows, dtype=np.float32)
    return rows.argmax(axis=-1).astype(np.int32), rows[..., span.start : span.stop].sum(axis=-1)


def copy_score(argmax: np.ndarray, emitted: Sequence[int], token_ids: Sequence[int], span: range) -> np.ndarray:
    """Wu et al.'s retrieval score of one test: argmax  # [..., step] top-1 keys, emitted  # [step] the
    ids y_t, token_ids the sequence the keys index.  Returns [...] (e.g. [layer, head])."""
    am = np.asarray(argmax)
    ids = np.asarray(token_ids)
    y = np.asarray(emitted)
    in_span = (am >= span.start) & (am < span.stop)
    copied = ids[np.clip(am, 0, len(ids) - 1)] == y  # broadcasts over the step axis
    return (in_span & copied).sum(axis=-1) / max(1, len(span))


def semantic_score(span_mass: np.ndarray, emitted: Sequence[int], token_ids: Sequence[int], span: range) -> np.ndarray:
    """CompressKV's semantic retrieval score of one test: span_mass  # [..., step]; a step adds its mass
    once per needle position whose token equals y_t.  Normalised by (e - s).  Returns [...]."""
    needle = np.asarray(token_ids)[span.start : span.stop]
    matches = np.array([int((needle == y).sum()) for y in emitted], dtype=np.float64)  # [step]
    return (np.asarray(span_mass, dtype=np.float64) * matches).sum(axis=-1) / max(1, len(span))


@dataclass(frozen=True)
class NeedleTest:
    """One needle-in-a-haystack test as the probe stores it."""

    length: int
    depth: float
    needle: int
    answer: str
    expected: str
    recall: float  # ROUGE-1 recall of `answer` against `expected`
    span: range
    n_steps: int

    @property
    def counted(self) -> bool:
        return self.recall > ROUGE_THRESHOLD


def mean_over_counted(per_test: np.ndarray, counted: Sequence[bool]) -> np.ndarray:
    """per_test  # [test, layer, head] -> [layer, head]: the mean over counted tests (zeros if none)."""
    per_test = np.asarray(per_test, dtype=np.float64)
    mask = np.asarray(counted, dtype=bool)
    if not mask.any():
        return np.zeros(per_test.shape[1:], dtype=np.float32)
    return per_test[mask].mean(axis=0).astype(np.float32)


def retrieval_heads(scores: np.ndarray, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int]]:
    """(layer, head) of the heads scoring above the threshold (0.1), highest first."""
    s = np.asarray(scores)
    order = np.argsort(-s, axis=None, kind="stable")
    return [(int(i // s.shape[1]), int(i % s.shape[1])) for i in order if s.flat[i] > threshold]


__all__ = ["NeedleTest", "RETRIEVAL_THRESHOLD", "ROUGE_THRESHOLD", "copy_score", "mean_over_counted",
           "retrieval_heads", "rouge1_recall", "semantic_score", "step_reductions"]
