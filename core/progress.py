"""The progress protocol every long piece of work reports through.

A `Progress` is a callback `(fraction done in [0, 1], what is happening now)`.  The capture engine,
the probes and the pattern atlas call it; the app turns it into a progress bar with its message,
the command line into a tqdm bar, a notebook passes nothing (`no_progress`).
"""
from __future__ import annotations

from typing import Callable

Progress = Callable[[float, str], None]


def no_progress(_fraction: float, _message: str) -> None:
    """The default progress callback: report nothing."""


def span(progress: Progress, lo: float, hi: float) -> Progress:
    """A callback that maps its own [0, 1] onto [lo, hi] of `progress` (one stage of a longer job)."""
    return lambda fraction, message: progress(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), message)


__all__ = ["Progress", "no_progress", "span"]
