"""Spatial head analytics for vision transformers (pure numpy: no torch, no streamlit).

Inputs are attention maps attn  # [head, query, key] of one layer (or [layer, head, query, key]) over
a sequence laid out as `Layout`: `n_prefix` tokens (CLS, DeiT's distillation token, registers)
followed by the `grid` of patches in row-major order, each `patch_px` pixels wide.

- `cls_attention` / `patch_attention`: one query's attention over the patch grid, per head.
- `mean_attention_distance`: per head, the attention-weighted mean distance in pixels between a
  query patch and the patches it attends to (Dosovitskiy et al. 2021, Fig. 7; Raghu et al. 2021).
- `distance_profile`: per head, attention strength against spatial distance on the patch grid
  (Li et al., TVCG 2023, METHODS.md §3.2; "distance-strength ridgeline").
- `high_norm_tokens`: tokens whose hidden-state norm stands out, with the attention they receive
  (Darcet et al. 2024, "Vision Transformers Need Registers").  The norms come from a probe
  (probes.vision.token_norms), never from the attention function.
- `attention_rollout`: the model-level flow of attention (Abnar & Zuidema 2020).

`VISION_METRICS` lists the vision metrics; analytics/__init__.py adds them to `METRICS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from analytics.metric import Metric
from core.errors import ProbeMissing

PAPERS = {
    "distance": "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words (Fig. 7: mean attention distance)",
    "profile": "Li et al. 2023, Visual Analytics for Vision Transformers (IEEE TVCG), attention strength vs distance",
    "registers": "Darcet et al. 2024, Vision Transformers Need Registers (ICLR)",
    "rollout": "Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers (ACL)",
    "michel": "Michel et al. 2019, Are Sixteen Heads Really Better than One? (NeurIPS)",
}


@dataclass(frozen=True)
class Layout:
    """Where the patches sit in the token sequence, and how large a patch is in pixels."""

    grid: tuple[int, int]  # (rows, cols) of patches
    n_prefix: int = 1  # tokens before the first patch
    patch_px: float = 1.0  # patch side in pixels (distances come out in pixels)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patches(self) -> slice:
        return slice(self.n_prefix, self.n_prefix + self.n_patches)

    def token(self, row: int, col: int) -> int:
        """The sequence position of patch (row, col)."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"patch ({row}, {col}) is outside the {rows} x {cols} grid")
        return self.n_prefix + row * cols + col

    @classmethod
    def of(cls, capture, image: np.ndarray | None = None) -> "Layout":
        """The layout of a vision Capture (its grid, its "patches" span, the pixel size of its picture),
        or of a DiT capture (span "image", the generated picture passed as `image`)."""
        grid = capture.meta.grid
        span = next((capture.spans[name] for name in ("patches", "image") if name in capture.spans), None)
        if grid is None or span is None:
            raise ValueError(f"{capture.meta.name} is not a vision capture (no patch grid).")
        if image is None and hasattr(capture, "image"):
            image = capture.image()
        patch_px = image.shape[0] / grid[0] if image is not None else 1.0
        return cls(grid=tuple(grid), n_prefix=span.start, patch_px=float(patch_px))


@lru_cache(maxsize=16)
def _grid_distances(rows: int, cols: int) -> np.ndarray:
    """[P, P] Euclidean distance between patch centres, in patches."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.hypot(r[:, None] - r[None, :], c[:, None] - c[None, :])


def patch_distances(layout: Layout) -> np.ndarray:
    """dist  # [patch, patch] distance between patch centres in pixels."""
    return _grid_distances(*layout.grid) * layout.patch_px


def grid_map(row: np.ndarray, layout: Layout) -> np.ndarray:
    """row  # [..., key] -> [..., rows, cols]: the attention on the patch keys, on the grid."""
    row = np.asarray(row, dtype=np.float32)
    return row[..., layout.patches].reshape(row.shape[:-1] + tuple(layout.grid))


def cls_attention(attn: np.ndarray, layout: Layout, query: int = 0) -> np.ndarray:
    """attn  # [head, query, key] -> [head, rows, cols]: where the CLS token (or `query`) looks."""
    return grid_map(np.asarray(attn)[..., query, :], layout)


def patch_attention(attn: np.ndarray, layout: Layout, row: int, col: int) -> np.ndarray:
    """attn  # [head, query, key] -> [head, rows, cols]: where patch (row, col) looks."""
    return grid_map(np.asarray(attn)[..., layout.token(row, col), :], layout)


def _patch_block(attn: np.ndarray, layout: Layout, renormalize: bool) -> np.ndarray:
    """[..., patch, patch] float64 patch-to-patch weights, rows renormalised to 1 over patch keys."""
    block = np.asarray(attn, dtype=np.float64)[..., layout.patches, layout.patches]
    if renormalize:
        block = block / np.maximum(block.sum(-1, keepdims=True), 1e-12)
    return block


def mean_attention_distance(attn: np.ndarray, layout: Layout, renormalize: bool = True) -> np.ndarray:
    """attn  # [..., head, query, key] -> [..., head]: mean attention distance in pixels.

    For every patch query, sum_k A[q, k] * dist(q, k) over the patch keys, averaged over queries
    (Dosovitskiy et al. 2021; the default here, as there, ignores the CLS/register keys: with
    `renormalize` each query's weights on the patches are rescaled to sum to 1, so a head that parks
    mass on CLS is measured by where its remaining mass goes).  A head attending only to itself
    scores 0; uniform attention scores the grid's mean pairwise distance.
    """
    block = _patch_block(attn, layout, renormalize)
    return (block * patch_distances(layout)).sum(-1).mean(-1)


def grid_mean_distance(layout: Layout) -> float:
    """The mean distance between two patches drawn uniformly (with replacement) from the grid, in pixels."""
    return float(patch_distances(layout).mean())


@dataclass
class DistanceProfile:
    """Attention strength against distance on the patch grid, per head (Li et al. 2023)."""

    distance_px: np.ndarray  # [bin] centre of each distance bin in pixels (bin b: round(d / patch) == b)
    strength: np.ndarray  # [..., head, bin] mean weight a query gives one key at that distance
    mass: np.ndarray  # [..., head, bin] mean total weight a query gives all keys at that distance
    pairs: np.ndarray  # [bin] number of (query, key) patch pairs in the bin


def distance_profile(attn: np.ndarray, layout: Layout, renormalize: bool = True) -> DistanceProfile:
    """attn  # [..., head, query, key] -> DistanceProfile over integer patch-distance bins.

    Distances are Euclidean between patch centres, rounded to whole patches (bin 0: the query
    itself; bin 1: its 4 neighbours and, rounded, its diagonals ...).  `strength` averages the
    weight over all (query, key) pairs in a bin (how strongly one key at that distance is attended),
    `mass` sums it per query and averages over queries (how much of the row lies at that distance).
    """
    block = _patch_block(attn, layout, renormalize)
    bins = np.rint(_grid_distances(*layout.grid)).astype(np.int64)  # [P, P]
    n_bins = int(bins.max()) + 1
    flat = bins.reshape(-1)
    pairs = np.bincount(flat, minlength=n_bins).astype(np.float64)
    lead = block.shape[:-2]
    weights = block.reshape(-1, flat.size)  # [lead..., P*P]
    sums = np.stack([np.bincount(flat, weights=w, minlength=n_bins) for w in weights])
    sums = sums.reshape(lead + (n_bins,))
    n_queries = layout.n_patches
    return DistanceProfile(
        distance_px=np.arange(n_bins) * layout.patch_px,
        strength=sums / np.maximum(pairs, 1),
        mass=sums / n_queries,
        pairs=pairs,
    )


def received_attention(attn: np.ndarray, queries: slice | None = None) -> np.ndarray:
    """attn  # [..., head, query, key] -> [..., head, key]: mean attention each key receives."""
    a = np.asarray(attn, dtype=np.float32)
    if queries is not None:
        a = a[..., queries, :]
    return a.mean(-2)


@dataclass
class ArtifactToken:
    """A token whose hidden-state norm stands out in one layer (Darcet et al. 2024)."""

    layer: int  # hidden-state index: 0 = the embeddings, l = output of block l-1 = input of block l
    token: int
    norm: float
    ratio: float  # norm / median norm of the patch tokens of that layer
    received: float | None  # mean attention it receives in block `layer`, which reads this state
    # (heads and queries averaged); None after the last block


def high_norm_tokens(norms: np.ndarray, layout: Layout, received: np.ndarray | None = None,
                     ratio: float = 2.0, min_layer: int = 1) -> list[list[ArtifactToken]]:
    """norms  # [layer+1, token] hidden-state L2 norms -> per layer, the patch tokens with outlying norms.

    Darcet et al. find the artifact tokens as a separate high-norm mode of the patch-norm
    distribution (norm > 150 for DINOv2 ViT-g); the cut-off depends on the model, so here a patch
    is an artifact when its norm exceeds `ratio` x the layer's median patch norm.
    received  # [block, token]: attention each token receives in block l, paired with norms[l] (the
    state block l reads).  Returns one list per hidden state (index 0 = the embeddings: empty unless
    min_layer is 0), largest norm first.
    """
    norms = np.asarray(norms, dtype=np.float64)
    out: list[list[ArtifactToken]] = []
    for layer in range(norms.shape[0]):
        found: list[ArtifactToken] = []
        if layer >= min_layer:
            patch = norms[layer, layout.patches]
            median = float(np.median(patch))
            for i in np.flatnonzero(patch > ratio * median):
                token = layout.n_prefix + int(i)
                got = None
                if received is not None and layer < len(received):
                    got = float(received[layer, token])
                found.append(ArtifactToken(layer, token, float(patch[i]), float(patch[i] / median), got))
        out.append(sorted(found, key=lambda t: -t.norm))
    return out


def attention_rollout(attn: np.ndarray, head_fusion: str = "mean", residual: bool = True,
                      discard_ratio: float = 0.0) -> np.ndarray:
    """attn  # [layer, head, query, key] -> rollout  # [query, key] (Abnar & Zuidema 2020).

    Official defaults: heads averaged, the residual connection modelled as 0.5 A + 0.5 I (i.e.
    A + I renormalised per row), and the layers multiplied from the first up:
    R = Â_L ... Â_2 Â_1.  Row i of R is how much each input token flows into position i at the
    top.  `head_fusion` "max"/"min" and `discard_ratio` (drop that fraction of the smallest weights
    per layer, never the diagonal) are the common variants for sharper maps.
    """
    attn = np.asarray(attn, dtype=np.float64)
    n = attn.shape[-1]
    eye = np.eye(n)
    rollout = eye
    for layer_maps in attn:
        if head_fusion == "mean":
            a = layer_maps.mean(0)
        elif head_fusion == "max":
            a = layer_maps.max(0)
        elif head_fusion == "min":
            a = layer_maps.min(0)
        else:
            raise ValueError(f"head_fusion must be mean, max or min, not {head_fusion!r}")
        if discard_ratio > 0:
            a = a.copy()
            flat = a.reshape(-1)
            k = int(flat.size * discard_ratio)
            if k:
                drop = np.argpartition(flat, k)[:k]
                drop = drop[drop % (n + 1) != 0]  # keep the diagonal
                flat[drop] = 0
        if residual:
            a = a + eye
        a = a / np.maximum(a.sum(-1, keepdims=True), 1e-12)
        rollout = a @ rollout
    return rollout


# ---- metrics over a Capture -------------------------------------------------------------------
def _all_layers(capture) -> np.ndarray:
    """attn  # [layer, head, query, key] float32 (a ViT capture is small: 12 x 6 x 257² is 19 MB)."""
    return np.stack([np.asarray(capture.attention(l), dtype=np.float32) for l in range(capture.meta.n_layers)])


def distance_per_head(capture, layout: Layout | None = None) -> np.ndarray:
    """[layer, head] mean attention distance in pixels (over the step-averaged maps for a DiT)."""
    layout = layout or Layout.of(capture)
    return np.stack([mean_attention_distance(capture.attention(l), layout) for l in range(capture.meta.n_layers)])


def cls_rollout(capture, **options) -> np.ndarray:
    """[token]: the CLS row of the attention rollout (Abnar & Zuidema), over every token."""
    return attention_rollout(_all_layers(capture), **options)[0]


def stored_probe(capture, name: str, probe: str) -> np.ndarray:
    """A probe's result stored with the capture; ProbeMissing (naming the probe to run) if absent."""
    try:
        return np.asarray(capture.store.get_array(capture.key, name))
    except Exception as exc:  # noqa: BLE001 - absent or unreadable: the probe must (re)run
        raise ProbeMissing(f"Run the {probe} probe on this capture first "
                           f"(probes.vision.{probe}).") from exc


def _probe_metric(name: str, probe: str, index: int | None = None):
    def compute(capture, **_params) -> np.ndarray:
        result = stored_probe(capture, name, probe)
        return result if index is None else result[index]
    return compute


def _token_norm(capture, layer: int = -1, **_params) -> np.ndarray:
    return stored_probe(capture, "vit_token_norms", "token_norms")[layer]


VISION = ("vision",)
VISION_METRICS = [
    Metric(name="attn_distance_px", title="Mean attention distance (px)", paper=PAPERS["distance"], kind="head",
           modalities=VISION,
           explanation="Attention-weighted mean distance in pixels from each patch to the patches it reads: "
                       "small = local (convolution-like) head, large = global.",
           compute=lambda capture, **_: distance_per_head(capture)),
    Metric(name="rollout", title="Attention rollout from CLS", paper=PAPERS["rollout"], kind="token", modalities=VISION,
           explanation="How much each input token flows into the CLS token through all layers "
                       "(head-averaged attention plus the residual, multiplied up the stack).",
           compute=lambda capture, **p: cls_rollout(capture, **p),
           params={"head_fusion": "mean", "residual": True, "discard_ratio": 0.0}),
    Metric(name="token_norm", title="Hidden-state norm (high-norm artifacts)", paper=PAPERS["registers"],
           kind="token", modalities=VISION,
           explanation="L2 norm of each token's hidden state; patches far above the median are the "
                       "artifact tokens that hold global information.",
           compute=_token_norm, probe="token_norms", params={"layer": -1}),
    Metric(name="vit_ablation_cls", title="Ablation: CLS embedding change (1 - cos)", paper=PAPERS["michel"],
           kind="head", modalities=VISION,
           explanation="How far the image embedding turns when this one head's output is zeroed.",
           compute=_probe_metric("vit_ablation", "ablation", 0), probe="ablation"),
    Metric(name="vit_ablation_patch", title="Ablation: patch feature change (1 - cos)", paper=PAPERS["michel"],
           kind="head", modalities=VISION,
           explanation="Mean change of the patch features when this one head's output is zeroed.",
           compute=_probe_metric("vit_ablation", "ablation", 1), probe="ablation"),
    Metric(name="vit_ablation_prob", title="Ablation: drop in predicted-class probability", paper=PAPERS["michel"],
           kind="head", modalities=VISION,
           explanation="Image classifiers: how much the top class's probability falls when this head is zeroed.",
           compute=_probe_metric("vit_ablation", "ablation", 2), probe="ablation"),
    Metric(name="vit_grad_gate", title="Gradient head-gate importance |dL/dξ|", paper=PAPERS["michel"],
           kind="head", modalities=VISION,
           explanation="Gradient of the loss (classifiers) or of the CLS embedding's projection on itself "
                       "(encoders) with respect to a gate on the head's output: a one-pass proxy for ablation.",
           compute=_probe_metric("vit_grad_gate", "grad_gate"), probe="grad_gate"),
]

