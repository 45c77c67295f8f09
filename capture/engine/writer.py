"""`LayerWriter`: each finished layer's maps go to the cache while the next layer computes.

The metadata record is not written here: `capture.api.run` writes it last, so a capture whose
layers are half written does not exist (DESIGN.md, "Cache").
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from core.progress import Progress
from core.layouts import overview_name


class LayerWriter:
    """Writes finished layers to the cache on a background thread, so disk work overlaps the forward.

    A small pass (`defer`, capture.engine.recorder.small_pass) is kept in memory instead and written after
    the forward in one cache transaction: for a 128-token input the writer thread's share of the GIL
    and 31 separate index commits cost more than the writing itself.  With `inline` those deferred
    arrays that are under 32 KB go in their index rows, not in files (cache.store.Store.put_array)."""

    MAX_PENDING = 2  # layers waiting to be written; bounds the memory held by the queue

    def __init__(self, store, key: str, n_layers: int, progress: Progress, share_before: float,
                 defer: bool = False, inline: bool = False):
        self.store, self.key, self.n_layers = store, key, n_layers
        self.inline = inline
        self.progress, self.share_before = progress, share_before
        self.deferred: list[tuple[str, np.ndarray]] | None = [] if defer else None
        self.pool = None if self.deferred is not None else \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="headscope-writer")
        self.pending: list[Future] = []
        self.overviews: dict[int, object] = {}
        self.written = 0

    def submit(self, layer: int, maps, overview) -> None:
        if self.deferred is not None:
            self.deferred.append((f"L{layer:03d}", maps))
        else:
            while len(self.pending) >= self.MAX_PENDING:
                self.pending.pop(0).result()
            self.pending.append(self.pool.submit(self.store.put_array, self.key, f"L{layer:03d}", maps))
        self.overviews[layer] = overview
        self.written += 1
        self.progress(self.share_before + (1 - self.share_before) * self.written / self.n_layers,
                      f"captured layer {self.written}/{self.n_layers}")

    def __enter__(self) -> "LayerWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self.pending:
                future.result()  # re-raises a failed write
            if exc[0] is None and len(self.overviews) == self.n_layers:
                thumbs = np.stack([self.overviews[layer] for layer in range(self.n_layers)])
                arrays = (self.deferred or []) + [(overview_name(thumbs.shape[-1]), thumbs)]
                with self.store.transaction():
                    for name, array in arrays:
                        self.store.put_array(self.key, name, array, inline=self.inline)
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
