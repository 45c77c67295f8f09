"""Writing a DiT capture to the cache, and what one will take before it runs.

`ArrayWriter` writes arrays on one background thread while sampling goes on (at most MAX_PENDING
groups waiting, which bounds the memory the queue holds), a group per cache transaction, and a small
group (INLINE_BYTES) at once; `view_items`
are the per-layer maps the generic views read and their overview thumbnails; `finish` writes the image.
The metadata record is written last by capture.api.run.

`estimate` adds up a capture's disk and its memory above the loaded pipeline (bytes), for both
layouts of core.dit_capture:
- "full": every recorded step's map of every layer, its step mean, the cross-attention word maps (on
  disk up to the last text column read: `read_columns`, where the attention masks the padding the prompt's
  tokens and a column per padding run, else every text token);
  all of it is held in memory until the end of the run;
- "split": per step and layer the image -> text and text -> image maps (image tokens x text columns, per
  head), the pooled image maps and the coarse map; the kept steps' queries and keys (float32) and
  full maps; in memory one step's arrays twice (the step being recorded and the one being written),
  the queries and keys waiting to be written (at most MAX_PENDING layers), the steps held for one stored
  array (a small capture's) and the explicit row block of the recorded map (scores, weights and their
  coarse fold).
`check` refuses a run that does not fit with one sentence naming what to change.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from capture.dit.attend import BLOCK_ELEMENTS
from capture.engine import memory
from capture.engine.call import ROW_BLOCK
from core import dit_capture
from core.errors import InputError
from core.layouts import overview_name
from core.types import OVERVIEW_BINS

MAX_PENDING = 8
# a group of arrays up to this size is written at once by the caller: on a CPU the sampler's OpenMP threads
# keep a writer thread waiting for a core, so handing a small group over cost more than writing it (a tiny
# PixArt capture's 0.5 MB: 4.6 ms on the thread, 1.5 ms at once; bench/dit.py)
INLINE_BYTES = 16 * 2**20


def pooled(maps: torch.Tensor, bins: int) -> torch.Tensor:
    """core.layouts.max_pool (block max over ceil(n / bins) blocks, ragged last block) computed by torch:
    maps  # [head, n, n] -> [head, bins, bins], same dtype; the same numbers, several times faster."""
    size = -(-maps.shape[-1] // bins)
    return maps if size == 1 else _block_max(maps, size)


def _block_max(maps: torch.Tensor, size: int) -> torch.Tensor:
    """maps  # [head, rows, cols] -> [head, ceil(rows / size), ceil(cols / size)]: the max of each size x size
    block (ragged last blocks)."""
    heads, rows, cols = maps.shape
    # the max over each block's rows, then over its columns (a third of max_pool2d's time); a ragged last
    # block is padded with -inf, which no block max takes (every block holds at least one entry)
    tall, wide = -(-rows // size) * size, -(-cols // size) * size
    if (tall, wide) != (rows, cols):
        maps = F.pad(maps, (0, wide - cols, 0, tall - rows), value=float("-inf"))
    by_rows = maps.reshape(heads, tall // size, size, wide).amax(2)
    return by_rows.reshape(heads, tall // size, wide // size, size).amax(3)


def pooled_block(block: torch.Tensor, q0: int, k0: int, n: int, bins: int) -> torch.Tensor:
    """`pooled` of the maps  # [head, n, n] that are zero but for block  # [head, rows, keys] at (q0, k0),
    without forming them: only the bins the block touches are pooled (the maps are non-negative, so a bin's
    zeros outside the block count as the entries they are)."""
    heads, rows, keys = block.shape
    size = -(-n // bins)
    out = torch.zeros(heads, -(-n // size), -(-n // size), dtype=block.dtype)
    b_row, b_col = q0 // size, k0 // size  # the first bins the block touches
    e_row, e_col = min(n, -(-(q0 + rows) // size) * size), min(n, -(-(k0 + keys) // size) * size)
    band = torch.zeros(heads, e_row - b_row * size, e_col - b_col * size, dtype=block.dtype)
    band[:, q0 - b_row * size:q0 - b_row * size + rows, k0 - b_col * size:k0 - b_col * size + keys] = block
    maxima = _block_max(band, size)
    out[:, b_row:b_row + maxima.shape[1], b_col:b_col + maxima.shape[2]] = maxima
    return out


def view_items(means: list[torch.Tensor], out: list[torch.Tensor] | None = None,
               blocks: list[list[int] | None] | None = None, n: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The arrays the generic views read, from each layer's step mean  # [head, n, n] float32: L007
    # [head, n, n] float16 and the overview thumbnails of all layers.  The thumbnails are pooled before
    the rounding to float16 (a block max commutes with a monotone rounding): the same numbers as pooling
    the float16 maps, one conversion fewer.  `out`: float16 CPU buffers for the L maps (else new ones).
    `blocks`: per layer, where its mean, the block of maps of side `n` it stores, starts (None: the whole
    map; core.layouts.PaddedBlock)."""
    blocks = blocks or [None] * len(means)
    n = n or means[0].shape[-1]
    bins = min(OVERVIEW_BINS, n)
    maps = [m.to(torch.float16).cpu().numpy() if out is None else out[i].copy_(m).numpy() for i, m in enumerate(means)]
    thumbs = np.stack([(pooled(m, bins) if block is None else pooled_block(m.cpu(), *block, n, bins))
                       .to(torch.float16).cpu().numpy() for m, block in zip(means, blocks)])
    return [(f"L{layer:03d}", m) for layer, m in enumerate(maps)] + [(overview_name(bins), thumbs)]


class ArrayWriter:
    """`put(name, array)` stores the array under the capture's key on a background thread."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headscope-dit-writer")
        self.pending: list[Future] = []

    def put(self, name: str, array: np.ndarray) -> None:
        self.put_many([(name, array)])

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store several arrays in one cache transaction (one index commit for all of them): on the thread,
        or at once when they hold at most INLINE_BYTES."""
        if not items:  # a step of a chunk being filled (capture.dit.record): no empty index transaction
            return
        items = [(name, np.ascontiguousarray(array)) for name, array in items]
        if sum(array.nbytes for _name, array in items) <= INLINE_BYTES:
            self._write(items)
            return
        while len(self.pending) >= MAX_PENDING:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._write, items))

    def _write(self, items: list[tuple[str, np.ndarray]]) -> None:
        with self.store.transaction():
            for name, array in items:
                self.store.put_array(self.key, name, array, inline=True)  # under 32 KB: in the index, no file

    def finish(self, image: np.ndarray) -> None:
        """The sampled image; then wait until everything is written."""
        self.put(dit_capture.IMAGE_NAME, image)
        self.close()

    def close(self) -> None:
        try:
            for job in self.pending:
                job.result()  # re-raises a failed write
        finally:
            self.pending.clear()
            self.pool.shutdown(wait=True)

    def __enter__(self) -> "ArrayWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def estimate(mode: str, n_layers: int, n_heads: int, head_dim: int, n_image: int, n_text: int, n_columns: int,
             steps: int, cross: bool, cross_heads: int, kept: int = 1, full_layers: int = 0,
             read_columns: int | None = None, image_bytes: int = 0, word_layers: int | None = None,
             sides: list[int] | None = None, joint_mask: bool = False) -> memory.Estimate:
    """Disk and peak memory (bytes above the loaded pipeline) of one capture (module docstring); `image_bytes`:
    the picture's, stored with the maps; `word_layers`: how many layers store word maps in the split layout (None:
    all; capture.dit.record.MapRecorder); `sides`: each layer's map side in the full layout, the block it stores
    (None: every layer's the whole axis, a cross family's the image); `joint_mask`: the split layout keeps the
    attention's n x n mask (float16) with each kept step's queries and keys (Chroma)."""
    n, words = n_image + n_text, cross_heads or n_heads
    block = min(n_heads * n * n, max(n_heads * ROW_BLOCK * n, BLOCK_ELEMENTS))  # capture.dit.attend.block_rows
    row_block = 3 * block * 4  # scores, weights, their fold over the coarse tokens
    if mode == "full":  # every step's maps and their mean; a cross family's self-attention: its image block only
        side = n_image if cross else n
        squares = sum(s * s for s in sides) if sides is not None else n_layers * side * side
        maps = (steps + 1) * n_heads * squares * 2
        words_bytes = n_layers * steps * words * n_image * n_text * 2 if cross else 0  # in memory: every column
        # on disk the word maps stop after the last column read (capture.dit.record): the masked padding of
        # PixArt and Sana is not stored, about the grouped columns less their padding runs' one each
        read = n_columns if read_columns is None else read_columns
        stored_words = words_bytes * min(n_text, read) / max(1, n_text)
        return memory.Estimate(layout="full", n_tokens=n, memory_bytes=int(maps + words_bytes + row_block),
                               disk_bytes=int(maps + stored_words + image_bytes))
    regions = min(n_image, dit_capture.REGION_SIDE ** 2)
    m = regions + n_columns
    reading = n_layers if word_layers is None else word_layers
    per_step = (reading * (words * n_image * n_columns + (0 if cross else n_heads * n_columns * n_image))
                + n_layers * n_heads * regions * regions) * 2
    coarse = n_layers * n_heads * m * m * 2
    side = n_image if cross else n  # a cross family's self-attention: the image's queries and keys alone
    qk = kept * n_layers * 2 * n_heads * side * head_dim * 4
    full = kept * full_layers * n_heads * side * side * 2
    masks = kept * n * n * 2 if joint_mask else 0
    disk = steps * per_step + coarse + qk + full + masks + image_bytes
    qk_layer = 2 * n_heads * side * head_dim * 4  # one layer's queries and keys, waiting to be written
    chunk = min(steps, INLINE_BYTES // max(1, per_step))  # steps held per stored array (capture.dit.record)
    held = (2 * per_step * 2 + 3 * coarse * 2 + min(n_layers, MAX_PENDING) * qk_layer
            + full_layers * n_heads * side * side * 2 + (chunk * per_step if chunk > 1 else 0))
    return memory.Estimate(layout="split", n_tokens=n, memory_bytes=int(held + row_block), disk_bytes=int(disk))


def check(need: memory.Estimate, name: str, size: tuple[int, int], steps: int, disk_budget: int,
          memory_budget: int | None = None) -> None:
    """Refuse (InputError, one sentence) a capture that does not fit its disk or memory budget."""
    memory_budget = memory.available_bytes() if memory_budget is None else memory_budget
    what = f"Capturing {name} at {size[1]} x {size[0]} px for {steps} steps"
    if need.disk_bytes > disk_budget:
        raise InputError(f"{what} needs {need.disk_gb:.1f} GB of cache (the maps of every step and layer), but the "
                         f"cache can take {disk_budget / 2**30:.1f} GB; sample fewer steps or a smaller picture, or "
                         "free disk space or raise HEADSCOPE_CACHE_GB.")
    if need.memory_bytes > memory_budget:
        raise InputError(f"{what} needs about {need.memory_gb:.1f} GB of memory for the recorded maps, but "
                         f"{memory_budget / 2**30:.1f} GB is available to it; sample a smaller picture, or free "
                         "memory or set HEADSCOPE_CAPTURE_GB.")


__all__ = ["ArrayWriter", "check", "estimate", "view_items"]
