"""Recording a DiT capture: which maps are kept, the recorder that keeps them, and what it costs.

`RecordPlan` picks the layout of core.dit_capture: "full" when every map of every recorded step fits
in core.dit_capture.FULL_BYTES and one step's in FULL_STEP_BYTES (shapes-dit, most tiny pipelines), else
"split": every step's and layer's image -> text and text -> image maps for every head, image -> image
pooled into regions, a coarse map per
layer (regions and text columns, averaged over the steps) for the generic views, the queries and keys
of the kept steps (default: the middle step) so any map of those steps is recomputed on request, and
the full maps of the kept steps at the layers asked for (`full_layers`, none by default).

`MapRecorder` is a capture.dit.attention recorder: the processors hand it each module's map of the
conditional batch row, block by block, on the device the model runs on; it folds them into the kept
arrays there (sums over the coarse tokens in a few slices: capture.dit.fold), moves one step's arrays
to the CPU as float16 when the step ends (a small capture's steps several to an array) and writes them,
a large group on a background thread while the next step runs (capture.dit.write).  A "full" capture's
buffers come from and go back to a small pool (capture.dit.buffers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from capture.dit.attend import Frame
from capture.dit.buffers import spare, step_mean
from capture.dit.fold import CoarseFold, pieces_of
from capture.dit.tokens import TokenLayout, column_spans
from capture.dit.write import INLINE_BYTES, view_items
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
            step_bytes = n_layers * n_heads * n * n * 2  # one step's maps, float16
            fits = step_bytes <= dit_capture.FULL_STEP_BYTES and recorded * step_bytes <= dit_capture.FULL_BYTES
            mode = "full" if fits else "split"
        kept = tuple(s for s in (self.kept if self.kept is not None else (steps // 2,)) if 0 <= s < steps)
        return RecordPlan(self.steps if mode == "full" else None, mode, kept, tuple(self.full_layers))

    def recorded(self, steps: int) -> list[int]:
        return [s for s in (sorted(self.steps) if self.steps is not None else range(steps)) if 0 <= s < steps]


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
        _heads, rows, n_k = weights.shape
        q0, k0 = self.frame.q0 + r0, self.frame.k0
        if self.full is not None:
            self.full[:, q0:q0 + rows, k0:k0 + n_k] = weights.to(torch.float16)
        self.fold(r0, self.rec.folds.fold(weights, k0), weights)  # [head, rows, coarse]: keys summed

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

        by_group = self.rec.folds.fold(key.float(), self.frame.k0, dim=-2)  # [head, coarse, head_dim]
        total = key.float().sum(1)  # [head, head_dim]
        for r0 in range(0, query.shape[1], 256):
            q = query[:, r0:r0 + 256].float()
            z = (q @ total.unsqueeze(-1)) + LINEAR_EPSILON  # [head, rows, 1]
            self.fold(r0, (q @ by_group.transpose(1, 2)) / z, None)

    def fold(self, r0: int, by_key: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Fold rows q0 + r0 .. (by_key  # [head, rows, coarse]: their weights summed per coarse key) into the
        step's word maps and coarse map; `weights` (the rows themselves) give the text rows' image maps."""
        rec, layer = self.rec, self.layer
        words = rec.word_slot.get(layer)  # its place in the word maps (None: a layer within one part of the axis)
        rows = by_key.shape[1]
        q0, k0 = self.frame.q0 + r0, self.frame.k0
        image = rec.layout.image  # the block's image rows, as a range of its rows
        i0 = min(max(image.start - q0, 0), rows)
        i1 = min(max(image.stop - q0, 0), rows)
        if i1 > i0 and words is not None and (self.kind == "cross" or not rec.cross):  # image rows over text columns
            first = q0 + i0 - image.start
            rec.x[words][:, first:first + i1 - i0] += by_key[:, i0:i1, rec.columns]
        if self.kind == "cross":  # PixArt / Sana: the cross-attention gives the word maps, nothing else
            return
        # coarse rows: their members summed here, averaged when the step ends (MapRecorder.per_member)
        rec.folds.fold(by_key, q0, into=rec.c[layer], dim=-2)
        ki0, ki1 = image.start - k0, image.stop - k0  # the image keys among the block's
        image_keys = weights is not None and 0 <= ki0 and ki1 <= weights.shape[2]  # none in a caption refiner's
        if rec.y is not None and i1 - i0 < rows and image_keys and words is not None:  # text rows over the image
            for r in (range(0, i0), range(i1, rows)):
                if len(r):
                    on_image = weights[:, r.start:r.stop, ki0:ki1]  # [head, rows, image]
                    rec.y[words] += rec.folds.fold(on_image, q0 + r.start, dim=-2)[:, rec.columns]

    def close(self) -> None:
        pass


class MapRecorder:
    """The capture recorder (module docstring).  `begin_step(i)` before each transformer call and, where the
    sampler can tell, `end_step()` after it; `start` once the run's token axis is known (pipelines: at the
    first transformer call); `finish()` at the end."""

    def __init__(self, plan: RecordPlan, steps: int, n_layers: int, n_heads: int, cross: bool, cross_heads: int,
                 writer, word_layers: list[int] | None = None):
        self.plan, self.n_steps, self.n_layers, self.n_heads = plan, steps, n_layers, n_heads
        # "split": the layers whose picture reads the text (None: all); the others (SD3.5's extra self-attention, the
        # refiners of Lumina 2 and Z-Image) attend within one part of the axis and store no word maps
        self.word_layers = list(range(n_layers)) if word_layers is None else list(word_layers)
        self.word_slot = {layer: i for i, layer in enumerate(self.word_layers)}
        self.cross, self.cross_heads = cross, cross_heads
        self.writer = writer
        self.wanted = plan.recorded(steps)
        self.slot = {s: i for i, s in enumerate(self.wanted)}
        self.step, self.row = 0, 0
        self.ended: set[int] = set()  # steps whose arrays went to the writer
        self.layout: TokenLayout | None = None
        self.frames: dict[int, list] = {}
        self.masks: dict[int, tuple[str, torch.Tensor]] = {}  # step -> its last stored mask (name, additive)
        self.scratch: list[torch.Tensor] = []  # "full": the step means and their float16 copies being written
        self.blocks: list[tuple[int, int] | None] = [None] * n_layers  # "full": where each layer's block starts
        # "full", once written: per layer that start, or None for a whole map; None when every layer stores
        # its whole map (Capture.layout_info["blocks"], core.layouts.PaddedBlock)
        self.stored_blocks: list[list[int] | None] | None = None
        self.words = 0  # "full", cross-attention: text columns stored in X (`_end_full`)

    # ---- the recorder protocol of capture.dit.attention ---------------------------------------------
    def wants(self, layer: int) -> bool:
        return self.step in self.slot

    def wants_qk(self, layer: int) -> bool:
        return self.plan.mode == "split" and self.step in self.plan.kept

    def qk(self, layer: int, frame: Frame, query: torch.Tensor, key: torch.Tensor, kernel: str, scale: float,
           mask: torch.Tensor | None = None) -> None:
        """Keep a layer's queries and keys of this step  # [head, n, head_dim] each, for recomputing its maps,
        and its attention mask (Chroma's padding; additive, float16), once per step while the layers share it
        (one n x n mask: 42 MB at Chroma's 1,024², counted by the estimate: Family.joint_mask)."""
        name = None
        if mask is not None:
            additive = (torch.zeros(mask.shape, dtype=torch.float16).masked_fill_(~mask.cpu(), float("-inf"))
                        if mask.dtype == torch.bool else mask.to(torch.float16).cpu())
            held = self.masks.get(self.step)
            if held is None or held[1].shape != additive.shape or not torch.equal(held[1], additive):
                held = self.masks[self.step] = (dit_capture.step_file("M", self.step, layer), additive)
                self.writer.put(held[0], additive.numpy())
            name = held[0]
        self.frames[layer] = [frame.q0, frame.k0, query.shape[1], key.shape[1], kernel, float(scale), name]
        if query.shape == key.shape:
            qk = torch.stack([query, key]).float().cpu().numpy()  # [2, head, n, head_dim]
            self.writer.put(dit_capture.step_file("Q", self.step, layer), qk)  # now: one layer's is 100s of MB

    def open(self, layer: int, kind: str, frame: Frame, heads: int, n_q: int, n_k: int):
        if self.plan.mode == "full":
            slot = self.slot[self.step]
            if kind == "cross":
                return _FullSink(self.x[layer][slot])
            if self.t[layer] is None:  # the layer's first call: its maps are stored as the block it computes
                self.t[layer] = spare.zeros((len(self.wanted), heads, n_q, n_k))
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
            self.x = [spare.zeros((steps, words, layout.n_image, len(layout.text)))
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
        for c, (_label, positions) in enumerate(self.columns_list):
            coarse[positions] = column_base + c
        counts = np.bincount(coarse, minlength=self.m)
        self.coarse = torch.as_tensor(coarse, device=device)
        pieces = pieces_of(layout.image, self.pool, region_base, column_base, [p for _l, p in self.columns_list])
        self.folds = CoarseFold(self.coarse, self.m, pieces)
        self.per_member = torch.as_tensor((1.0 / counts).astype(np.float32), device=device)  # [coarse]
        self.columns = slice(column_base, column_base + n_columns)
        self.region_slice = slice(region_base, region_base + n_regions)
        self.mean = torch.zeros(self.n_layers, heads, self.m, self.m, device=device)
        # steps per stored XS / YS / PS array (0: the first step sets it), the chunk being filled and its steps
        self.chunk, self.held, self.held_first, self.held_steps, self.x = 0, {}, 0, [], None
        self._fresh()

    def _fresh(self) -> None:
        """The step's arrays, zero: allocated once per run  # [layer, ...] each, zeroed for every step."""
        if self.x is None:
            layout, heads, words = self.layout, self.n_heads, self.cross_heads or self.n_heads
            zeros = lambda *shape: torch.zeros(*shape, device=self.device)  # noqa: E731
            n_words = len(self.word_layers)
            self.x = zeros(n_words, words, layout.n_image, len(self.columns_list))
            self.y = None if self.cross else zeros(n_words, heads, len(self.columns_list), layout.n_image)
            self.c = zeros(self.n_layers, heads, self.m, self.m)
        else:
            for t in (self.x, self.y, self.c):
                if t is not None:
                    t.zero_()
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
                self.t[layer], self.blocks[layer] = spare.zeros((len(self.wanted), self.n_heads, n, n)), (0, 0)
        arrays = [(dit_capture.steps_name(layer), t.numpy()) for layer, t in enumerate(self.t)]
        if self.cross:  # the word maps up to the last text column any of them reads (masked padding reads 0)
            read = torch.stack([x.ne(0).flatten(0, 2).any(0) for x in self.x]).any(0)  # [text]
            self.words = int(read.nonzero().max()) + 1 if bool(read.any()) else 1
            arrays += [(dit_capture.cross_name(layer), x[..., :self.words].numpy()) for layer, x in enumerate(self.x)]
        means = [step_mean(t, spare.empty(t.shape[1:], torch.float32)) for t in self.t]
        views = [spare.empty(m.shape) for m in means]
        blocks = [None if t.shape[2:] == (n, n) else list(block) for t, block in zip(self.t, self.blocks)]
        self.stored_blocks = blocks if any(blocks) else None
        self.writer.put_many(arrays + view_items(means, views, blocks, n))
        self.scratch = means + views

    def _end_step(self) -> list[tuple[str, np.ndarray]]:
        """One step's arrays for the writer (or, `chunk` > 1, those of the chunk it ends), as float16; the
        next step's start empty.  The first step sets `chunk`: as many steps per stored array as fit
        INLINE_BYTES, so a small capture stores 3 arrays, not 3 per step (a cache entry costs ~0.2 ms)."""
        step, per_member = self.step, self.per_member.view(-1, 1)
        coarse = self.c.mul_(per_member)  # [layer, head, m, m]: the coarse rows' sums over members -> means
        kinds = {"XS": self.x, "PS": coarse[:, :, self.region_slice, self.region_slice]}
        if self.y is not None:
            kinds["YS"] = self.y.mul_(per_member[self.columns])
        if self.chunk == 0:  # INLINE_BYTES over the bytes of one step's float16 arrays
            self.chunk = max(1, min(len(self.wanted), INLINE_BYTES // sum(t.numel() * 2 for t in kinds.values())))
        arrays = [(dit_capture.step_file("T", step, layer), full.cpu().numpy()) for layer, full in self.full.items()]
        if self.chunk == 1:
            arrays += [(dit_capture.step_file(kind, step), t.to(torch.float16).cpu().numpy())
                       for kind, t in kinds.items()]
        else:
            first = step - step % self.chunk
            if not self.held:  # the chunk's first step: its arrays  # [step, layer, ...] float16
                length = min(self.chunk, self.wanted[-1] + 1 - first)
                self.held = {kind: np.empty((length, *t.shape), np.float16) for kind, t in kinds.items()}
                self.held_first, self.held_steps = first, []
            if first != self.held_first:
                raise RuntimeError(f"sampling steps {self.held_first}-{step - 1} were not all recorded")
            for kind, t in kinds.items():
                torch.from_numpy(self.held[kind][step - first]).copy_(t)
            self.held_steps.append(step)
            if step - first == len(self.held["XS"]) - 1:
                if len(self.held_steps) != len(self.held["XS"]):
                    raise RuntimeError(f"sampling steps {first}-{step} were not all recorded")
                arrays += [(dit_capture.step_file(kind, first), held) for kind, held in self.held.items()]
                self.held = {}
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
        capture to reuse (`capture.dit.buffers.spare`)."""
        if self.plan.mode == "full" and self.layout is not None:
            spare.give(self.t + (self.x or []) + self.scratch)
            self.t, self.x, self.scratch = [], None, []

    def tokens_and_info(self) -> tuple[list[str], dict[str, range], dict]:
        """The capture's tokens, spans and layout_info: "dit" (core.dit_capture.DitLayout, unless the
        defaults) and "blocks" (where layers store a block of their maps: stored_blocks)."""
        layout = self.layout
        info = DitLayout(mode=self.plan.mode, cross=self.cross, cross_heads=self.cross_heads if self.cross else 0)
        if self.plan.mode == "full":
            tokens, spans = layout.labels(), layout.spans()
            info.words = self.words if self.words < len(layout.text) else 0
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
            info.chunk = self.chunk
            info.full_layers = list(self.plan.full_layers)
            info.frames = [self.frames.get(layer) for layer in range(self.n_layers)]
            info.word_layers = self.word_layers if len(self.word_layers) < self.n_layers else []
        layout_info = {} if info == DitLayout() else {"dit": info.to_json()}
        if self.stored_blocks:
            layout_info["blocks"] = self.stored_blocks
        return tokens, spans, layout_info


__all__ = ["MapRecorder", "RecordPlan"]
