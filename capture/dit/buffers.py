"""Buffers of a "full" DiT capture (capture.dit.record): a small pool that the next capture of the same shapes
reuses, and the mean of a layer's maps over the steps.

On a CPU, faulting fresh pages in cost a tiny pipeline's capture more than computing its maps: a "full"
capture's buffers (its maps, step means and their float16 copies) go back to the pool when written
(`spare`, at most SPARE_BYTES) and come out zeroed for the next one.
"""
from __future__ import annotations

import threading

import torch


class Spare:
    """The map buffers of the last "full" captures (at most SPARE_BYTES), reused zeroed by the next
    capture of the same shapes: filling memory the process already holds instead of faulting fresh pages
    in (a tiny pipeline's capture spends more on the page faults of its 5 MB of buffers than on
    computing the maps)."""

    def __init__(self):
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
        shape = tuple(shape)
        with self.lock:
            for i, t in enumerate(self.free):
                if t.shape == shape and t.dtype == dtype:
                    return self.free.pop(i)
        with torch.inference_mode(False):  # normal tensors: reusable in and out of inference mode
            return torch.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.empty(shape).zero_()

    def give(self, tensors: list[torch.Tensor]) -> None:
        with self.lock:
            self.free = ([t for t in tensors if t.numel()] + self.free)
            total, kept = 0, []
            for t in self.free:
                total += t.numel() * t.element_size()
                if total > SPARE_BYTES:
                    break
                kept.append(t)
            self.free = kept


SPARE_BYTES = 32 * 2**20
spare = Spare()


def step_mean(maps: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """maps  # [step, head, n, n] float16 -> their mean over the steps  # [head, n, n] float32 (zeros for no
    step): the steps summed in order in float32, then divided, the very numbers of
    `maps.float().mean(0)` without converting the whole array first (half the time); into `out` when given."""
    total = torch.empty(maps.shape[1:]) if out is None else out
    if not len(maps):
        return total.zero_()
    total.copy_(maps[0])
    for step in maps[1:]:
        total.add_(step)
    return total.div_(len(maps))


__all__ = ["SPARE_BYTES", "Spare", "spare", "step_mean"]
