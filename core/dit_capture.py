"""Reading a DiT capture back (torch-free: pages and analytics may import it).

A DiT capture (capture/dit/adapter.py) stores one of two layouts, said by `layout(capture).mode`.

"full" (small maps: shapes-dit, tiny pipelines; every map of every step fits in FULL_BYTES, one step's in
FULL_STEP_BYTES):

    T007   layer 7's maps at every recorded sampling step  # [step, head, query, key] float16
           (a memory map: one step of one head reads only those bytes; a layer whose module sees the
           image tokens only, PixArt's and Sana's self-attention or SD3.5's extra one, stores that
           block and is padded with zeros on read, as its L007 is: Capture.layout_info["blocks"])
    L007   layer 7's maps averaged over the recorded steps  # [head, query, key] float16
           (what `Capture.attention(7)` returns, so every generic view works on a DiT capture)
    X007   cross-attention families only (PixArt, Sana): the word maps of layer 7's cross-attention
           # [step, cross head, image, text] float16, the text cut after the last column any map reads
           (`layout(capture).words`: the masked padding after it reads 0 and is padded back on read)
    overviewNNNN, generated (the image  # [H, W, 3] uint8), meta

"split" (real sizes: a full SD3 map at 1,024² is ~4,400 tokens square per head, layer and step):

    XS012  step 12's image -> text maps of every layer  # [layer, head, image, column] float16
    YS012  step 12's text -> image maps (joint attention only)  # [layer, head, column, image] float16
    PS012  step 12's image -> image maps pooled into regions  # [layer, head, region, region] float16
           (a small capture stores `layout(capture).chunk` steps per array, with a step axis first: XS008
           holds steps 8 .. 8 + chunk - 1)
    L007   layer 7's coarse map averaged over the steps  # [head, m, m] float16, m = regions + columns
           (the generic views see regions "region(r,c)" and columns; rows still sum to 1)
    Q012_007  queries and keys of layer 7 at kept step 12  # [2, head, n, head_dim] float32, from
           which any map of that step is recomputed on request (`step_attention`)
    M012_000  the attention mask of kept step 12 (Chroma's), additive float16, named in the frames of
           the layers it applies to (a layer whose mask differs stores its own)
    T012_007  layer 7's full map at step 12, for the layers asked for  # [head, n, n] float16

Axis order of full maps: the model's (`layout(capture).labels`): image tokens "patch(r,c)" row by row
and text tokens, image first except Flux.  A layer's full map is its self- or joint-attention; a
cross-attention family's word maps (image -> text) come from its cross-attention modules, which may
have another head count (`layout(capture).cross_heads`).  Columns: every text token, and in "split"
captures each run of padding tokens as one column (the attention it receives summed; what it pays
averaged).  `Output.recorded_steps[i]` is the sampling step of index i of the step axis,
`Output.timesteps[i]` its scheduler timestep (1000 = pure noise).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from core.errors import CorruptEntry, InputError
from core.types import Capture

IMAGE_NAME = "generated"
# a capture whose full maps of every step fit here keeps them all ("full"): their writing is its cost (this
# machine's disk takes ~470 MB/s once the page cache throttles, so 16 MiB ~35 ms; a tiny Flux's 20 steps,
# 53 MB, took 3x the sampling); anything larger is "split", as every real pipeline at real sizes is
FULL_BYTES = 16 * 2**20
# ... and whose one step's maps fit here: above it, writing a step's maps costs more than the split layout's fold
# (tiny pipelines at 2 steps, default capture against plain, full / split: Flux's 2.7 MB a step 1.53 / 1.39,
# Chroma's 2.7 MB 1.34 / 1.26, SD3's 1.3 MB 1.44 / 1.49; shapes-dit's 0.2 MB stays full)
FULL_STEP_BYTES = 2 * 2**20
REGION_SIDE = 16  # "split": image patches are pooled into at most 16 x 16 regions for the coarse maps
SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "<|startoftext|>", "<|endoftext|>", "</s>", "<pad>", "<bos>", "<eos>",
           "<s>", "<unk>", "!", "<none>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",  # + Qwen's chat
           "[gMASK]", "<sop>",  # GLM's opening
           "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"}  # Mistral's chat markers (FLUX.2 [dev])
BYTE_SPACE = "ĠĊĉ"  # byte-level BPE's space, newline and tab: a token of these alone is no word


def steps_name(layer: int) -> str:
    return f"T{layer:03d}"


def cross_name(layer: int) -> str:
    return f"X{layer:03d}"


def step_file(kind: str, step: int, layer: int | None = None) -> str:
    """Names of the per-step arrays of a "split" capture: XS012, YS012, PS012, Q012_007, T012_007."""
    return f"{kind}{step:03d}" + ("" if layer is None else f"_{layer:03d}")


@dataclass
class DitLayout:
    """How a DiT capture is stored (Capture.layout_info["dit"]); the defaults are those of captures made
    before pipelines existed (shapes-dit, "full", joint attention, image first)."""

    mode: str = "full"
    cross: bool = False  # a cross-attention family: word maps in X / XS from the cross modules
    cross_heads: int = 0  # their heads (0: the layer's own)
    labels: list[str] = field(default_factory=list)  # "split": the full axis (the capture's tokens are coarse)
    image: tuple[int, int] = (0, 0)  # "split": image and text ranges on the full axis
    text: tuple[int, int] = (0, 0)
    pool: int = 1  # "split": patches per region side
    regions: tuple[int, int] = (0, 0)
    columns: list = field(default_factory=list)  # "split": [label, [full-axis positions]] per column
    kept: list[int] = field(default_factory=list)  # "split": step indices whose queries and keys are kept
    full_layers: list[int] = field(default_factory=list)  # "split": layers whose full maps are kept at `kept`
    frames: list = field(default_factory=list)  # "split": per layer [q0, k0, n_q, n_k, kernel, scale, mask name]
    chunk: int = 1  # "split": steps per stored XS / YS / PS array (> 1: the arrays have a step axis first)
    words: int = 0  # "full", cross-attention: text columns stored in X (the rest read 0); 0 = all of them
    # "split": the layers whose word maps XS / YS store (the others attend within the image or the caption alone and
    # read 0: SD3.5's extra self-attention, Lumina 2's and Z-Image's refiners); empty = every layer
    word_layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        """Its fields as they are (dataclasses.asdict copies every list of labels and positions, item by item:
        1.2 ms for a tiny PixArt's 364 labels and 300 columns, against a 16 ms plain run)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict | None) -> "DitLayout":
        data = dict(data or {})
        for name in ("image", "text", "regions"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


def layout(capture: Capture) -> DitLayout:
    """How `capture` is stored (a capture-like object without layout_info: the defaults)."""
    return DitLayout.from_json(getattr(capture, "layout_info", {}).get("dit"))


def is_dit(capture: Capture) -> bool:
    return capture.meta.modality == "dit"


def generated_image(capture: Capture) -> np.ndarray | None:
    """image  # [H, W, 3] uint8 that the run sampled, or None."""
    if capture.store is None:
        return None
    try:
        return np.asarray(capture.store.get_array(capture.key, IMAGE_NAME))
    except CorruptEntry:
        return None


def n_steps(capture: Capture) -> int:
    return len(capture.output.recorded_steps)


def region_of(grid: tuple[int, int], pool: int) -> np.ndarray:
    """[patch] -> region index: patch (r, c) of a row-major grid lies in region (r // pool, c // pool)."""
    rows, cols = grid
    region_cols = -(-cols // pool)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return (r // pool) * region_cols + c // pool


def pool_for(grid: tuple[int, int]) -> int:
    """Patches per region side so that the regions fit REGION_SIDE x REGION_SIDE."""
    return max(1, -(-max(grid) // REGION_SIDE))


# ---- the maps ------------------------------------------------------------------------------------------

def kept_steps(text: str) -> tuple[int, ...]:
    """"5,20" (a link's `keep`, the CLI's --keep) as RunSpec.keep: the steps, sorted, each once; ValueError
    for anything but step numbers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"kept steps are sampling step numbers, e.g. 5,20, not {text[:20]!r}")
    return tuple(sorted({int(p) for p in parts}))


def full_steps(capture: Capture) -> list[int]:
    """The sampling steps whose full maps the capture holds: every recorded one ("full"), else the kept ones
    (their maps recomputed from the stored queries and keys)."""
    recorded, info = capture.output.recorded_steps, layout(capture)
    return list(recorded) if info.mode == "full" else [recorded[i] for i in info.kept]


def _check(capture: Capture, index: int) -> None:
    if not 0 <= index < n_steps(capture):
        raise IndexError(f"step index {index} out of range 0..{n_steps(capture) - 1}")


def all_steps(capture: Capture, layer: int) -> np.ndarray:
    """attn  # [step, head, query, key] float16 of one layer (a memory map); "full" captures only."""
    if layout(capture).mode != "full":
        raise InputError("This capture keeps full maps at its kept steps only (core.dit_capture.step_attention).")
    return _steps(capture, layer)


def _steps(capture: Capture, layer: int):
    """A "full" capture's T array of `layer`  # [step, head, query, key] (a block padded on read where the
    capture stores only the block the maps can be non-zero in: Capture.padded)."""
    return capture.padded(capture.store.get_array(capture.key, steps_name(layer)), layer)


def step_attention(capture: Capture, index: int, layer: int) -> np.ndarray:
    """attn  # [head, n, n] float16 of `layer` at recorded step index `index` on the full axis: stored, or
    recomputed from the kept queries and keys of that step ("split" captures)."""
    _check(capture, index)
    info = layout(capture)
    if info.mode == "full":
        return np.asarray(_steps(capture, layer)[index])
    if index not in info.kept:
        kept = ", ".join(str(capture.output.recorded_steps[i]) for i in info.kept) or "none"
        raise InputError(f"This capture keeps full maps at sampling steps {kept} only; its word maps, text -> image "
                         "maps and pooled image maps cover every step.")
    if layer in info.full_layers:
        return np.asarray(capture.store.get_array(capture.key, step_file("T", index, layer)))
    return recompute(capture, index, layer)


def recompute(capture: Capture, index: int, layer: int) -> np.ndarray:
    """attn  # [head, n, n] float16 from the kept queries and keys (softmax(q kᵀ · scale), or Sana's linear
    map φ(q)·φ(k) normalised per row), placed on the full axis; rows the module does not compute stay 0."""
    q0, k0, n_q, n_k = layout(capture).frames[layer][:4]
    n = len(layout(capture).labels)
    kept = _Kept(capture, index, layer)
    out = np.zeros((kept.query.shape[0], n, n), dtype=np.float16)
    for r0 in range(0, n_q, 512):
        r1 = min(n_q, r0 + 512)
        out[:, q0 + r0:q0 + r1, k0:k0 + n_k] = kept.weights(r0, r1)
    return out


class _Kept:
    """The kept queries, keys and mask of one layer at kept step `index` of a "split" capture."""

    def __init__(self, capture: Capture, index: int, layer: int):
        q0, k0, n_q, n_k, self.kernel, self.scale, *masked = layout(capture).frames[layer]  # mask: since Chroma
        self.mask = None if not masked or masked[0] is None else \
            np.asarray(capture.store.get_array(capture.key, masked[0]), dtype=np.float32)  # additive, broadcastable
        qk = capture.store.get_array(capture.key, step_file("Q", index, layer))  # [2, head, n, head_dim] memory map
        self.query, self.key = qk[0], np.asarray(qk[1], dtype=np.float32)  # [head, n_q | n_k, head_dim]

    def weights(self, r0: int, r1: int) -> np.ndarray:
        """The module's query rows r0 .. r1 - 1 over its keys  # [head, rows, n_k] float32."""
        scores = np.matmul(np.asarray(self.query[:, r0:r1], dtype=np.float32), self.key.transpose(0, 2, 1))
        if self.kernel == "linear":
            return scores / (scores.sum(-1, keepdims=True) + np.float32(1e-15))
        scores *= np.float32(self.scale)
        if self.mask is not None:
            scores += self.mask[..., r0:r1, :] if self.mask.shape[-2] > 1 else self.mask
        scores -= scores.max(-1, keepdims=True)
        weights = np.exp(scores)
        return weights / weights.sum(-1, keepdims=True)


def patch_reads(capture: Capture, index: int | None, layer: int, patch: tuple[int, int]) -> tuple[np.ndarray, int]:
    """What image patch `patch` = (row, col) reads of the image in `layer`'s self- or joint-attention:
    attn  # [head, rows, cols] float32 on the patch grid, and the side of the cells it was read at, in patches.

    `index`: a recorded step, or None for the mean over the steps.  Side 1 where the capture holds that map
    (a "full" capture; a "split" one at its kept steps, the one row recomputed from the kept queries and
    keys); else the capture's pool (a "split" capture's pooled maps): the row of the patch's region (its
    patches' rows averaged) over the regions, each region's attention spread evenly over its patches."""
    info, image = layout(capture), capture.spans["image"]
    rows, cols = capture.meta.grid
    if info.mode == "full":
        at = image.start + patch[0] * cols + patch[1]  # the patch on the capture's axis
        line = capture.attention(layer)[:, at:at + 1, image.start:image.stop] if index is None else \
            _steps(capture, layer)[index, :, at:at + 1, image.start:image.stop]  # [head, 1, image]
        return np.asarray(line, dtype=np.float32).reshape(-1, rows, cols), 1
    if index is not None and index in info.kept:  # recomputed: the one row, from the kept queries and keys
        (i0, i1), (q0, k0, n_q, n_k) = info.image, info.frames[layer][:4]
        at = i0 + patch[0] * cols + patch[1]  # on the full axis
        line = np.zeros((capture.meta.n_heads, len(info.labels)), np.float32)  # [head, key]
        if layer in info.full_layers:
            line[:] = capture.store.get_array(capture.key, step_file("T", index, layer))[:, at]
        elif q0 <= at < q0 + n_q:
            line[:, k0:k0 + n_k] = _Kept(capture, index, layer).weights(at - q0, at - q0 + 1)[:, 0]
        return line[:, i0:i1].reshape(-1, rows, cols), 1
    regions = region_of((rows, cols), info.pool)
    counts = np.bincount(regions, minlength=info.regions[0] * info.regions[1])
    region = image.start + regions[patch[0] * cols + patch[1]]  # the patch's region on the coarse axis
    coarse = capture.attention(layer)[:, region, image.start:image.stop] if index is None else \
        image_regions(capture, index)[layer][:, region - image.start]  # [head, region]
    per_patch = np.asarray(coarse, dtype=np.float32)[:, regions] / counts[regions]  # [head, patch]
    return per_patch.reshape(-1, rows, cols), info.pool


def _per_step(capture: Capture, kind: str, steps) -> np.ndarray:
    """The "split" arrays of `kind` ("XS", "YS", "PS") at the recorded steps `steps`, stacked; the word maps (XS,
    YS) of the layers that store none (`DitLayout.word_layers`) read as zeros."""
    info = layout(capture)
    chunk = info.chunk

    def one(step: int) -> np.ndarray:
        if chunk == 1:
            return capture.store.get_array(capture.key, step_file(kind, step))
        return capture.store.get_array(capture.key, step_file(kind, step - step % chunk))[step % chunk]

    stacked = np.stack([np.asarray(one(s), dtype=np.float32) for s in steps])  # [step, stored layer, ...]
    if kind == "PS" or not info.word_layers:
        return stacked
    every = np.zeros((stacked.shape[0], capture.meta.n_layers, *stacked.shape[2:]), np.float32)
    every[:, info.word_layers] = stacked
    return every


def image_to_text(capture: Capture, index: int | None = None) -> np.ndarray:
    """a  # [step, layer, head, image, column] float32: image-token queries over the text columns, every
    layer; index None = every recorded step, else that one step (step axis of length 1).  Cross-attention
    families: the cross-attention's heads."""
    steps = range(n_steps(capture)) if index is None else [index]
    info = layout(capture)
    if info.mode == "split":
        return _per_step(capture, "XS", steps)
    image, text = capture.spans["image"], capture.spans["text"]
    arrays = []
    for layer in range(capture.meta.n_layers):
        if info.cross:  # [step, head, image, words]: the columns after `words` read 0 (masked padding)
            stored = capture.store.get_array(capture.key, cross_name(layer))
            words = np.zeros((len(steps), *stored.shape[1:3], len(text)), np.float32)
            for i, s in enumerate(steps):
                words[i, ..., :stored.shape[3]] = stored[s]
            arrays.append(words)
            continue
        stored = _steps(capture, layer)
        arrays.append(np.stack([np.asarray(stored[s, :, image.start:image.stop, text.start:text.stop],
                                           dtype=np.float32) for s in steps]))
    return np.stack(arrays, axis=1)


def text_to_image(capture: Capture, index: int | None = None) -> np.ndarray:
    """a  # [step, layer, head, column, image] float32: what the text tokens read of the image (joint
    attention only; a cross-attention family's text is never a query)."""
    info = layout(capture)
    if info.cross:
        raise InputError(f"{capture.meta.name} reads the prompt through cross-attention: its text tokens never "
                         "attend to the image.")
    steps = range(n_steps(capture)) if index is None else [index]
    if info.mode == "split":
        return _per_step(capture, "YS", steps)
    image, text = capture.spans["image"], capture.spans["text"]
    return np.stack([np.stack([np.asarray(_steps(capture, layer)[s, :, text.start:text.stop, image.start:image.stop],
                                          dtype=np.float32)
                               for s in steps]) for layer in range(capture.meta.n_layers)], axis=1)


def image_regions(capture: Capture, index: int) -> np.ndarray:
    """p  # [layer, head, region, region] float32 at recorded step `index`: image -> image attention pooled
    into regions ("split"; a "full" capture's regions are its patches)."""
    _check(capture, index)
    if layout(capture).mode == "split":
        return _per_step(capture, "PS", [index])[0]
    image = capture.spans["image"]
    return np.stack([np.asarray(_steps(capture, layer)[index, :, image.start:image.stop, image.start:image.stop],
                                dtype=np.float32)
                     for layer in range(capture.meta.n_layers)])


def text_tokens(capture: Capture) -> list[str]:
    """The labels of the word maps' text axis (its columns)."""
    text = capture.spans["text"]
    return capture.tokens[text.start:text.stop]


def column_positions(capture: Capture) -> list[list[int]]:
    """The full-axis positions each text column stands for (what an edit on that column must name)."""
    info = layout(capture)
    if info.mode == "split":
        return [list(p) for _label, p in info.columns]
    return [[p] for p in capture.spans["text"]]


def word_label(token: str) -> str:
    """A text token as a reader sees it: without CLIP's end-of-word "</w>" ("red</w>" -> "red") and the
    word-start mark of SentencePiece ("▁red") or byte-level BPE ("Ġred"), byte-level BPE's newline "Ċ" as
    "⏎"; a capture keeps the tokenizer's own tokens (analytics.dit reads the word boundaries from them)."""
    bare = token.replace("</w>", "").replace("Ċ", "⏎")
    bare = bare[1:] if bare[:1] in ("▁", "Ġ") else bare
    return bare or token


def word_columns(capture: Capture) -> list[int]:
    """Indices of the text columns that are words (not [CLS], padding, end-of-text ..., AuraFlow's registers, a
    chat template's role name: the token after "<|im_start|>", Qwen-Image's "assistant", FLUX.2 [klein]'s "user" and
    "assistant", nor the pipeline's own system prompt: Lumina 2's and FLUX.2 [dev]'s "system" span)."""
    tokens = text_tokens(capture)
    system = capture.spans.get("system", range(0))
    positions = column_positions(capture)
    return [i for i, t in enumerate(tokens) if t.split(" x")[0] not in SPECIAL and t.strip(BYTE_SPACE)
            and not t.startswith("<register ") and (i == 0 or tokens[i - 1] != "<|im_start|>")
            and positions[i][0] not in system]


def patch_grid(capture: Capture) -> tuple[int, int]:
    """(rows, cols) of the image axis of the word maps: the patch grid."""
    return tuple(capture.meta.grid)


__all__ = ["IMAGE_NAME", "FULL_BYTES", "FULL_STEP_BYTES", "REGION_SIDE", "DitLayout", "layout", "steps_name",
           "cross_name", "step_file", "is_dit", "generated_image", "n_steps", "region_of", "pool_for", "kept_steps",
           "full_steps",
           "all_steps", "step_attention", "recompute", "patch_reads", "image_to_text", "text_to_image",
           "image_regions", "text_tokens", "column_positions", "word_label", "word_columns", "patch_grid"]
