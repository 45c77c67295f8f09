"""Helpers shared by the benchmarks: timing, peak-memory sampling, prompts of a given length, tables."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from capture.engine.memory import PeakSampler  # noqa: E402  (needs ROOT on sys.path)


def PeakMemory() -> "PeakSampler":
    """The resident-memory peak sampler capture uses itself, sampling every 5 ms for benchmarks."""
    return PeakSampler(interval=0.005)


@contextmanager
def timed(result: dict, name: str):
    """Record wall seconds and peak memory rise (bytes) of the block under result[name]."""
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
    result[name] = {"s": seconds, "peak": mem.peak}


def prompt_of(tokenizer, n_tokens: int) -> str:
    """A natural-language prompt that tokenizes to exactly `n_tokens` tokens."""
    text = (ROOT / "assets" / "haystack.txt").read_text()
    while len(tokenizer(text)["input_ids"]) < n_tokens:
        text += " " + text
    ids = tokenizer(text)["input_ids"][:n_tokens]
    for _ in range(8):  # decoding then re-encoding can merge tokens at the edge: nudge until exact
        prompt = tokenizer.decode(ids)
        got = len(tokenizer(prompt)["input_ids"])
        if got == n_tokens:
            return prompt
        ids = ids[: len(ids) - (got - n_tokens)] if got > n_tokens else tokenizer(text)["input_ids"][: len(ids) + 1]
    return prompt


def table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
