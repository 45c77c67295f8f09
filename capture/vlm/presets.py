"""Interventions for vision-language models, from the analytics of one capture (torch-free).

Each builder takes what analytics.vlm measured on the input (visual sinks, image-centric heads, the
gaze saliency) and returns an `Intervention` made of the six primitives (core.interventions), so
it is data: cacheable, shareable by key, and applied to generation and the recorded pass alike.

- `var`  VAR (Kang et al., ICLR 2025, METHODS §2.2): on the image-centric heads, every sink column
         keeps p = 0.6 of its attention and the freed mass goes to the image tokens, in proportion
         (`redistribute` with target "to:image"), on the rows after the picture (the official code's
         query rows: from the end of the image span at prefill, every decoding row).  Deviation: VAR
         picks heads per query row at every step; we pick heads from the capture (image-centric
         share >= 0.5 over its decode rows) and edit all those rows of them.  Sinks are VAR's (φ > 20 on the massive dims, prefill) when
         analytics found any, else ACT's detection with the first token included ("allsinks"); with
         several sinks the edits apply one sink at a time, so a visual sink can receive a little of an
         earlier sink's freed mass.  The last layer is skipped (VAR's `except_last_layer`).
- `gift` GIFT (Qi et al. 2025, METHODS §2.3): at every decoding step (query rows "last": the last
         prompt token and each generated token) attention to image token j is multiplied by
         (1 + γ S_j), S the gaze saliency (max 1), and attention to the question tokens by (1 + γ_q),
         then renormalised: a `logit` edit of ln(1 + γ S_j) on key j (adding ln c to a logit is
         multiplying its softmax weight by c before renormalising).  GIFT's coefficients, layers and
         pre/post-softmax choice are unverified; defaults here: γ = 1, γ_q = 0.5, the `top_k` = 16 most
         salient patches, on the given heads (the page passes the image-centric heads), else every
         head of layers 2..L-1.
- `vhr`  VHR (He et al., ACL 2025, METHODS §3.1), static: from the capture's VHD per head (mean over its
         answer tokens, probes.vlm), per layer drop the "surge" heads (VHD > mean + std), keep
         the heads above the layer's median and scale their outputs by α.  VHR re-selects at every
         decoding step and layer by layer with two branches; we select once from the capture (the
         heads that used the picture for this answer).  α is unverified in the paper: default 1.5.
- `mask_image`  the chosen heads cannot see the picture: `logit` -inf on the image keys.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from capture.text.presets import checked_heads
from core.errors import InterventionError
from core.interventions import HeadEdit, Intervention
from core.types import ModelMeta

Heads = Sequence[tuple[int, int]]
VAR_P = 0.6  # VAR p: the share of sink attention kept
GIFT_GAMMA = 1.0  # our default (GIFT's coefficient is unverified)
GIFT_GAMMA_Q = 0.5
GIFT_TOP_K = 16
VAR_FIRST_LAYER = 2
VHR_ALPHA = 1.5  # our default (unverified in He et al.)


def centric_heads(centric: np.ndarray, share: float = 0.5, skip_last: bool = True) -> list[tuple[int, int]]:
    """(layer, head) pairs whose image-centric share  # [layer, head] is >= share (the last layer left out)."""
    centric = np.asarray(centric)
    last = centric.shape[0] - 1 if skip_last else centric.shape[0]
    return [(int(l), int(h)) for l, h in zip(*np.nonzero(centric >= share)) if l < last]


def var(meta: ModelMeta, heads: Heads, *, sinks: Sequence[int] = (), p: float = VAR_P,
        image: range | None = None) -> Intervention:
    """VAR on `heads` (image-centric heads): each sink column (token positions `sinks`; none: ACT's
    "allsinks") keeps p of its mass, the rest goes to the image tokens in proportion.  Default p = 0.6.
    With the picture's span `image`, only the rows after it are edited, as in the official code
    (`VARProcessor.attn_redist`: at prefill the query rows from im + P on, then every decoding row)."""
    chosen = [(l, h) for l, h in checked_heads(meta, heads) if l < meta.n_layers - 1]
    if not chosen:
        raise InterventionError("VAR acts on image-centric heads; this input has none (outside the last layer).")
    if not 0.0 <= p <= 1.0:
        raise InterventionError("VAR's p (the share of sink attention kept) must be in [0, 1].")
    keys = [f"{int(j)}:{int(j) + 1}" for j in sorted(set(sinks))] or ["allsinks"]
    queries = f"{image.stop}:" if image is not None else "all"
    edits = tuple(HeadEdit(l, h, "redistribute", p, keys=k, queries=queries, mode="to:image")
                  for l, h in chosen for k in keys)
    return Intervention(edits=edits, preset="vlm-var")


def gift(meta: ModelMeta, saliency: np.ndarray, image: Sequence[int], heads: Heads | None = None, *,
         gamma: float = GIFT_GAMMA, gamma_q: float = GIFT_GAMMA_Q, top_k: int = GIFT_TOP_K) -> Intervention:
    """GIFT: at each decoding step, image token j's attention times (1 + gamma S_j) for the `top_k` most
    salient image tokens, the question's tokens times (1 + gamma_q), renormalised; S  # [image token] (or
    [rows, cols] of a one-grid picture, row-major; max 1), `image` the image tokens' positions in the
    same order (analytics.vlm.Gaze.token_saliency and .positions)."""
    s = np.asarray(saliency, dtype=np.float64).ravel()
    if s.size != len(image):
        raise InterventionError(f"The saliency map has {s.size} patches but the image has {len(image)} tokens.")
    if gamma < 0 or gamma_q < 0:
        raise InterventionError("GIFT's amplification coefficients must be >= 0.")
    chosen = checked_heads(meta, heads) or [(l, h) for l in range(min(VAR_FIRST_LAYER, meta.n_layers - 1), meta.n_layers)
                                       for h in range(meta.n_heads)]
    order = [int(k) for k in np.argsort(-s, kind="stable")[: max(0, int(top_k))] if s[k] > 0]
    boosts = [(f"{image[k]}:{image[k] + 1}", round(math.log1p(gamma * s[k]), 4)) for k in order]
    if gamma_q > 0:
        boosts.append(("span:question", round(math.log1p(gamma_q), 4)))
    boosts = [(keys, b) for keys, b in boosts if b > 0]
    if not boosts:
        raise InterventionError("GIFT has nothing to amplify: the saliency map is empty and γ_q is 0.")
    edits = tuple(HeadEdit(l, h, "logit", b, keys=keys, queries="last") for l, h in chosen for keys, b in boosts)
    return Intervention(edits=edits, preset="vlm-gift")


def vhr_heads(vhd: np.ndarray) -> list[tuple[int, int]]:
    """VHR's selection from vhd  # [layer, head]: per layer, surge heads (> mean + std) dropped, then the
    heads above the layer's median of the rest."""
    vhd = np.asarray(vhd, dtype=np.float64)
    out = []
    for layer, row in enumerate(vhd):
        keep = row <= row.mean() + row.std()
        if not keep.any():
            continue
        median = np.median(row[keep])
        out += [(layer, int(h)) for h in np.flatnonzero(keep & (row > median))]
    return out


def vhr(meta: ModelMeta, vhd: np.ndarray, *, alpha: float = VHR_ALPHA) -> Intervention:
    """VHR (static): the outputs of `vhr_heads(vhd)` times alpha (default 1.5); vhd  # [layer, head]."""
    vhd = np.asarray(vhd)
    if vhd.shape != (meta.n_layers, meta.n_heads):
        raise InterventionError(f"VHD scores must be [layer, head] = ({meta.n_layers}, {meta.n_heads}).")
    if alpha < 0:
        raise InterventionError("VHR's alpha must be >= 0.")
    heads = vhr_heads(vhd)
    if not heads:
        raise InterventionError("VHR found no heads above their layer's median VHD.")
    return Intervention(edits=tuple(HeadEdit(l, h, "scale", alpha) for l, h in heads), preset="vlm-vhr")


def mask_image(meta: ModelMeta, heads: Heads) -> Intervention:
    """The chosen heads cannot see the picture: -inf on the image keys (every query row)."""
    chosen = checked_heads(meta, heads)
    if not chosen:
        raise InterventionError("Pick at least one head to cut off the image.")
    return Intervention(edits=tuple(HeadEdit(l, h, "logit", -math.inf, keys="image") for l, h in chosen),
                        preset="vlm-mask-image")



# ---- from one capture's analytics ------------------------------------------------------------------

METHODS = {"var": "VAR: sink attention to the image", "gift": "GIFT: amplify the gaze saliency",
           "vhr": "VHR: reinforce vision-aware heads", "mask": "Mask the image for chosen heads"}


def settings_of(intervention: Intervention) -> tuple[str, dict] | None:
    """(method, slider settings) read back from an intervention these builders made (a shared link names
    only its key), or None."""
    preset = intervention.preset or ""
    edits = intervention.edits
    if not edits or not preset.startswith("vlm-"):
        return None
    if preset == "vlm-var":
        return "var", {"p": edits[0].value}
    if preset == "vlm-vhr":
        return "vhr", {"alpha": edits[0].value}
    if preset == "vlm-mask-image":
        return "mask", {"heads": intervention.heads()}
    first = edits[0].layer, edits[0].head
    own = [e for e in edits if (e.layer, e.head) == first]
    patches = [e for e in own if e.keys != "span:question"]
    question = [e for e in own if e.keys == "span:question"]
    return "gift", {"gamma": round(math.expm1(patches[0].value), 3) if patches else 0.0,
                    "gamma_q": round(math.expm1(question[0].value), 3) if question else 0.0,
                    "top_k": len(patches)}


PRESETS = {"var": var, "gift": gift, "vhr": vhr, "mask": mask_image}

__all__ = ["var", "gift", "mask_image", "centric_heads", "settings_of", "METHODS", "PRESETS",
           "VAR_P", "GIFT_GAMMA", "GIFT_GAMMA_Q", "GIFT_TOP_K", "vhr", "vhr_heads", "VHR_ALPHA"]
