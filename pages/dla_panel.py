"""Which heads wrote a token: direct logit attribution of one position of a capture, as a panel (issue 24,
item 1; Elhage et al. 2021, probes.dla).  The explorer's token view shows it for the query token, the Gaze
page for the position that predicts a VLM's answer.

Each head's term in the logit of the token that follows `position`, through the final norm with its scale
frozen from the run; the terms of the heads, MLPs, embedding and bias sum to the model's logit (before
Gemma 2's soft-cap).  Stored per capture; computed on request (one forward of the model).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import streamlit as st

import probes
from analytics import ProbeMissing, attribution
from capture import USER_ERRORS
from pages import shared
from pages.widgets import signed_head_map


def dla_panel(capture, position: int, key: str, selected: tuple[int, int] | None,
              on_pick: Callable[[int, int], None]) -> None:
    """The DLA map at `position` (-1: the answer's, analytics.attribution.DLA) onto the token after it (the
    model's top prediction after the last token), with a caption that gives the sum and the largest pushes; a
    button computes it when it is not stored."""
    meta = capture.meta
    if meta.modality == "text" and (not meta.causal or meta.family not in attribution.TEXT_FAMILIES):
        st.caption(f"Direct logit attribution knows the causal LMs {', '.join(attribution.TEXT_FAMILIES)}; "
                   f"{meta.name} ({meta.family}) is none of them.")
        return
    try:
        dla = attribution.read_dla(capture)
    except ProbeMissing:
        if not st.button("Attribute the next token to the heads", key=f"{key}_run",
                         help="Runs the model once on this capture's tokens with every head's output recorded."):
            return
        result = shared.run_with_progress("Direct logit attribution", probes.run_probe, "dla", meta.name,
                                          {"capture": capture.key})
        if result is None:
            return
        dla = attribution.DLA(result)
    except USER_ERRORS as exc:
        st.error(str(exc))
        return
    n, position = capture.n_tokens, dla.position(position)
    heads, terms = dla.heads(position), dla.terms(position)  # [layer, head]; the MLPs, embedding, bias, logit
    answer = capture.tokens[position + 1] if position + 1 < n else dla.result.summary.get("answer", "the top prediction")
    top = [np.unravel_index(i, heads.shape) for i in np.argsort(-heads, axis=None)[:3]]  # the 3 largest pushes
    cap = dla.result.summary.get("logit_softcap")
    logit = f"logit before its soft-cap at ±{cap:g}" if cap else "logit"
    st.caption(f"Each head's direct term in the logit of {answer!r} at token {position} "
               f"({capture.tokens[position]!r}); red pushes it up, blue down. All terms sum to the model's {logit} "
               f"{terms['logit']:.4g}: heads {heads.sum():+.4g}, MLPs {terms['mlps'].sum():+.4g}, embedding "
               f"{terms['embed']:+.4g}, bias {terms['bias']:+.4g}. Largest: "
               + ", ".join(f"L{l} H{h} {heads[l, h]:+.3g}" for l, h in top)
               + ". A direct term only: a head acting through later heads can matter more (Attribution page).")
    signed_head_map(heads, f"DLA onto {answer!r}: click a head", "DLA (logit)", f"{key}_map", selected,
                    on_pick=on_pick)


__all__ = ["dla_panel"]
