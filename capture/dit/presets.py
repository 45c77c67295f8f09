"""Interventions for diffusion transformers (torch-free): SoftPAG / PAG guidance and direct head edits.

Two ways an `Intervention` acts on a DiT run (capture/dit/adapter.py):

- **guidance** (preset "softpag", or "softpag:s=<scale>"): the edits are not applied to the image
  being sampled but to an extra *perturbed branch*, and each step guides away from it
  (Ahn et al. 2025, METHODS §7.1; PAG when u = 1):

      v = v_u + cfg (v_c - v_u) + s (v_c - v_p)

  v_c / v_u the conditional / unconditional branch, v_p the perturbed branch, whose chosen heads'
  self-attention is A' = (1 - u) A + u I (`mix` toward the identity on image queries and image keys,
  i.e. each image token attends to itself).  s is the guidance scale in the preset name
  (DEFAULT_PAG_SCALE when absent), so it is part of the intervention's key and of share links.
- **direct** (any other intervention): the edits apply to every branch of the run (`scale` 0
  masks a head, `mix` u, `logit` -inf on "span:text" cuts a head off the text ...).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Sequence

from capture.dit.tokens import TokenLayout
from core.errors import InterventionError
from core.interventions import HeadEdit, Intervention, parse_positions, sink_set

SOFTPAG = "softpag"
DEFAULT_PAG_SCALE = 3.0
_PRESET = re.compile(r"^softpag(?::s=(-?\d+(?:\.\d+)?))?$")


def is_guidance(intervention: Intervention) -> bool:
    """True when the intervention is a SoftPAG / PAG perturbed branch rather than a direct edit."""
    return bool(intervention.preset) and _PRESET.fullmatch(intervention.preset) is not None and not intervention.empty


def pag_scale(intervention: Intervention) -> float:
    """s of a SoftPAG intervention (0 for a direct one)."""
    if not is_guidance(intervention):
        return 0.0
    m = _PRESET.fullmatch(intervention.preset)
    return float(m.group(1)) if m.group(1) else DEFAULT_PAG_SCALE


def softpag(heads: Sequence[tuple[int, int]], u: float = 1.0, scale: float = DEFAULT_PAG_SCALE,
            image_only: bool = True) -> Intervention:
    """SoftPAG guidance on (layer, head)s: their image self-attention mixed toward the identity with
    strength u (u = 1: PAG) in the perturbed branch, guidance scale s = `scale`.

    image_only: the mix acts on image-token queries (each image token attends to itself only), as
    PAG perturbs the image self-attention; False mixes every query row of the joint map.
    """
    if not heads:
        raise InterventionError("SoftPAG needs at least one head to perturb.")
    queries = "image" if image_only else "all"
    edits = tuple(HeadEdit(layer=l, head=h, op="mix", value=u, keys="all", queries=queries) for l, h in heads)
    return Intervention(edits=edits, preset=f"{SOFTPAG}:s={float(scale):g}")


def scale_heads(heads: Sequence[tuple[int, int]], factor: float = 0.0) -> Intervention:
    """A direct edit: each head's output times `factor` (0 masks the head) in every branch."""
    return Intervention(edits=tuple(HeadEdit(layer=l, head=h, op="scale", value=factor) for l, h in heads),
                        preset="dit-scale")


def mix_heads(heads: Sequence[tuple[int, int]], u: float, keys: str = "all", queries: str = "all") -> Intervention:
    """A direct edit: the heads' maps mixed toward the identity (keys "all") or uniform ("uniform")."""
    return Intervention(edits=tuple(HeadEdit(layer=l, head=h, op="mix", value=u, keys=keys, queries=queries)
                                    for l, h in heads), preset="dit-mix")


def redistribute_from(heads: Sequence[tuple[int, int]], positions: Sequence[int], beta: float = 0.4) -> Intervention:
    """A direct edit: on the heads, the attention every query pays to the token `positions` (e.g. the
    RefAM sink text tokens) times beta, the freed mass given to the other keys in proportion (rows
    still sum to 1).  Consecutive positions form one range, so a run of padding tokens is one edit;
    beta = 0.4 is ACT's default (METHODS §2.1)."""
    if not heads or not positions:
        raise InterventionError("Redistribution needs at least one head and one token to take attention from.")
    ranges, start = [], None
    ordered = sorted(set(int(p) for p in positions))
    for i, p in enumerate(ordered):
        start = p if start is None else start
        if i + 1 == len(ordered) or ordered[i + 1] != p + 1:
            ranges.append(f"{start}:{p + 1}")
            start = None
    edits = tuple(HeadEdit(layer=l, head=h, op="redistribute", value=beta, keys=keys)
                  for l, h in heads for keys in ranges)
    return Intervention(edits=edits, preset="dit-redistribute")


def _moved_sets(spec: str, layout: TokenLayout, other: TokenLayout) -> list[str]:
    """A position set of `layout`'s axis as position sets of `other`'s (`TokenLayout.moved`): named sets
    ("all", "image", "span:prompt" ...) stay, as they are named on the other call's spans; a range moves."""
    if spec in ("all", "uniform", "last", "image") or spec.startswith("span:") or sink_set(spec) is not None \
            or ":" not in spec:
        return [spec]
    return [f"{r.start}:{r.stop}" for r in layout.moved(parse_positions(spec, layout.n), other)]


def moved(intervention: Intervention, layout: TokenLayout, other: TokenLayout) -> Intervention:
    """The direct intervention of a run as its negative prompt's own transformer call takes it, when that call's
    text is not as long as the prompt's (Qwen-Image, CogView 4, Lumina 2: `TokenLayout.with_text`).  Every
    edit acts there on the same image patches and on the negative text's tokens at the same text indices, as
    it acts on the unconditional row of a batched family whose two texts are padded alike (SD3); an edit whose
    keys are all gone is left out; a range split in two (`TokenLayout.moved`) makes two edits."""
    edits = []
    for edit in intervention.edits:
        to = edit.mode[3:] if edit.mode.startswith("to:") else None
        for keys, queries, target in itertools.product(
                _moved_sets(edit.keys, layout, other), _moved_sets(edit.queries, layout, other),
                [None] if to is None else _moved_sets(to, layout, other)):
            edits.append(dataclasses.replace(edit, keys=keys, queries=queries,
                                             mode=edit.mode if target is None else f"to:{target}"))
    return dataclasses.replace(intervention, edits=tuple(edits))


__all__ = ["SOFTPAG", "DEFAULT_PAG_SCALE", "is_guidance", "pag_scale", "softpag", "scale_heads", "mix_heads",
           "redistribute_from", "moved"]
