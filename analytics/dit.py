"""Attention analytics for diffusion transformers (pure numpy: no torch, no streamlit).

Input is the image -> text block of joint (or cross) attention,

    a  # [step, layer, head, image, text]   (core.dit_capture.image_to_text)

with image tokens in row-major order over a `grid` of (rows, cols) patches.

- `word_heatmaps`: each text token's map over the image, per step / layer / head, as in DAAM
  (Tang et al. 2023: the cross-attention a word receives from every image position, aggregated over
  layers, heads and timesteps); `aggregate` takes the mean over any of those axes.
- `sink_stats` / `sink_tokens`: RefAM's global attention sinks (Kukleva et al. 2025, METHODS §2.5):
  text tokens that receive high and spatially flat attention from the image (high mean, low
  coefficient of variation over image positions) in most heads and layers.  Their maps carry little
  meaning and are best discarded before aggregating (RefAM's "attention magnets").  The thresholds
  are ours (RefAM's are unverified): mean >= `ratio` x the text tokens' median mean, CV <= `cv_max`;
  masked tokens (receiving exactly 0) are not counted in the median.
- `grounding`: per head, how well a word's heatmap finds the ground-truth mask of the object the
  word names: AUROC of the heatmap as a score for "this patch belongs to the object" (0.5 = chance,
  1 = perfect), and IoU of the top-k patches (k = the mask's patch count) with the mask.  Heads are
  then ranked by what they ground (`rank_heads`).
- `referral_map`: RefAM's referral map: subject tokens aggregated over layers and steps, sinks left out.
- `summarise`: the DAAM mean over the steps, the sink statistics and the grounding of a capture in one pass,
  one step's maps at a time (a real pipeline's maps of every step are GBs).
- `object_masks`: ground-truth masks of the words of a scene caption from a (generated) picture,
  with the scene generator's knowledge (core.scenes: the palette and the caption grammar), found among
  any model's text tokens (`word_positions`).

Every family HeadScope loads gives the same arrays (core.dit_capture): SD3 and Flux from their joint
attention, PixArt and Sana from their cross-attention (whose head count may differ from the layer's:
Sana), a capture too large for full maps with each padding run as one text column.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from analytics.metric import Metric
from analytics.vision import Layout, distance_per_head
from core import dit_capture, scene_reading, scenes
from core.errors import ProbeMissing

SINK_RATIO = 2.0  # a sink receives >= 2 x the median text token's mean attention ...
SINK_CV_MAX = 0.5  # ... and is spatially flat: std / mean over image positions <= 0.5
SINK_SHARE = 0.5  # a global sink: flagged in at least half of the (layer, head) maps


def word_heatmaps(a: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """a  # [..., image, text] -> heat  # [..., text, rows, cols]: each text token's received attention
    from every image position, laid out on the patch grid."""
    rows, cols = grid
    if a.shape[-2] != rows * cols:
        raise ValueError(f"{a.shape[-2]} image tokens do not fill a {rows} x {cols} grid")
    moved = np.moveaxis(np.asarray(a, dtype=np.float32), -1, -2)  # [..., text, image]
    return moved.reshape(moved.shape[:-1] + (rows, cols))


def aggregate(heat: np.ndarray, steps=None, layers=None, heads=None, normalise: bool = True) -> np.ndarray:
    """heat  # [step, layer, head, text, rows, cols] -> [text, rows, cols]: the mean over the chosen
    steps, layers and heads (None = all), as DAAM sums over them; `normalise` scales each token's map
    to a maximum of 1 (DAAM normalises before thresholding)."""
    h = np.asarray(heat, dtype=np.float32)
    for axis, pick in ((0, steps), (1, layers), (2, heads)):
        if pick is not None:
            h = np.take(h, np.atleast_1d(pick), axis=axis)
    out = h.mean(axis=(0, 1, 2))
    if normalise:
        peak = out.max(axis=(-2, -1), keepdims=True)
        out = out / np.where(peak > 0, peak, 1)
    return out


def referral_map(heat: np.ndarray, subjects: list[int], sinks: np.ndarray | None = None, steps=None,
                 layers=None) -> np.ndarray:
    """RefAM's zero-shot referral map: the subject tokens' heatmaps aggregated over layers, heads and
    timesteps, sink tokens (global attention magnets) left out.  heat  # [step, layer, head, text,
    rows, cols] -> [rows, cols] scaled to a maximum of 1."""
    keep = [t for t in subjects if sinks is None or not sinks[t]]
    if not keep:
        return np.zeros(heat.shape[-2:], dtype=np.float32)
    out = aggregate(heat, steps=steps, layers=layers, normalise=True)[keep].mean(0)
    peak = out.max()
    return out / peak if peak > 0 else out


@dataclass
class SinkStats:
    """Received attention of each text token from the image queries."""

    mean: np.ndarray  # [step, layer, head, text]: mean over image positions
    cv: np.ndarray  # [step, layer, head, text]: coefficient of variation over image positions
    flagged: np.ndarray  # [step, layer, head, text] bool: a sink in that map
    share: np.ndarray  # [text]: fraction of (step, layer, head) maps in which the token is a sink
    global_sink: np.ndarray  # [text] bool: share >= SINK_SHARE
    attended: np.ndarray  # [text] bool: read in some map (a masked token, PixArt's and Sana's padding, never is)


def sink_stats(a: np.ndarray, ratio: float = SINK_RATIO, cv_max: float = SINK_CV_MAX,
               share_min: float = SINK_SHARE, members=None) -> SinkStats:
    """RefAM sink statistics of a  # [step, layer, head, image, text] (module docstring).  `members`  # [text]:
    the tokens each column stands for (a "split" capture sums a padding run into one column,
    core.dit_capture.column_positions): a column's attention is divided by them, so a run is judged, and
    charted, as its average token, as the tokens of a "full" capture are (summed, 300 pads made a "sink")."""
    return sinks_of(*map_stats(a, members), ratio, cv_max, share_min)


def map_stats(a: np.ndarray, members=None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, cv)  # [..., text] each: what each text column receives from the image positions of each map
    of a  # [..., image, text] (its mean, and std / mean), a column divided by its `members` first."""
    a = np.asarray(a, dtype=np.float32)
    if members is not None:
        a = a / np.asarray(members, dtype=np.float32)
    mean = a.mean(axis=-2)
    return mean, a.std(axis=-2) / np.maximum(mean, 1e-12)


def sinks_of(mean: np.ndarray, cv: np.ndarray, ratio: float = SINK_RATIO, cv_max: float = SINK_CV_MAX,
             share_min: float = SINK_SHARE) -> SinkStats:
    """RefAM's decision over the maps' `map_stats`  # [step, layer, head, text] each (`sink_stats`)."""
    # the median over the columns the map can attend: a masked column (PixArt's and Sana's padding)
    # receives exactly 0 and is left out, or 280 masked pads would make every word a "sink"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a map with every column masked: no median, no sink
        median = np.nanmedian(np.where(mean > 0, mean, np.nan), axis=-1, keepdims=True)
    flagged = (mean >= ratio * np.maximum(median, 1e-12)) & (cv <= cv_max)
    share = flagged.reshape(-1, flagged.shape[-1]).mean(0)
    attended = (mean > 0).reshape(-1, mean.shape[-1]).any(0)
    return SinkStats(mean=mean, cv=cv, flagged=flagged, share=share, global_sink=share >= share_min, attended=attended)


def sink_tokens(a: np.ndarray, **kwargs) -> np.ndarray:
    """[text] bool: the global sink tokens of a  # [step, layer, head, image, text]."""
    return sink_stats(a, **kwargs).global_sink


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """mask  # [H, W] bool -> [rows, cols] float: the share of each patch the mask covers."""
    rows, cols = grid
    h, w = mask.shape
    if h % rows or w % cols:
        raise ValueError(f"a {h} x {w} mask does not split into a {rows} x {cols} grid")
    return np.asarray(mask, dtype=np.float32).reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for bool `labels` (Mann-Whitney U, ties counted half);
    nan when one class is empty."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], len(s)]
    for a0, a1 in zip(starts, ends):
        ranks[order[a0:a1]] = (a0 + a1 + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def topk_iou(heat: np.ndarray, labels: np.ndarray, k: int | None = None) -> float:
    """IoU between the k highest cells of `heat` and bool `labels` (k = labels.sum() by default)."""
    h = np.asarray(heat, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    k = int(y.sum()) if k is None else k
    if k == 0:
        return float("nan")
    top = np.zeros(len(h), dtype=bool)
    top[np.argsort(-h, kind="stable")[:k]] = True
    return float((top & y).sum() / (top | y).sum())


@dataclass
class Grounding:
    """Per head, how well each grounded word's heatmap finds its object."""

    words: list[int]  # text-token indices that have a mask
    auroc: np.ndarray  # [step, layer, head, word]
    iou: np.ndarray  # [step, layer, head, word]

    def score(self, metric: str = "auroc", steps=None) -> np.ndarray:
        """[layer, head]: the metric averaged over words (and the chosen steps, None = all); nan for a head
        with no scored word (e.g. every word's object missing from the picture)."""
        values = self.auroc if metric == "auroc" else self.iou
        if steps is not None:
            values = np.take(values, np.atleast_1d(steps), axis=0)
        if not values.size:
            return np.zeros(values.shape[1:3])
        with warnings.catch_warnings():  # an all-nan head is nan, said once in the docstring, not warned
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(values, axis=(0, 3))


def grounding(heat: np.ndarray, masks: dict[int, np.ndarray], grid: tuple[int, int],
              cover: float = 0.5) -> Grounding:
    """heat  # [step, layer, head, text, rows, cols]; masks: text-token index -> [H, W] bool mask of the
    object that token names.  A patch counts as the object's when the mask covers >= `cover` of it."""
    words = sorted(masks)
    steps, layers, heads = heat.shape[:3]
    au = np.full((steps, layers, heads, len(words)), np.nan, dtype=np.float32)
    io = np.full_like(au, np.nan)
    for w_i, token in enumerate(words):
        labels = mask_to_grid(masks[token], grid) >= cover
        if not labels.any():
            continue
        for s in range(steps):
            for layer in range(layers):
                for h in range(heads):
                    m = heat[s, layer, h, token]
                    au[s, layer, h, w_i] = auroc(m, labels)
                    io[s, layer, h, w_i] = topk_iou(m, labels)
    return Grounding(words=words, auroc=au, iou=io)


def rank_heads(scores: np.ndarray, top: int | None = None) -> list[tuple[int, int, float]]:
    """(layer, head, score) sorted best first; nan scores last."""
    flat = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    order = np.argsort(-flat, axis=None, kind="stable")
    out = [(int(i // scores.shape[1]), int(i % scores.shape[1]), float(scores.flat[i])) for i in order]
    return out[:top] if top else out


def _piece(token: str) -> str:
    """A token's text without the tokenizer's word markers: WordPiece "##", SentencePiece "▁", byte-BPE
    "Ġ", CLIP's "</w>"."""
    token = token[2:] if token.startswith("##") else token
    token = token[1:] if token[:1] in ("▁", "Ġ") else token
    return token.replace("</w>", "").lower()


def word_positions(words: list[str], text_tokens: list[str]) -> list[int] | None:
    """The text-token index where each of `words` starts, the words read in order from consecutive tokens
    (a word may span several sub-word tokens); the last place they all line up (SD3 reads the prompt
    twice, CLIP's tokens then T5's: the T5 ones), or None when they never do."""
    pieces = [_piece(t) for t in text_tokens]
    for start in range(len(pieces) - 1, -1, -1):
        found, i = [], start
        for word in words:
            found.append(i)
            read = ""
            while len(read) < len(word) and i < len(pieces):
                read += pieces[i]
                i += 1
            if read != word.lower():
                break
        else:
            return found
    return None


def object_masks(image: np.ndarray, caption: str, text_tokens: list[str], roles=("colour", "shape")) -> dict[int, np.ndarray]:
    """Text-token index -> [H, W] bool mask, for the words of a scene caption whose role is in `roles`.

    The mask is what the picture shows of the word's object: the largest blob of the requested colour
    (core.scenes: palette and caption grammar).  Words whose object is not found get no mask.  The
    words are found among any model's text tokens (`word_positions`: MiniLM's, CLIP's, T5's, Gemma's);
    a caption that is not a scene caption, or tokens that do not spell its words, give {}.
    """
    try:
        words = scenes.caption_words(caption)
    except ValueError:
        return {}
    positions = word_positions([w for w, _, _ in words], text_tokens)
    if positions is None:
        return {}
    specs = scenes.parse_caption(caption)
    colours = scene_reading.colour_masks(image)
    blobs = {}
    for index, spec in enumerate(specs):
        blob = scene_reading.largest_component(colours[spec.colour])
        if blob.sum() >= 4:
            blobs[index] = blob
    return {positions[i]: blobs[obj] for i, (_word, obj, role) in enumerate(words)
            if obj is not None and role in roles and obj in blobs}


# ---- head metrics for the Head atlas (analytics.METRICS) -------------------------------------------

def text_mass(capture) -> np.ndarray:
    """[layer, head]: the attention mass image queries put on text keys, over the step-averaged maps.

    In joint attention (SD3's MM-DiT, Flux) every image token's row covers image and text keys; this is
    the share of it that reads the prompt: how much of a head is cross-attention (0 = pure image
    self-attention; SD3.5's image-only layers are 0 by construction).  A capture too large for full maps
    holds coarse maps (regions and text columns), whose image rows carry the same mass.  PixArt and Sana
    read the prompt in separate cross-attention modules, whose rows are all text: no share to measure."""
    if dit_capture.layout(capture).cross:
        raise ProbeMissing(f"{capture.meta.name} reads the prompt through separate cross-attention modules; the "
                           "text mass is a joint-attention measure (SD3, Flux, shapes-dit).")
    image, text = capture.spans["image"], capture.spans["text"]
    return np.stack([np.asarray(capture.attention(l)[:, image.start:image.stop, text.start:text.stop],
                                dtype=np.float32).sum(-1).mean(-1) for l in range(capture.meta.n_layers)])


@dataclass
class WordSummary:
    """What the Diffusion page draws from every step's word maps (`summarise`)."""

    daam: np.ndarray  # [layer, head, image, text] float32: the word maps' mean over the steps (DAAM's aggregate)
    stats: SinkStats  # RefAM's statistics of every map, each padding run judged as its average token
    grounding: Grounding | None  # the caption words' grounding per step, layer and head; None: no masks given


def summarise(capture, masks: dict[int, np.ndarray] | None = None, progress=None) -> WordSummary:
    """One pass over a DiT capture's steps, one step's word maps  # [layer, head, image, text] in memory at a
    time: a real pipeline's maps of every step are GBs (SD3-medium at 1,024², 28 steps: 2.6 GB as stored,
    float16).  `masks`: the objects the caption's words name (`object_masks`); `progress(done, total)`."""
    grid, members = capture.meta.grid, [len(p) for p in dit_capture.column_positions(capture)]
    n = dit_capture.n_steps(capture)
    total, means, cvs, parts = None, [], [], []
    for s in range(n):
        a = dit_capture.image_to_text(capture, s)  # [1, layer, head, image, text]
        total = a[0] if total is None else np.add(total, a[0], out=total)
        mean, cv = map_stats(a, members)
        means.append(mean)
        cvs.append(cv)
        if masks:
            parts.append(grounding(word_heatmaps(a, grid), masks, grid))
        if progress is not None:
            progress(s + 1, n)
    if total is None:  # no step recorded: the empty step axis of the stored arrays
        empty = dit_capture.image_to_text(capture)  # [0, layer, head, image, text]
        return WordSummary(np.zeros(empty.shape[1:], np.float32), sink_stats(empty, members=members), None)
    found = Grounding(sorted(masks), np.concatenate([g.auroc for g in parts]),
                      np.concatenate([g.iou for g in parts])) if masks else None
    return WordSummary(total / n, sinks_of(np.concatenate(means), np.concatenate(cvs)), found)


def grounding_per_head(capture, metric: str = "auroc") -> np.ndarray:
    """[layer, head]: `grounding` of the capture's caption words on its own picture, over every step."""
    image = dit_capture.generated_image(capture)
    masks = object_masks(image, capture.spec.prompt, dit_capture.text_tokens(capture)) if image is not None else {}
    if not masks:
        raise ProbeMissing("Grounding needs a scene caption whose objects appear in the picture "
                           "(e.g. “a green triangle at the center”).")
    return summarise(capture, masks).grounding.score(metric)


def distance_px(capture) -> np.ndarray:
    """[layer, head]: mean attention distance in pixels among the image tokens (analytics.vision); in a
    capture too large for full maps, among the regions of its coarse maps (centre to centre)."""
    image = dit_capture.generated_image(capture)
    info = dit_capture.layout(capture)
    if info.mode != "split":
        return distance_per_head(capture, Layout.of(capture, image))
    patch_px = image.shape[0] / capture.meta.grid[0] if image is not None else 1.0
    return distance_per_head(capture, Layout(grid=info.regions, n_prefix=capture.spans["image"].start,
                                             patch_px=patch_px * info.pool))


DIT = ("dit",)
KUKLEVA = "Kukleva et al. 2025, RefAM (METHODS §2.5); Tang et al. 2023, DAAM"
DIT_METRICS = [
    Metric(name="dit_text_mass", title="Text attention mass (cross-attention share)", paper=KUKLEVA, kind="head",
           modalities=DIT,
           explanation="Share of the image tokens' attention that reads the prompt's tokens (mean over steps): "
                       "0 = pure image self-attention, high = a cross-attention head.",
           compute=lambda capture, **_: text_mass(capture)),
    Metric(name="dit_grounding", title="Grounding AUROC (word maps vs object masks)", paper=KUKLEVA, kind="head",
           modalities=DIT,
           explanation="How well each head's word heatmaps find the objects the caption's colour and shape words "
                       "name in the generated picture (0.5 = chance, 1 = perfect), mean over words and steps.",
           compute=lambda capture, **_: grounding_per_head(capture), threshold=0.5),
    Metric(name="dit_attn_distance_px", title="Mean attention distance (px)",
           paper="Dosovitskiy et al. 2021, An Image is Worth 16x16 Words (Fig. 7: mean attention distance)",
           kind="head", modalities=DIT,
           explanation="Attention-weighted mean distance in pixels between an image token and the image tokens it "
                       "reads (text keys left out): small = local head, large = global.",
           compute=lambda capture, **_: distance_px(capture)),
]


__all__ = ["word_heatmaps", "aggregate", "referral_map", "SinkStats", "sink_stats", "map_stats", "sinks_of",
           "sink_tokens", "mask_to_grid", "auroc", "topk_iou", "Grounding", "grounding", "rank_heads", "object_masks",
           "word_positions", "WordSummary", "summarise", "SINK_RATIO", "SINK_CV_MAX", "SINK_SHARE", "text_mass",
           "grounding_per_head", "distance_px", "DIT_METRICS"]
