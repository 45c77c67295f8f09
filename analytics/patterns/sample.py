"""Where the atlas's maps come from: captures (every head, a few sampled rows each), loose arrays, and
synthetic maps of known kinds, as one `MapSet` of encoded images with their provenance.

A capture is read one layer's sampled rows at a time (Capture.row): never a whole capture, and for
causal ("tril") layouts never a whole layer either.  Text captures give one image per head (the 32
query rows of analytics.patterns.encode.text_queries); patch-grid captures (vision, DiT) one image per
head per query patch of a 4 x 4 lattice (`query_lattice`, 16 patches by default).

The synthetic kinds (diagonal, previous token, sink, uniform, block-local) are the ground truth the
clustering is tested and benchmarked on.  Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from analytics.patterns.encode import (SIZE, TRAITS, encode_text_rows, encode_vision_rows, patch_span, query_lattice,
                                       text_queries, text_traits, vision_traits)


# ---- sampled maps ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input the maps come from (a capture, or a synthetic set)."""

    key: str
    model: str
    modality: str  # "text" | "vision" | "dit" | "vlm" | "synthetic"
    intervention: str  # Intervention.key(), "none" when there is none
    title: str  # short human description: the prompt's start or the image name
    n_layers: int
    n_heads: int
    encoding: str  # "text" | "centred" | "uncentred"

    @property
    def group(self) -> str:
        """Heads are compared within a group: one model under one intervention."""
        return self.model if self.intervention == "none" else f"{self.model} · {self.intervention}"


@dataclass
class MapSet:
    """Encoded maps and where each one comes from (all arrays share the first axis, one row per map)."""

    images: np.ndarray  # [map, SIZE, SIZE] float32: attention mass per cell
    source: np.ndarray  # [map] int: index into `sources`
    layer: np.ndarray  # [map] int
    head: np.ndarray  # [map] int
    query: np.ndarray  # [map] int: the query patch index (vision) or -1 (text: the whole map)
    traits: np.ndarray  # [map, len(TRAITS)] float32
    sources: list[Source]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def concat(cls, parts: Sequence["MapSet"]) -> "MapSet":
        sources: list[Source] = []
        pieces = []
        for part in parts:
            pieces.append(part.source + len(sources))
            sources.extend(part.sources)
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts]) if parts else None  # noqa: E731
        if not parts:
            return cls(np.zeros((0, SIZE, SIZE), np.float32), *(np.zeros(0, np.int64) for _ in range(4)),
                       np.zeros((0, len(TRAITS)), np.float32), [])
        return cls(cat("images"), np.concatenate(pieces), cat("layer"), cat("head"), cat("query"), cat("traits"),
                   sources)

    def modality(self) -> np.ndarray:
        """[map] str: the modality of each map's source."""
        return np.asarray([s.modality for s in self.sources])[self.source]

    def family(self) -> np.ndarray:
        """[map] str: "text" or "image" (centred and uncentred maps), the families clustered apart."""
        return np.asarray(["text" if s.encoding == "text" else "image" for s in self.sources])[self.source]


def source_of(capture, encoding: str) -> Source:
    spec = capture.spec
    title = spec.image if spec.image else " ".join(spec.prompt.split())[:48]
    return Source(key=capture.key, model=capture.meta.name, modality=capture.meta.modality,
                  intervention=spec.intervention.key(), title=title or capture.key[:8],
                  n_layers=capture.meta.n_layers, n_heads=capture.meta.n_heads, encoding=encoding)


def encoding_of(capture, vision: str = "centred") -> str:
    """The encoding a capture's maps get: vision ("centred"/"uncentred") for patch-grid models, else text."""
    if capture.meta.modality in ("vision", "dit") and patch_span(capture) is not None:
        return vision
    return "text"


def sample_capture(capture, vision: str = "centred", queries: int = 16) -> MapSet:
    """Encode every head of one capture (text: one image per head; vision: one per sampled query patch).

    Reads a layer's sampled rows only (Capture.row), one layer at a time: never a whole capture, and
    for causal ("tril") layouts never a whole layer either."""
    encoding = encoding_of(capture, vision)
    meta = capture.meta
    L, H, n = meta.n_layers, meta.n_heads, capture.n_tokens
    images, traits, layer_ix, head_ix, query_ix = [], [], [], [], []
    if encoding == "text":
        q = text_queries(n)
        unique, inverse = np.unique(q, return_inverse=True)
        for layer in range(L):
            block = np.stack([np.asarray(capture.row(layer, int(i)), dtype=np.float32) for i in unique], 1)
            block = block[:, inverse]  # [head, R, n]
            images.append(encode_text_rows(block, q))
            traits.append(text_traits(block, q, meta.causal))
            layer_ix.append(np.full(H, layer))
            head_ix.append(np.arange(H))
            query_ix.append(np.full(H, -1))
    else:
        grid, start = patch_span(capture)
        lattice = query_lattice(grid, queries)
        tokens = start + lattice[:, 0] * grid[1] + lattice[:, 1]
        for layer in range(L):
            block = np.stack([np.asarray(capture.row(layer, int(t)), dtype=np.float32) for t in tokens], 1)
            img = encode_vision_rows(block, grid, start, lattice, centred=encoding == "centred")
            images.append(img.reshape(-1, SIZE, SIZE))
            traits.append(vision_traits(block, grid, start, lattice).reshape(-1, len(TRAITS)))
            layer_ix.append(np.full(H * len(tokens), layer))
            head_ix.append(np.repeat(np.arange(H), len(tokens)))
            query_ix.append(np.tile(lattice[:, 0] * grid[1] + lattice[:, 1], H))
    m = sum(len(x) for x in layer_ix)
    return MapSet(np.concatenate(images), np.zeros(m, np.int64), np.concatenate(layer_ix).astype(np.int64),
                  np.concatenate(head_ix).astype(np.int64), np.concatenate(query_ix).astype(np.int64),
                  np.concatenate(traits), [source_of(capture, encoding)])


def sample_maps(captures: Iterable, vision: str = "centred", queries: int = 16,
                progress: Callable[[float, str], None] | None = None) -> MapSet:
    """MapSet of every head of every capture (one capture, one layer at a time)."""
    captures = list(captures)
    parts = []
    for i, capture in enumerate(captures):
        if progress:
            progress(i / max(len(captures), 1), f"encoding maps of {capture.meta.name} ({i + 1}/{len(captures)})")
        parts.append(sample_capture(capture, vision, queries))
    return MapSet.concat(parts)


def maps_from_arrays(maps: Sequence[np.ndarray], model: str = "synthetic", causal: bool = True,
                     title: str = "synthetic") -> MapSet:
    """A text MapSet from loose [query, key] maps (synthetic maps, tests): one 'head' per map."""
    images, traits = [], []
    for attn in maps:
        attn = np.asarray(attn, dtype=np.float32)
        q = text_queries(attn.shape[0])
        images.append(encode_text_rows(attn[None, q, :], q)[0])
        traits.append(text_traits(attn[None, q, :], q, causal)[0])
    m = len(images)
    src = Source(key="synthetic", model=model, modality="text", intervention="none", title=title,
                 n_layers=1, n_heads=m, encoding="text")
    return MapSet(np.stack(images), np.zeros(m, np.int64), np.zeros(m, np.int64), np.arange(m), np.full(m, -1),
                  np.stack(traits), [src])


# ---- synthetic maps of known kinds ----------------------------------------------------------------

SYNTHETIC_KINDS = ("diagonal", "previous", "sink", "uniform", "block")


def synthetic_map(kind: str, n: int, rng: np.random.Generator, causal: bool = True) -> np.ndarray:
    """attn  # [n, n] float32 of a known kind with random strength and a little noise (rows sum to 1).

    diagonal: mass on the query itself; previous: on i-1; sink: on key 0; uniform: flat over the
    visible keys; block: flat within the query's block of 4..12 tokens (block-local)."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    visible = (j <= i) if causal else np.ones((n, n), bool)
    base = visible / visible.sum(1, keepdims=True)
    if kind == "uniform":
        target = base
    elif kind == "diagonal":
        target = (i == j).astype(float)
    elif kind == "previous":
        target = (j == np.maximum(i - 1, 0)).astype(float)
    elif kind == "sink":
        target = (j == 0).astype(float) + 0.0 * i
    elif kind == "block":
        size = int(rng.integers(4, 13))
        target = ((i // size) == (j // size)) & visible
        target = target / target.sum(1, keepdims=True)
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; kinds are {', '.join(SYNTHETIC_KINDS)}")
    strength = rng.uniform(0.75, 0.95) if kind != "uniform" else 1.0
    noise = rng.dirichlet(np.full(n, 0.5), size=n) * visible
    noise = noise / np.maximum(noise.sum(1, keepdims=True), 1e-12)
    attn = strength * target + (1 - strength) * 0.5 * (base + noise)
    attn = attn + (0.05 * noise if kind == "uniform" else 0)
    attn = attn * visible
    return (attn / attn.sum(1, keepdims=True)).astype(np.float32)


def synthetic_set(lengths: Sequence[int] = (24, 48, 96, 160), per: int = 12, seed: int = 0,
                  kinds: Sequence[str] = SYNTHETIC_KINDS) -> tuple[list[np.ndarray], np.ndarray]:
    """(maps, kind index  # [map]): `per` maps of each kind at each length."""
    rng = np.random.default_rng(seed)
    maps, truth = [], []
    for k, kind in enumerate(kinds):
        for n in lengths:
            for _ in range(per):
                maps.append(synthetic_map(kind, n, rng))
                truth.append(k)
    return maps, np.asarray(truth)

