"""The Diffusion page's summary of a capture's word maps over every step (analytics.dit.summarise: the DAAM
mean, RefAM's statistics, the caption's grounding), computed once under a progress bar and held in the server's
memory for the last HELD captures viewed, so a rerun (a slider moved) reads one step's maps, not every step's.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import streamlit as st

from analytics import dit as analytics
from core.types import Capture
from pages import shared

HELD = 2  # captures whose summaries stay in memory (SD3-medium at 1,024², 28 steps: ~190 MB each)
_LOCK = threading.Lock()


@st.cache_resource(show_spinner=False)
def _held() -> OrderedDict:
    """The server's summaries, by cache directory and capture key (most recently viewed last)."""
    return OrderedDict()


def summary(capture: Capture, masks: dict[int, np.ndarray]) -> analytics.WordSummary | None:
    """The capture's word-map summary (None when its reading was stopped)."""
    held = _held()

    def stored(key: str) -> analytics.WordSummary | None:
        with _LOCK:
            if key in held:
                held.move_to_end(key)
            return held.get(key)

    def work(key: str, progress) -> analytics.WordSummary:
        found = analytics.summarise(capture, masks, progress=lambda done, total: progress(
            done / total, f"step {done} of {total}"))
        with _LOCK:
            held[key] = found
            while len(held) > HELD:
                held.popitem(last=False)
        return found

    where = f"{getattr(capture.store, 'directory', '')}/{capture.key}"  # a key names one capture in one cache
    return shared.run_with_progress("Reading the word maps of every step", work, where, stored=stored, asked=False)


__all__ = ["HELD", "summary"]
