"""The core types of HeadScope: RunSpec (what to run), ModelMeta, Output and Capture (what came out).

This module imports neither torch nor streamlit, so `analytics/`, `charts/` and `pages/` can use a Capture freely.
A Capture reads its maps lazily from the cache, one layer (or one head) at a time.

Storage format of one layer's maps (name "L007" for layer 7):
- layout "tril" (causal models): [head, n*(n+1)/2] float16, the rows of the lower triangle packed
  one after the other (row i holds keys 0..i).  Half the bytes of the square, and row i's place does
  not depend on n, so generated rows extend the same packing.
- layout "full" (bidirectional encoders): [head, query, key] float16.
- layout "qk" (long causal inputs, core.qk): [n_heads + n_kv_heads, n, head_dim] float32, the
  layer's queries and keys; maps, rows and overviews are computed from them on request, and the
  one-pass reductions (received attention, entropy, look-back distance, WAAD) are stored beside them.

Models with learned sink logits (GPT-OSS) also store "sink_share": [layer, head, query] float32, the
softmax mass each row's sink logit took (the row's map sums to 1 minus it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from core.errors import CorruptEntry
from core.interventions import Intervention
from core.keys import stable_hash
from core.layouts import PaddedBlock, max_pool, overview_name, pack_offset, unpack_tril
from core.qk import ROW_BLOCK as QK_ROW_BLOCK, QKParams, attention_rows, pooled_heads, reduction_name


class ArrayStore(Protocol):
    """What a Capture reads its maps through (cache.store.Store is one): arrays by capture key and name."""

    def get_array(self, key: str, name: str) -> np.ndarray: ...

    def put_array(self, key: str, name: str, array: np.ndarray) -> None: ...


CAPTURE_VERSION = 1  # bump when the stored format or the capture maths change
OVERVIEW_BINS = 32  # thumbnail resolution of the model view (keeps its figure ~2 MB)
SINK_SHARE = "sink_share"  # array name of the sink logits' share per row (models with sink logits)
MAX_STEPS = 200  # the most DiT sampling steps a RunSpec may ask for (capture.dit checks it; links are held to it)
MAX_KEPT = 8  # the most DiT steps whose full maps one capture keeps (RunSpec.keep: each is every layer's q and k)
MAX_GUIDANCE = 30.0  # the largest classifier-free guidance scale a RunSpec may ask for (capture.dit checks it)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a capture; its `key()` addresses the cache."""

    model: str
    prompt: str = ""
    chat: bool = False
    image: str | None = None
    max_new_tokens: int = 0
    seed: int = 0
    steps: int = 0
    intervention: Intervention = Intervention()
    height: int = 0  # DiT picture size in pixels; 0 = the model's default (left out of the JSON and the key)
    width: int = 0
    keep: tuple[int, ...] = ()  # DiT: the steps whose full maps a "split" capture keeps; () = the middle one
    guidance: float | None = None  # DiT: the classifier-free guidance scale; None = the pipeline's default

    def to_json(self) -> dict:
        record = dict(asdict(self), intervention=self.intervention.to_json(), keep=list(self.keep),
                      guidance=None if self.guidance is None else float(self.guidance))  # 4 and 4.0: one key
        for name in ("height", "width", "keep", "guidance"):  # unset fields stay out: keys made before them hold
            if record[name] is None or (name != "guidance" and not record[name]):
                del record[name]
        return record

    @classmethod
    def from_json(cls, data: dict) -> "RunSpec":
        return cls(**dict(data, intervention=Intervention.from_json(data.get("intervention") or {}),
                          keep=tuple(int(s) for s in data.get("keep") or ())))

    def key(self, revision: str = "") -> str:
        """Hash of every field + the model revision + the capture version."""
        return stable_hash({"spec": self.to_json(), "revision": revision, "version": CAPTURE_VERSION})


@dataclass(frozen=True)
class ModelMeta:
    """The shape of a model as HeadScope sees it."""

    name: str
    family: str  # transformers model_type: "llama", "bert", ...
    modality: str  # "text" | "vision" | "vlm" | "dit"
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int  # key/value heads per layer (GQA: n_heads // n_kv_heads query heads share one)
    head_dim: int
    causal: bool
    revision: str = ""
    grid: tuple[int, int] | None = None  # patch grid for vision models
    # encoder-decoders: the layers of each group, [start, stop) in capture order ("encoder" self-attention,
    # "decoder" self-attention, "cross" attention); None for every other model (and then left out of the JSON)
    groups: dict[str, tuple[int, int]] | None = None

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head `head` reads (GQA)."""
        return head // self.group_size

    def group_of(self, layer: int) -> str | None:
        """"encoder", "decoder" or "cross" for a layer of an encoder-decoder, else None."""
        return next((g for g, (start, stop) in (self.groups or {}).items() if start <= layer < stop), None)

    def to_json(self) -> dict:
        record = asdict(self)
        if self.groups is None:  # so the metadata of every other model stays as it was
            del record["groups"]
        return record

    @classmethod
    def from_json(cls, data: dict) -> "ModelMeta":
        data = dict(data)
        if data.get("grid") is not None:
            data["grid"] = tuple(data["grid"])
        if data.get("groups") is not None:
            data["groups"] = {name: tuple(span) for name, span in data["groups"].items()}
        return cls(**data)


@dataclass
class StepLogprobs:
    """One generation step: the chosen token and the top-k alternatives, as natural-log probabilities."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Output:
    """What the model produced."""

    text: str = ""  # the generated continuation (empty for prefill only)
    token_ids: list[int] = field(default_factory=list)  # every token of the map, prompt + generated
    steps: list[StepLogprobs] = field(default_factory=list)  # one per generated token
    next_top: list[tuple[str, float]] = field(default_factory=list)  # top-k after the last token
    notes: list[str] = field(default_factory=list)  # things the user should know about this run
    classes: list[tuple[str, float]] = field(default_factory=list)  # image classifiers: top-5 (label, probability)
    # diffusion transformers (core.dit_capture): the sampling step of each recorded step index, and
    # its scheduler timestep (1000 = pure noise)
    recorded_steps: list[int] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Output":
        data = dict(data)
        data["steps"] = [
            StepLogprobs(s["token"], s["token_id"], s["logprob"], [tuple(t) for t in s["top"]])
            for s in data.get("steps", [])
        ]
        data["next_top"] = [tuple(t) for t in data.get("next_top", [])]
        data["classes"] = [tuple(t) for t in data.get("classes", [])]
        return cls(**data)


@dataclass
class Capture:
    """One run's tokens, spans, output and (lazily read) attention maps."""

    key: str
    spec: RunSpec
    meta: ModelMeta
    tokens: list[str]  # readable axis labels, one per position of the maps
    spans: dict[str, range]
    output: Output
    layout: str  # "tril" | "full" | "qk"
    store: "ArrayStore | None" = None
    from_cache: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    layout_info: dict = field(default_factory=dict)  # "qk": core.qk.QKParams as JSON; "blocks": PaddedBlock's

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def _layer_array(self, layer: int) -> np.ndarray:
        if not 0 <= layer < self.meta.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.meta.n_layers - 1}")
        if self.store is None:
            raise RuntimeError("this Capture is not backed by a cache")
        return self.padded(self.store.get_array(self.key, f"L{layer:03d}"), layer)

    def padded(self, stored: np.ndarray, layer: int):
        """A "full" layer's stored maps as [..., n, n]: padded with zeros on read (core.layouts.PaddedBlock)
        where the capture stores only the block they can be non-zero in (layout_info["blocks"])."""
        block = (self.layout_info.get("blocks") or [None] * (layer + 1))[layer]
        return stored if block is None else PaddedBlock(stored, self.n_tokens, *block)

    @property
    def qk_params(self):
        """core.qk.QKParams of a "qk" capture (how its maps are computed), else None."""
        if self.layout != "qk":
            return None
        return QKParams.from_json(self.layout_info)

    def _qk_map(self, layer: int, heads: list[int]) -> np.ndarray:
        """attn  # [len(heads), n, n] float16 computed from a qk capture's queries and keys, a row block at a time."""
        stored, n = self._layer_array(layer), self.n_tokens
        out = np.zeros((len(heads), n, n), dtype=np.float16)
        for r0 in range(0, n, QK_ROW_BLOCK):
            r1 = min(n, r0 + QK_ROW_BLOCK)
            out[:, r0:r1, :r1] = attention_rows(stored, self.meta.n_heads, self.qk_params, r0, r1, heads)
        return out

    def attention(self, layer: int) -> np.ndarray:
        """attn  # [head, query, key] float16, read from the cache (computed from queries and keys for "qk")."""
        if self.layout == "qk":
            return self._qk_map(layer, list(range(self.meta.n_heads)))
        stored = self._layer_array(layer)
        if self.layout == "tril":
            return unpack_tril(np.asarray(stored), self.n_tokens)
        return np.asarray(stored)

    def head(self, layer: int, head: int) -> np.ndarray:
        """attn  # [query, key] float16 for one head; reads only that head's bytes."""
        if not 0 <= head < self.meta.n_heads:
            raise IndexError(f"head {head} out of range 0..{self.meta.n_heads - 1}")
        if self.layout == "qk":
            return self._qk_map(layer, [head])[0]
        stored = self._layer_array(layer)
        if self.layout == "tril":
            return unpack_tril(np.asarray(stored[head]), self.n_tokens)
        return np.asarray(stored[head])

    def row(self, layer: int, query: int) -> np.ndarray:
        """attn  # [head, key] float16: what position `query` attends to, every head of one layer."""
        stored = self._layer_array(layer)
        if self.layout == "qk":
            if not 0 <= query < self.n_tokens:
                raise IndexError(f"query {query} out of range 0..{self.n_tokens - 1}")
            out = np.zeros((self.meta.n_heads, self.n_tokens), dtype=np.float16)
            out[:, : query + 1] = attention_rows(stored, self.meta.n_heads, self.qk_params, query, query + 1)[:, 0]
            return out
        if self.layout == "tril":
            out = np.zeros((self.meta.n_heads, self.n_tokens), dtype=stored.dtype)
            start = pack_offset(query)
            out[:, : query + 1] = stored[:, start : start + query + 1]
            return out
        return np.asarray(stored[:, query, :])

    def overview(self, bins: int = OVERVIEW_BINS) -> np.ndarray:
        """thumbs  # [layer, head, b, b] float16: every map max-pooled into b x b blocks (b <= bins).

        Computed once per capture from the stored maps, then kept in the cache beside them.
        """
        b = min(bins, self.n_tokens)
        name = overview_name(b)
        if self.store is not None:
            try:
                return self.store.get_array(self.key, name)
            except CorruptEntry:
                pass
        if self.layout == "qk":  # streamed from queries and keys (the stored bins never get here)
            thumbs = np.stack([pooled_heads(self._layer_array(layer), self.meta.n_heads, self.qk_params,
                                            self.n_tokens, b) for layer in range(self.meta.n_layers)]
                              ).astype(np.float16)
        else:
            thumbs = np.stack([max_pool(self.attention(layer), b) for layer in range(self.meta.n_layers)])
        if self.store is not None:
            self.store.put_array(self.key, name, thumbs)
        return thumbs

    def image(self) -> np.ndarray | None:
        """image  # [H, W, 3] uint8: the picture as the model saw it (resized, cropped); None if the run had none."""
        if self.store is None or self.spec.image is None:
            return None
        try:
            return np.asarray(self.store.get_array(self.key, "image"))
        except CorruptEntry:
            return None

    def rows(self, layer: int, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """attn  # [head, stop - start, keys]: query rows start..stop-1 of every head of one layer.  Causal
        ("tril") maps give keys 0..stop-1 (zeros above the diagonal), full maps every key.  Reads only
        those rows' bytes, so analytics can stream a long capture in row blocks without unpacking a
        whole layer."""
        stored = self._layer_array(layer)
        n_rows = stop - start
        if self.layout == "qk":
            return attention_rows(stored, self.meta.n_heads, self.qk_params, start, stop).astype(dtype, copy=False)
        if self.layout != "tril":
            return np.asarray(stored[:, start:stop, :], dtype=dtype)
        out = np.zeros((self.meta.n_heads, n_rows, stop), dtype=dtype)
        segment = np.asarray(stored[:, pack_offset(start) : pack_offset(stop)])  # [head, packed rows]
        offset = 0
        for r in range(n_rows):
            width = start + r + 1
            out[:, r, :width] = segment[:, offset : offset + width]
            offset += width
        return out

    def head_overview(self, layer: int, head: int, bins: int = OVERVIEW_BINS) -> np.ndarray:
        """thumb  # [b, b] float32 (b = min(bins, n)): one head's map max-pooled into b x b blocks.

        From the stored thumbnails when the capture has them at this resolution (every capture at 32
        bins; "qk" captures also at core.qk.HEAD_OVERVIEW_BINS), else computed from that one head."""
        if not 0 <= head < self.meta.n_heads:
            raise IndexError(f"head {head} out of range 0..{self.meta.n_heads - 1}")
        b = min(bins, self.n_tokens)
        if self.store is not None:
            try:
                return np.asarray(self.store.get_array(self.key, overview_name(b))[layer, head], dtype=np.float32)
            except CorruptEntry:
                pass
        if self.layout == "qk":
            return pooled_heads(self._layer_array(layer), self.meta.n_heads, self.qk_params, self.n_tokens, b,
                                [head])[0]
        return max_pool(np.asarray(self.head(layer, head), dtype=np.float32), b)

    def window(self, layer: int, head: int, q0: int, q1: int, k0: int, k1: int) -> np.ndarray:
        """attn  # [q1 - q0, k1 - k0] float16: one head's map on query rows q0..q1-1 and keys k0..k1-1.

        Reads (or, for "qk", computes) only those rows, so a detail window of a long map is cheap."""
        n = self.n_tokens
        q0, q1, k0, k1 = max(0, q0), min(n, q1), max(0, k0), min(n, k1)
        if self.layout == "qk":
            rows = attention_rows(self._layer_array(layer), self.meta.n_heads, self.qk_params, q0, q1, [head],
                                  keys=max(q1, k1))[0]
            return rows[:, k0:k1].astype(np.float16)
        if self.layout == "tril":
            out = np.zeros((max(0, q1 - q0), max(0, k1 - k0)), dtype=np.float16)
            stop = min(k1, q1)  # keys after the last row are in the future of every row
            if k0 < stop:
                out[:, : stop - k0] = self.rows(layer, q0, q1, dtype=np.float16)[head][:, k0:stop]
            return out
        return np.asarray(self._layer_array(layer)[head, q0:q1, k0:k1])

    def sink_share(self, layer: int) -> np.ndarray | None:
        """share  # [head, query] float32: the softmax mass a learned sink logit took from each query row of
        `layer` (GPT-OSS; the row's map sums to 1 minus it), or None for a model without sink logits."""
        if self.store is None:
            return None
        try:
            shares = self.store.get_array(self.key, SINK_SHARE)
        except CorruptEntry:
            return None
        return np.asarray(shares[layer], dtype=np.float32)

    def reductions(self) -> dict[str, np.ndarray] | None:
        """The one-pass reductions stored with a "qk" capture (core.qk: colsum, entropy, ...), as
        {name: array  # [layer, head, token] float32}; None when the capture has none or one is unreadable."""
        params = self.qk_params
        if params is None or not params.reductions or self.store is None:
            return None
        try:
            return {name: self.store.get_array(self.key, reduction_name(name)) for name in params.reductions}
        except CorruptEntry:
            return None

    def export_arrays(self) -> dict[str, np.ndarray]:
        """Everything a download of this capture holds: one "layerNNN" map per layer; for "qk" captures
        (whose maps would not fit in memory) each layer's "qkNNN" queries-then-keys array, the
        reductions and the thumbnails instead."""
        if self.layout != "qk":
            return {f"layer{l:03d}": self.attention(l) for l in range(self.meta.n_layers)}
        arrays = {f"qk{l:03d}": np.asarray(self._layer_array(l)) for l in range(self.meta.n_layers)}
        arrays.update({f"reduction_{k}": np.asarray(v) for k, v in (self.reductions() or {}).items()})
        arrays["overview"] = np.asarray(self.overview())
        return arrays

    def record(self) -> dict:
        """The JSON metadata record stored for this capture."""
        return {
            "spec": self.spec.to_json(), "meta": self.meta.to_json(), "tokens": self.tokens,
            "spans": {k: [v.start, v.stop] for k, v in self.spans.items()},
            "output": self.output.to_json(),
            "layout": self.layout,
            "timings": self.timings,
            "layout_info": self.layout_info,
        }

    @classmethod
    def from_record(cls, key: str, record: dict, store: ArrayStore) -> "Capture":
        return cls(
            key=key,
            spec=RunSpec.from_json(record["spec"]),
            meta=ModelMeta.from_json(record["meta"]),
            tokens=list(record["tokens"]),
            spans={k: range(v[0], v[1]) for k, v in record["spans"].items()},
            output=Output.from_json(record["output"]),
            layout=record["layout"], store=store, from_cache=True,
            timings=dict(record.get("timings", {})),
            layout_info=dict(record.get("layout_info") or {}),
        )
