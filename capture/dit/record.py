"""Recording a DiT capture: which maps are kept, the recorder that keeps them, and what it costs.

`RecordPlan` picks the layout of core.dit_capture: "full" when every map of every recorded step fits
in core.dit_capture.FULL_BYTES (shapes-dit, tiny pipelines), else "split": every step's and layer's
image -> text and text -> image maps for every head, image -> image pooled into regions, a coarse map per
layer (regions and text columns, averaged over the steps) for the generic views, the queries and keys
of the kept steps (default: the middle step) so any map of those steps is recomputed on request, and
the full maps of the kept steps at the layers asked for (`full_layers`, none by default).

`MapRecorder` is a capture.dit.attention recorder: the processors hand it each module's map of the
conditional batch row, block by block, on the device the model runs on; it folds them into the kept
arrays there (index_add over the coarse tokens: memory-bound, no n x n x m products), moves one step's
arrays to the CPU as float16 when the step ends, and writes them on a background thread while the next
step runs (capture.dit.write).  A "full" capture's buffers (its maps, step means and their float16
copies) go back to a small pool when written (`_Spare`, at most SPARE_BYTES) and the next capture of the
same shapes reuses them: on a CPU, faulting fresh pages in cost a tiny pipeline's capture more than the
arithmetic.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import torch

from capture.dit.attend import Frame
from capture.dit.tokens import TokenLayout, column_spans
from capture.dit.write import view_items
from core import dit_capture
from core.dit_capture import DitLayout, region_of


@dataclass(frozen=True)
class RecordPlan:
    """What a DiT capture keeps (module docstring); `steps` limits a "full" capture's recorded steps."""

    steps: tuple[int, ...] | None = None
    mode: str = "auto"  # "auto" | "full" | "split"
    kept: tuple[int, ...] | None = None  # "split": steps whose queries and keys are kept (None: the middle one)
    full_layers: tuple[int, ...] = ()  # "split": layers whose full maps are kept at the kept steps

    def resolve(self, n_layers: int, n_heads: int, n: int, steps: int) -> "RecordPlan":
        """The plan with "auto" decided and the kept steps filled in; `n` is the side of the layers' maps (the
        whole token axis, or the image tokens where the self-attention sees only those)."""
        mode = self.mode
        if mode == "auto":
            recorded = len(self.steps) if self.steps is not None else steps
            mode = "full" if n_layers * recorded * n_heads * n * n * 2 <= dit_capture.FULL_BYTES else "split"
        kept = tuple(s for s in (self.kept if self.kept is not None else (steps // 2,)) if 0 <= s < steps)
        return RecordPlan(self.steps if mode == "full" else None, mode, kept, tuple(self.full_layers))

    def recorded(self, steps: int) -> list[int]:
        return [s for s in (sorted(self.steps) if self.steps is not None else range(steps)) if 0 <= s < steps]


class _Spare:
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
_spare = _Spare()


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


class _FullSink:
    def __init__(self, target: torch.Tensor):
        self.target = target  # [head, rows, keys] float16 on the CPU: the module's block of the map

    def rows(self, r0: int, weights: torch.Tensor) -> None:
        """weights  # [head, rows, key]: the module's query rows r0 .. over all its keys, into the buffer (the
        self- or joint-attention block, or a cross-attention's word maps); copy_ converts and moves."""
        rows, keys = weights.shape[1:]
        self.target[:, r0:r0 + rows, :keys].copy_(weights)

    def close(self) -> None:
        pass


class _SplitSink:
    """Folds one module's rows into the step's arrays ("split")."""

    def __init__(self, rec: "MapRecorder", layer: int, kind: str, frame: Frame, full: torch.Tensor | None):
        self.rec, self.layer, self.kind, self.frame, self.full = rec, layer, kind, frame, full

    def rows(self, r0: int, weights: torch.Tensor) -> None:
        """weights  # [head, rows, key] of query rows q0 + r0 .. on keys k0 .. (the capture's positions)."""
        weights = weights.float()
        heads, rows, n_k = weights.shape
        q0, k0 = self.frame.q0 + r0, self.frame.k0
        if self.full is not None:
            self.full[:, q0:q0 + rows, k0:k0 + n_k] = weights.to(torch.float16)
        by_key = torch.zeros(heads, rows, self.rec.m, device=weights.device)
        by_key.index_add_(2, self.rec.coarse[k0:k0 + n_k], weights)  # keys summed per coarse token
        self.fold(r0, by_key, weights)

    @property
    def pooled_only(self) -> bool:
        """True when nothing but the coarse fold is wanted (no full map), so a linear-attention module can
        hand its rows already summed over the coarse keys (`linear`)."""
        return self.full is None

    def linear(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Sana's linear map, folded without forming it: Σ_{j in g} A_ij = φ(q_i)·(Σ_{j in g} φ(k_j)) / Z_i,
        Z_i = φ(q_i)·Σ_j φ(k_j) + 1e-15, for each coarse token g.  query  # [head, n_q, head_dim] and
        key  # [head, n_k, head_dim], both through φ = ReLU.  O(n (m + 1) d) instead of O(n² d)."""
        from capture.dit.attend import LINEAR_EPSILON

        heads, n_k, dim = key.shape
        k0 = self.frame.k0
        by_group = torch.zeros(heads, self.rec.m, dim, device=key.device)
        by_group.index_add_(1, self.rec.coarse[k0:k0 + n_k], key.float())  # [head, coarse, head_dim]
        total = key.float().sum(1)  # [head, head_dim]
        for r0 in range(0, query.shape[1], 256):
            q = query[:, r0:r0 + 256].float()
            z = (q @ total.unsqueeze(-1)) + LINEAR_EPSILON  # [head, rows, 1]
            self.fold(r0, (q @ by_group.transpose(1, 2)) / z, None)

    def fold(self, r0: int, by_key: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Fold rows q0 + r0 .. (by_key  # [head, rows, coarse]: their weights summed per coarse key) into the
        step's word maps and coarse map; `weights` (the rows themselves) give the text rows' image maps."""
        rec, layer = self.rec, self.layer
        rows = by_key.shape[1]
        q0, k0 = self.frame.q0 + r0, self.frame.k0
        image = rec.layout.image  # the block's image rows, as a range of its rows
        i0 = min(max(image.start - q0, 0), rows)
        i1 = min(max(image.stop - q0, 0), rows)
        if i1 > i0 and (self.kind == "cross" or not rec.cross):  # the word maps: image rows over the text columns
            first = q0 + i0 - image.start
            rec.x[layer][:, first:first + i1 - i0] += by_key[:, i0:i1, rec.columns]
        if self.kind == "cross":  # PixArt / Sana: the cross-attention gives the word maps, nothing else
            return
        weight = rec.row_weight[q0:q0 + rows].view(1, rows, 1)
        rec.c[layer].index_add_(1, rec.coarse[q0:q0 + rows], by_key * weight)  # coarse rows: members averaged
        if rec.y is not None and i1 - i0 < rows:  # text rows over the image keys at patch resolution
            text = [r for r in (range(0, i0), range(i1, rows)) if len(r)]
            ki0, ki1 = image.start - k0, image.stop - k0
            for r in text:
                on_image = weights[:, r.start:r.stop, ki0:ki1] * weight[:, r.start:r.stop]
                rec.y[layer].index_add_(1, rec.column_of[q0 + r.start:q0 + r.stop], on_image)

    def close(self) -> None:
        pass


class MapRecorder:
    """The capture recorder (module docstring).  `begin_step(i)` before each transformer call and, where the
    sampler can tell, `end_step()` after it; `start` once the run's token axis is known (pipelines: at the
    first transformer call); `finish()` at the end."""

    def __init__(self, plan: RecordPlan, steps: int, n_layers: int, n_heads: int, cross: bool, cross_heads: int,
                 writer):
        self.plan, self.n_steps, self.n_layers, self.n_heads = plan, steps, n_layers, n_heads
        self.cross, self.cross_heads = cross, cross_heads
        self.writer = writer
        self.wanted = plan.recorded(steps)
        self.slot = {s: i for i, s in enumerate(self.wanted)}
        self.step, self.row = 0, 0
        self.ended: set[int] = set()  # steps whose arrays went to the writer
        self.layout: TokenLayout | None = None
        self.frames: dict[int, list] = {}
        self.scratch: list[torch.Tensor] = []  # "full": the step means and their float16 copies being written
        self.blocks: list[tuple[int, int] | None] = [None] * n_layers  # "full": where each layer's block starts
        # "full", once written: per layer that start, or None for a whole map; None when every layer stores
        # its whole map (Capture.layout_info["blocks"], core.layouts.PaddedBlock)
        self.stored_blocks: list[list[int] | None] | None = None

    # ---- the recorder protocol of capture.dit.attention ---------------------------------------------
    def wants(self, layer: int) -> bool:
        return self.step in self.slot

    def wants_qk(self, layer: int) -> bool:
        return self.plan.mode == "split" and self.step in self.plan.kept

    def qk(self, layer: int, frame: Frame, query: torch.Tensor, key: torch.Tensor, kernel: str, scale: float) -> None:
        """Keep a layer's queries and keys of this step  # [head, n, head_dim] each, for recomputing its maps."""
        self.frames[layer] = [frame.q0, frame.k0, query.shape[1], key.shape[1], kernel, float(scale)]
        if query.shape == key.shape:
            qk = torch.stack([query, key]).float().cpu().numpy()  # [2, head, n, head_dim]
            self.writer.put(dit_capture.step_file("Q", self.step, layer), qk)  # now: one layer's is 100s of MB

    def open(self, layer: int, kind: str, frame: Frame, heads: int, n_q: int, n_k: int):
        if self.plan.mode == "full":
            slot = self.slot[self.step]
            if kind == "cross":
                return _FullSink(self.x[layer][slot])
            if self.t[layer] is None:  # the layer's first call: its maps are stored as the block it computes
                self.t[layer] = _spare.zeros((len(self.wanted), heads, n_q, n_k))
                self.blocks[layer] = (frame.q0, frame.k0)
            if self.blocks[layer] != (frame.q0, frame.k0) or self.t[layer].shape[2:] != (n_q, n_k):
                raise RuntimeError(f"layer {layer}'s attention changed its place on the token axis between steps")
            return _FullSink(self.t[layer][slot])
        full = None
        if kind != "cross" and self.step in self.plan.kept and layer in self.plan.full_layers:
            full = self.full.setdefault(layer, torch.zeros(heads, self.layout.n, self.layout.n, dtype=torch.float16,
                                                           device=self.device))
        return _SplitSink(self, layer, kind, frame, full)

    # ---- the run -------------------------------------------------------------------------------------
    def start(self, layout: TokenLayout, device: torch.device | str = "cpu") -> None:
        """Allocate for the run's token axis (idempotent)."""
        if self.layout is not None:
            return
        self.layout, self.device = layout, device
        n, heads, words = layout.n, self.n_heads, self.cross_heads or self.n_heads
        if self.plan.mode == "full":
            steps = len(self.wanted)
            self.t = [None] * self.n_layers  # [step, head, rows, keys] each: allocated at the layer's first call
            self.x = [_spare.zeros((steps, words, layout.n_image, len(layout.text)))
                      for _ in range(self.n_layers)] if self.cross else None
            return
        self.columns_list = layout.columns(grouped=True)
        self.pool = dit_capture.pool_for(layout.grid)
        self.region_grid = (-(-layout.grid[0] // self.pool), -(-layout.grid[1] // self.pool))
        n_regions, n_columns = self.region_grid[0] * self.region_grid[1], len(self.columns_list)
        self.m = n_regions + n_columns
        region_base, column_base = (n_columns, 0) if layout.text_first else (0, n_regions)
        coarse = np.zeros(n, np.int64)
        coarse[layout.image.start:layout.image.stop] = region_base + region_of(layout.grid, self.pool)
        column_of = np.zeros(n, np.int64)
        for c, (_label, positions) in enumerate(self.columns_list):
            coarse[positions] = column_base + c
            column_of[positions] = c
        counts = np.bincount(coarse, minlength=self.m)
        as_tensor = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        self.coarse, self.column_of = as_tensor(coarse), as_tensor(column_of)
        self.row_weight = as_tensor((1.0 / counts[coarse]).astype(np.float32))
        self.columns = slice(column_base, column_base + n_columns)
        self.region_slice = slice(region_base, region_base + n_regions)
        self.mean = torch.zeros(self.n_layers, heads, self.m, self.m, device=device)
        self._fresh()

    def _fresh(self) -> None:
        layout, heads, words = self.layout, self.n_heads, self.cross_heads or self.n_heads
        zeros = lambda *shape: torch.zeros(*shape, device=self.device)  # noqa: E731
        self.x = [zeros(words, layout.n_image, len(self.columns_list)) for _ in range(self.n_layers)]
        self.y = None if self.cross else [zeros(heads, len(self.columns_list), layout.n_image)
                                          for _ in range(self.n_layers)]
        self.c = [zeros(heads, self.m, self.m) for _ in range(self.n_layers)]
        self.full: dict[int, torch.Tensor] = {}

    def begin_step(self, step: int) -> None:
        if step != self.step:
            self.end_step()
        self.step = step

    def end_step(self) -> None:
        """The transformer call of the current step is over: hand what it completed to the writer, so the
        writing overlaps the sampler's next step (or its decoding after the last)."""
        if self.layout is None or self.step not in self.slot or self.step in self.ended:
            return
        self.ended.add(self.step)
        if self.plan.mode == "split":
            arrays = self._end_step()
            if self.step == self.wanted[-1]:  # the coarse maps' step mean: the generic views' maps
                arrays += view_items(list((self.mean / len(self.wanted)).cpu()))
            self.writer.put_many(arrays)
        elif self.step == self.wanted[-1]:
            self._end_full()

    def _end_full(self) -> None:
        """All steps of a "full" capture are in: its maps, their step means (the generic views' maps) and
        the means' thumbnails go to the writer, in one cache transaction."""
        n = self.layout.n
        for layer, t in enumerate(self.t):  # a layer never called (nothing recorded): zero maps
            if t is None:
                self.t[layer], self.blocks[layer] = _spare.zeros((len(self.wanted), self.n_heads, n, n)), (0, 0)
        arrays = [(dit_capture.steps_name(layer), t.numpy()) for layer, t in enumerate(self.t)]
        if self.cross:
            arrays += [(dit_capture.cross_name(layer), x.numpy()) for layer, x in enumerate(self.x)]
        means = [step_mean(t, _spare.empty(t.shape[1:], torch.float32)) for t in self.t]
        views = [_spare.empty(m.shape) for m in means]
        blocks = [None if t.shape[2:] == (n, n) else list(block) for t, block in zip(self.t, self.blocks)]
        self.stored_blocks = blocks if any(blocks) else None
        self.writer.put_many(arrays + view_items(means, views, blocks, n))
        self.scratch = means + views

    def _end_step(self) -> list[tuple[str, np.ndarray]]:
        """One step's arrays, for the writer; the next step's start empty."""
        f16 = lambda t: t.to(torch.float16).cpu().numpy()  # noqa: E731
        step = self.step
        coarse = torch.stack(self.c)  # [layer, head, m, m]
        arrays = [(dit_capture.step_file("XS", step), f16(torch.stack(self.x))),
                  (dit_capture.step_file("PS", step), f16(coarse[:, :, self.region_slice, self.region_slice]))]
        if self.y is not None:
            arrays.append((dit_capture.step_file("YS", step), f16(torch.stack(self.y))))
        arrays += [(dit_capture.step_file("T", step, layer), full.cpu().numpy()) for layer, full in self.full.items()]
        self.mean += coarse
        self._fresh()
        return arrays

    def finish(self) -> None:
        """End the run: whatever the last step completed goes to the writer, with the per-layer maps the
        generic views read (full: the step mean of T; split: the coarse maps' step mean)."""
        self.end_step()
        if not self.wanted and self.plan.mode == "full":  # nothing recorded: empty step axes, zero maps
            self._end_full()

    def release(self) -> None:
        """The writer is done with this capture's arrays: a "full" capture's buffers go back for the next
        capture to reuse (`_Spare`)."""
        if self.plan.mode == "full" and self.layout is not None:
            _spare.give(self.t + (self.x or []) + self.scratch)
            self.t, self.x, self.scratch = [], None, []

    def tokens_and_info(self) -> tuple[list[str], dict[str, range], dict]:
        """The capture's tokens, spans and layout_info: "dit" (core.dit_capture.DitLayout, unless the
        defaults) and "blocks" (where layers store a block of their maps: stored_blocks)."""
        layout = self.layout
        info = DitLayout(mode=self.plan.mode, cross=self.cross, cross_heads=self.cross_heads if self.cross else 0)
        if self.plan.mode == "full":
            tokens, spans = layout.labels(), layout.spans()
        else:
            rows, cols = self.region_grid
            regions = [f"region({r},{c})" for r in range(rows) for c in range(cols)]
            columns = [label for label, _p in self.columns_list]
            tokens = columns + regions if layout.text_first else regions + columns
            image = range(len(columns), len(tokens)) if layout.text_first else range(0, len(regions))
            text = range(0, len(columns)) if layout.text_first else range(len(regions), len(tokens))
            spans = {"image": image, "text": text}  # and the text's spans, on its columns
            spans.update({name: range(text.start + r.start, text.start + r.stop)
                          for name, r in column_spans(layout).items()})
            info.labels, info.image = layout.labels(), (layout.image.start, layout.image.stop)
            info.text, info.pool = (layout.text_span.start, layout.text_span.stop), self.pool
            info.regions = (rows, cols)
            info.columns = [[label, list(p)] for label, p in self.columns_list]
            info.kept = [self.slot[s] for s in self.plan.kept if s in self.slot]
            info.full_layers = list(self.plan.full_layers)
            info.frames = [self.frames.get(layer) for layer in range(self.n_layers)]
        layout_info = {} if info == DitLayout() else {"dit": dataclasses.asdict(info)}
        if self.stored_blocks:
            layout_info["blocks"] = self.stored_blocks
        return tokens, spans, layout_info


__all__ = ["MapRecorder", "RecordPlan"]
