"""Pattern detectors on the repeated-random-token probe: previous-token, duplicate-token, induction, echo.

The probe (RazorAttention, METHODS.md §1.4; built by `probes.patterns.pattern_probe`): a first token
(BOS where the tokenizer has one) followed by P random token ids, repeated R times, one causal forward.
Positions: the first token sits at 0 (`offset` = 1), copy r of period token k at offset + r*P + k.
Razor's defaults are P = 2500 ids drawn from [10000, 12500) and R = 4; HeadScope's probe is shortened
(P = 64, R = 3) to run in well under a second on a CPU, with a real causal mask (Razor's vendor code
multiplies the mask by -1e-5, which leaves the future visible: not copied).

For a query i in copy r >= 1, E(i) = {j : offset <= j < i, j = i (mod P)} are its earlier copies.

- echo (Razor): mean over those queries of sum_{j in E(i)} A_ij.  Razor sums A_ij * 1[j in E(i)] over
  (i, j) and divides by T^2; ours divides by the number of queries instead, which puts the score in
  [0, 1] (1 = a perfect echo head) and ranks heads identically.
- induction (Razor; Olsson et al. 2022): the same with E(i) + 1, the token that followed each earlier
  copy.
- previous-token (Voita et al. 2019; Olsson et al. 2022): mean over rows i >= offset + 1 of A_{i,i-1}
  (rows whose previous token is the BOS are left out: the sink would inflate them).
- duplicate-token (Wang et al. 2022, IOI; TransformerLens' token-equality pattern): mean over every row
  with an earlier identical token *id* of the mass on all earlier identical tokens.  On the repeat probe
  this agrees with echo except where the random ids repeat inside one period; it is defined by ids, so
  `token_match_scores` applies to any text.
- GQA (METHODS.md §1.4, §10.2): Razor selects per KV head by the max over its query heads
  (`group_max`); its default selection is the top 1 % of KV heads by echo plus the top 14 % by
  induction (`razor_heads`).

Every function streams the maps one layer (row block) at a time.  Pure numpy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from analytics.maps import as_maps

RAZOR_ECHO_TOP = 0.01
RAZOR_INDUCTION_TOP = 0.14
PATTERNS = ("prev_token", "duplicate_token", "induction", "echo")


def pattern_scores(source, token_ids: Sequence[int], period: int, offset: int = 1) -> dict[str, np.ndarray]:
    """Scores of the four patterns for every head: {"prev_token", "duplicate_token", "induction",
    "echo"} -> [layer, head] in [0, 1].  `source`: the probe's maps (a Capture or an array)."""
    maps = as_maps(source)
    ids = np.asarray(token_ids)
    n = maps.n_tokens
    if len(ids) != n:
        raise ValueError(f"{len(ids)} token ids for maps over {n} tokens")
    out = {name: np.zeros((maps.n_layers, maps.n_heads), dtype=np.float64) for name in PATTERNS}
    counts = dict.fromkeys(PATTERNS, 0)
    for layer in range(maps.n_layers):
        for r0, block in maps.blocks(layer):  # [head, rows, keys]
            R, K = block.shape[1], block.shape[2]
            rows = np.arange(r0, r0 + R)
            keys = np.arange(K)
            earlier = keys[None, :] < rows[:, None]  # [rows, keys]
            echo_mask = earlier & (keys[None, :] >= offset) & ((rows[:, None] - keys[None, :]) % period == 0) \
                & (rows[:, None] >= offset + period)
            induction_mask = np.zeros_like(echo_mask)
            induction_mask[:, 1:] = echo_mask[:, :-1]  # the key after each earlier copy
            dup_mask = earlier & (ids[None, :K] == ids[r0 : r0 + R, None]) & (keys[None, :] >= offset)
            prev_mask = (keys[None, :] == rows[:, None] - 1) & (rows[:, None] >= offset + 1)
            for name, mask in (("echo", echo_mask), ("induction", induction_mask),
                               ("duplicate_token", dup_mask), ("prev_token", prev_mask)):
                used = mask.any(axis=1)  # rows this pattern is defined for
                if not used.any():
                    continue
                mass = np.einsum("hrk,rk->hr", block[:, used], mask[used].astype(block.dtype))
                out[name][layer] += mass.sum(axis=1)
                if layer == 0:
                    counts[name] += int(used.sum())
    for name in PATTERNS:
        out[name] /= max(1, counts[name])
    return {k: v.astype(np.float32) for k, v in out.items()}


def token_match_scores(source, token_ids: Sequence[int], offset: int = 0) -> dict[str, np.ndarray]:
    """Duplicate-token and induction scores on any text, from token ids alone (no fixed period):
    duplicate = mass on earlier identical tokens, induction = mass on the tokens that followed them,
    each averaged over the rows that have an earlier identical token.  [layer, head] each."""
    maps = as_maps(source)
    ids = np.asarray(token_ids)
    out = {"duplicate_token": np.zeros((maps.n_layers, maps.n_heads)), "induction": np.zeros((maps.n_layers, maps.n_heads))}
    count = 0
    for layer in range(maps.n_layers):
        for r0, block in maps.blocks(layer):
            R, K = block.shape[1], block.shape[2]
            rows = np.arange(r0, r0 + R)
            keys = np.arange(K)
            dup = (keys[None, :] < rows[:, None]) & (ids[None, :K] == ids[r0 : r0 + R, None]) & (keys[None, :] >= offset)
            ind = np.zeros_like(dup)
            ind[:, 1:] = dup[:, :-1]
            ind &= keys[None, :] < rows[:, None]
            used = dup.any(axis=1)
            if not used.any():
                continue
            out["duplicate_token"][layer] += np.einsum("hrk,rk->h", block[:, used], dup[used].astype(block.dtype))
            out["induction"][layer] += np.einsum("hrk,rk->h", block[:, used], ind[used].astype(block.dtype))
            if layer == 0:
                count += int(used.sum())
    return {k: (v / max(1, count)).astype(np.float32) for k, v in out.items()}


def group_max(scores: np.ndarray, group_size: int) -> np.ndarray:
    """[layer, head] -> [layer, kv_head]: the max over the query heads that share one KV head (GQA)."""
    s = np.asarray(scores)
    L, H = s.shape
    if H % group_size:
        raise ValueError(f"{H} heads do not split into groups of {group_size}")
    return s.reshape(L, H // group_size, group_size).max(axis=2)


def razor_heads(echo_kv: np.ndarray, induction_kv: np.ndarray, echo_top: float = RAZOR_ECHO_TOP,
                induction_top: float = RAZOR_INDUCTION_TOP) -> np.ndarray:
    """RazorAttention's retrieval heads (RAConfig defaults): the top 1 % of (layer, KV head) by echo
    united with the top 14 % by induction (at least one each).  bool  # [layer, kv_head]."""
    selected = np.zeros(np.shape(echo_kv), dtype=bool)
    for scores, frac in ((echo_kv, echo_top), (induction_kv, induction_top)):
        flat = np.asarray(scores, dtype=np.float64).ravel()
        k = max(1, int(round(frac * flat.size)))
        selected.ravel()[np.argsort(-flat, kind="stable")[:k]] = True
    return selected


__all__ = ["PATTERNS", "group_max", "pattern_scores", "razor_heads", "token_match_scores"]
