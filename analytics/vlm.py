"""Vision-language head analytics (pure numpy: no torch, no streamlit).

Inputs are a VLM capture's maps attn  # [head, query, key] per LM layer (capture/vlm/adapter.py: causal
"tril", or "full" where the model's mask is not causal) with the spans "question", "prompt" and
"answer", its image tokens and their boxes on the picture (analytics.vlm_picture.PictureLayout: stored
per capture, or one grid over the "image" span), and the residual stream it stores beside them
(hidden  # [layer, token, dim]).  Per-token quantities are computed on the image tokens, then painted
onto the picture's raster for the figures and the pointing game.

- **Visual sinks** (VAR, Kang et al., ICLR 2025, METHODS §2.2): massive-activation dimensions of this
  model found from the residual stream (analytics.sinks.massive_dims: dims whose peak φ(x) = |x / RMS(x)|
  over the prompt's text tokens in layers 2..L-1 exceeds τ = 20), a token is a sink where its peak φ on
  those dims exceeds τ = 20 (prefill only); sinks inside the image span are the *visual sinks*.
- **Image-centric heads** (VAR): a (head, query row) is image-centric when its visual mass
  Σ_{j∈img} A_ij >= 0.2 (`summ`) and (mass on visual sinks) / (visual mass) <= ρ = 0.5.  VAR decides per
  row at every decoding step; as a head score we take the share of the rows that predict a token (the
  last prompt row and the answer rows: `decode_rows`) that pass, and call a head image-centric when
  that share is >= 0.5 (our summary; VAR has no head-level cut-off).
- **Gaze shifts** (GIFT, Qi et al. 2025, METHODS §2.3): while the model reads the question, each
  question token t's attention over the image tokens, a_t (mean over heads and a layer set), and the
  positive change g_t = max(0, a_t - a_{t-1}) (t-1 is the token before, for the first question token
  the newline after the image).  The saliency map S = normalise(Σ_t g_t); we normalise to a maximum of
  1 (GIFT's normalisation is unverified).  Layer set: unverified in GIFT; the default here is VAR's
  layers 2..L-1 and every head.  The filmstrip is one g map per question word.
- The GIFT saliency is checked against ground truth with the pointing game (analytics.pointing).

`VLM_METRICS` lists the head / token metrics; analytics/__init__.py adds them to `METRICS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analytics.metric import Metric
from analytics.sinks import VAR_FIRST_LAYER, VAR_TAU, massive_dims, massive_scores
from analytics.vlm_picture import PictureLayout
from core.errors import ProbeMissing

VAR_SUMM = 0.2  # VAR `summ`: minimum visual attention mass of an image-centric row
VAR_RHO = 0.5  # VAR ρ: maximum share of the visual mass on visual sinks
CENTRIC_SHARE = 0.5  # our head-level summary: image-centric on at least half the decode rows
PAPERS = {
    "var": "Kang et al. 2025, See What You Are Told: Visual Attention Sink in LMMs (VAR, ICLR 2025)",
    "gift": "Qi et al. 2025, GIFT: gaze-shift guidance (METHODS §2.3)",
}


# ---- rows and spans ----------------------------------------------------------------------------

def decode_rows(spans: dict[str, range], n_tokens: int) -> range:
    """The query rows that predict a token: the last prompt row and every answer row but the last
    (which predicts nothing that was kept); the last row alone for a prefill-only capture."""
    prompt = spans.get("prompt", range(n_tokens))
    answer = spans.get("answer")
    if answer is not None and len(answer):
        return range(prompt.stop - 1, answer.stop - 1)
    return range(n_tokens - 1, n_tokens)


def layer_set(n_layers: int, layers: Sequence[int] | None = None) -> list[int]:
    """The layers gaze maps average over: `layers`, or VAR's 2..L-1 (every layer on a tiny model)."""
    if layers is not None:
        return [int(l) for l in layers]
    chosen = list(range(min(VAR_FIRST_LAYER, n_layers - 1), n_layers))
    return chosen or list(range(n_layers))


# ---- visual mass and image-centric heads (VAR) ---------------------------------------------------

def _keys(image) -> slice | np.ndarray:
    """An index over the key axis for the image tokens: `image` a range (consecutive), a slice, or positions."""
    if isinstance(image, range):
        return slice(image.start, image.stop)
    return image if isinstance(image, slice) else np.asarray(image, np.int64)


def _members(image) -> set[int]:
    return set(range(image.start, image.stop)) if isinstance(image, slice) else {int(j) for j in image}


def visual_mass(rows: np.ndarray, image) -> np.ndarray:
    """rows  # [..., query, key] -> [..., query]: Σ_{j ∈ image} A_ij (`image`: the image tokens' positions,
    a range when they are consecutive)."""
    return np.asarray(rows, dtype=np.float32)[..., _keys(image)].sum(-1)


def image_centric_rows(rows: np.ndarray, image, visual_sinks: Sequence[int] = (),
                       summ: float = VAR_SUMM, rho: float = VAR_RHO) -> np.ndarray:
    """bool  # [..., query]: VAR's image-centric rows, visual mass >= summ (0.2) and the share of it on
    the visual sinks (absolute token positions among the image tokens `image`) <= rho (0.5)."""
    rows = np.asarray(rows, dtype=np.float32)
    mass = visual_mass(rows, image)
    members = _members(image)
    sinks = [int(j) for j in visual_sinks if int(j) in members]
    on_sinks = rows[..., sinks].sum(-1) if sinks else np.zeros_like(mass)
    return (mass >= summ) & (on_sinks <= rho * np.maximum(mass, 1e-12))


@dataclass(frozen=True)
class HeadVision:
    """Per head over the decode rows: mass  # [layer, head] mean visual mass; centric  # [layer, head]
    the share of rows that are image-centric (VAR)."""

    mass: np.ndarray
    centric: np.ndarray

    def centric_heads(self, share: float = CENTRIC_SHARE) -> np.ndarray:
        """bool  # [layer, head]: image-centric on at least `share` of the decode rows."""
        return self.centric >= share

    def per_layer(self, share: float = CENTRIC_SHARE) -> np.ndarray:
        """[layer]: how many heads of each layer are image-centric."""
        return self.centric_heads(share).sum(-1)


def head_vision(capture, visual_sinks: Sequence[int] = (), rows: range | None = None,
                summ: float = VAR_SUMM, rho: float = VAR_RHO) -> HeadVision:
    """`HeadVision` of a VLM capture, reading only the chosen rows (default `decode_rows`) of each layer."""
    image = PictureLayout.of(capture).keys
    rows = rows or decode_rows(capture.spans, capture.n_tokens)
    mass, centric = [], []
    for layer in range(capture.meta.n_layers):
        block = capture.rows(layer, rows.start, rows.stop)  # [head, rows, keys]
        mass.append(visual_mass(block, image).mean(-1))
        centric.append(image_centric_rows(block, image, visual_sinks, summ, rho).mean(-1))
    return HeadVision(mass=np.stack(mass), centric=np.stack(centric).astype(np.float32))


# ---- visual sinks (VAR massive activations) ------------------------------------------------------

@dataclass(frozen=True)
class VisualSinks:
    """dims: the model's massive dimensions; phi  # [token] peak φ on them (prompt tokens; 0 after);
    tokens: positions with φ > tau; visual: those among the image tokens; patches: their (row, col) on
    the grid (on a capture's picture raster: the raster cells their boxes cover, `capture_sinks`)."""

    dims: list[int]
    phi: np.ndarray
    tokens: list[int]
    visual: list[int]
    patches: list[tuple[int, int]]
    tau: float


def visual_sinks(hidden, image, grid: tuple[int, int], n_prompt: int | None = None,
                 tau: float = VAR_TAU, first_layer: int = VAR_FIRST_LAYER) -> VisualSinks:
    """VAR sink tokens from the residual stream hidden  # [layer, token, dim] (indexable by layer),
    prefill only (the first `n_prompt` tokens), `image` the image tokens' positions (row-major over
    `grid`).  Defaults τ = 20, layers 2..L-1.

    The massive dimensions are found on the prompt's *text* tokens (VAR: "the dimensions with outsized
    activations on sink tokens (BOS, etc.)"), then every prompt token, image tokens included, is scored
    on them: a projector's image features can be large in dimensions that mark no sink at all."""
    n_tokens = np.asarray(hidden[0]).shape[0]
    n_prompt = n_tokens if n_prompt is None else int(n_prompt)
    order = {int(j): k for k, j in enumerate(image)}  # position -> index among the image tokens
    text = [j for j in range(n_prompt) if j not in order]
    dims = massive_dims(_Tokens(hidden, text or list(range(n_prompt))), tau, first_layer)
    phi = np.zeros(n_tokens, dtype=np.float32)
    phi[:n_prompt] = massive_scores(_Tokens(hidden, list(range(n_prompt))), dims, tau, first_layer)
    tokens = [int(j) for j in np.flatnonzero(phi > tau)]
    visual = [j for j in tokens if j in order]
    patches = [divmod(order[j], grid[1]) for j in visual]
    return VisualSinks(dims=dims, phi=phi, tokens=tokens, visual=visual, patches=patches, tau=tau)


class _Tokens:
    """hidden[l][tokens] for every layer, read one layer at a time."""

    def __init__(self, hidden, tokens: list[int]):
        self.hidden, self.tokens = hidden, tokens

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, layer: int) -> np.ndarray:
        return np.asarray(self.hidden[layer], dtype=np.float32)[self.tokens]


def stored_hidden(capture):
    """The residual stream stored with a VLM capture (capture/vlm/adapter.py HIDDEN), [layer, token, dim]."""
    try:
        return capture.store.get_array(capture.key, "hidden")
    except Exception as exc:  # noqa: BLE001 - absent or unreadable
        raise ProbeMissing("This capture has no stored residual stream; capture it again "
                           "(VLM captures store it since the Gaze page).") from exc


def stored_vision_maps(capture) -> np.ndarray:
    """The vision tower's maps stored with a VLM capture (capture/vlm/adapter.py VISION),
    [layer, head, token, token] with the tower's prefix tokens (CLS, registers) first."""
    try:
        return capture.store.get_array(capture.key, "vision_attention")
    except Exception as exc:  # noqa: BLE001 - absent or unreadable
        raise ProbeMissing("This capture has no vision-tower maps: HeadScope records a tower that is a ViT over "
                           "one view of the picture (not Qwen2-VL's), and older captures did not store them.") from exc


def tower_grid(capture) -> tuple[int, int]:
    """(rows, cols) of the patches in the stored vision-tower maps (the model's grid for older captures)."""
    try:
        return tuple(int(x) for x in capture.store.get_array(capture.key, "vision_grid"))
    except Exception:  # noqa: BLE001 - stored before the grid was: the tower saw the model's grid
        return tuple(capture.meta.grid)


def vision_cls_maps(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """maps  # [head, token, token] of one vision-tower layer -> [head, rows, cols]: what the tower's first
    token (CLS) attends to on each patch (Caron et al. 2021's self-attention maps; prefix tokens dropped);
    a tower without a CLS token (SigLIP) gives the mean attention each patch receives from the patches."""
    rows, cols = grid
    prefix = maps.shape[-1] - rows * cols
    if prefix < 0:
        raise ValueError(f"a vision tower with {maps.shape[-1]} tokens has fewer than {rows} x {cols} patches")
    weights = maps[:, 0, prefix:] if prefix else np.asarray(maps, dtype=np.float32).mean(1)
    return np.asarray(weights, dtype=np.float32).reshape(maps.shape[0], rows, cols)


def capture_sinks(capture, tau: float = VAR_TAU) -> VisualSinks:
    """`visual_sinks` of a VLM capture, from its stored residual stream; `patches` are the cells of its
    picture's raster (analytics.vlm_picture) that its visual sinks' boxes cover."""
    layout = PictureLayout.of(capture)
    found = visual_sinks(stored_hidden(capture), layout.positions.tolist(), layout.raster,
                         capture.spans["prompt"].stop, tau)
    cells = sorted({cell for j in found.visual for cell in layout.cells(layout.index(j))})
    return VisualSinks(dims=found.dims, phi=found.phi, tokens=found.tokens, visual=found.visual, patches=cells,
                       tau=found.tau)


# ---- gaze shifts (GIFT) ----------------------------------------------------------------------------

def gaze_shifts(a: np.ndarray) -> np.ndarray:
    """a  # [t + 1, ...] (the token before the question, then each question token; per image token or
    per raster cell) -> g  # [t, ...], g_t = max(0, a_t - a_{t-1}) (GIFT)."""
    a = np.asarray(a, dtype=np.float32)
    return np.maximum(a[1:] - a[:-1], 0.0)


def saliency(g: np.ndarray) -> np.ndarray:
    """g  # [t, ...] -> S  # [...] = Σ_t g_t normalised to a maximum of 1 (zeros stay zeros)."""
    total = np.asarray(g, dtype=np.float32).sum(0)
    top = float(total.max()) if total.size else 0.0
    return total / top if top > 0 else total


@dataclass(frozen=True)
class Gaze:
    """On the picture's raster (analytics.vlm_picture): a  # [t + 1, rows, cols] image attention of the token
    before the question and of each question token, g  # [t, rows, cols] gaze shifts, S  # [rows, cols]
    saliency; per image token: token_saliency  # [image token] (what GIFT's edit reads, S_j), positions
    their sequence positions; words: (label, indices into g)."""

    a: np.ndarray
    g: np.ndarray
    saliency: np.ndarray
    tokens: list[str]
    words: list[tuple[str, list[int]]]
    layers: list[int]
    heads: list[int]
    token_saliency: np.ndarray
    positions: list[int]

    def filmstrip(self) -> np.ndarray:
        """[word, rows, cols]: the gaze shift of each question word (the sum over its tokens)."""
        if not self.words:
            return np.zeros((0,) + self.saliency.shape, np.float32)
        return np.stack([self.g[idx].sum(0) for _, idx in self.words])


def question_words(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Group tokens into words: a token that starts with a space (or is the first) starts a word;
    punctuation stays with the word before it.  Returns (word, token indices)."""
    words: list[tuple[str, list[int]]] = []
    for i, token in enumerate(tokens):
        text = token.replace("␣", " ").replace("Ġ", " ")
        if not words or (text.startswith(" ") and text.strip()):
            words.append((text.strip(), [i]))
        else:
            label, idx = words[-1]
            words[-1] = (label + text.strip(), idx + [i])
    return [(w or "␣", idx) for w, idx in words]


def gaze(capture, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Gaze:
    """GIFT's gaze shifts of a VLM capture over its question tokens, mean over `heads` (default every
    head) and `layers` (default VAR's 2..L-1): per image token, then painted onto the picture's raster."""
    question = capture.spans["question"]
    if not len(question):
        raise ValueError("This capture has no question tokens.")
    layout = PictureLayout.of(capture)
    chosen = layer_set(capture.meta.n_layers, layers)
    heads = list(range(capture.meta.n_heads)) if heads is None else [int(h) for h in heads]
    start, stop = question.start - 1, question.stop  # the token before the question, then the question
    total = None
    for layer in chosen:
        block = capture.rows(layer, start, stop)[heads]  # [head, t + 1, keys]
        on_image = layout.image_keys(block).mean(0)  # [t + 1, image token]
        total = on_image if total is None else total + on_image
    a = total / len(chosen)  # [t + 1, image token]
    g = gaze_shifts(a)  # [t, image token]
    tokens = [capture.tokens[i] for i in question]
    return Gaze(a=layout.paint(a), g=layout.paint(g), saliency=saliency(layout.paint(g)), tokens=tokens,
                words=question_words(tokens), layers=chosen, heads=heads, token_saliency=saliency(g),
                positions=layout.positions.tolist())


def gaze_per_head(capture) -> np.ndarray:
    """[layer, head]: each head's total positive gaze shift over the question (Σ_t Σ_patches g_t): how
    much its image attention moves to new places while it reads the question."""
    question = capture.spans["question"]
    layout = PictureLayout.of(capture)
    out = []
    for layer in range(capture.meta.n_layers):
        block = np.asarray(capture.rows(layer, question.start - 1, question.stop), np.float32)  # [head, t+1, keys]
        a = layout.image_keys(block)  # [head, t + 1, image token]
        out.append(np.maximum(a[:, 1:] - a[:, :-1], 0.0).sum(axis=(1, 2)))
    return np.stack(out)


# ---- vision-aware head divergence (VHD, read from probes.vlm) ---------------------------------

T_VHD_K = 10  # top-k heads averaged by T-VHD (unverified in He et al.; exposed)


def t_vhd(vhd: np.ndarray, k: int = T_VHD_K) -> np.ndarray:
    """vhd  # [layer, head, token] -> T-VHD  # [token]: the mean of the top-k head values at each answer
    token (He et al., ACL 2025, METHODS §3.1); hallucinated object words tend to score lower."""
    flat = np.asarray(vhd, dtype=np.float32).reshape(-1, np.shape(vhd)[-1])  # [layer * head, token]
    k = max(1, min(int(k), flat.shape[0]))
    return -np.sort(-flat, axis=0)[:k].mean(0)


def stored_vhd(capture) -> np.ndarray:
    """vhd  # [layer, head, answer token] stored with the capture by probes.vlm.vhd."""
    try:
        return np.asarray(capture.store.get_array(capture.key, "vhd"), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - absent: the two-pass measurement has not run
        raise ProbeMissing("VHD needs two extra passes (with and without the picture): press “Compute VHD” on "
                           "the Gaze page, or call probes.vlm.vhd(capture).") from exc


# ---- metrics over a Capture ---------------------------------------------------------------------------

def _sink_positions(capture) -> list[int]:
    try:
        return capture_sinks(capture).visual
    except Exception:  # noqa: BLE001 - no residual stream: image-centric without sink exclusion
        return []


VLM = ("vlm",)
VLM_METRICS = [
    Metric(name="vlm_visual_mass", title="Visual attention mass", paper=PAPERS["var"], kind="head",
           modalities=VLM,
           explanation="Mean attention the rows that predict the answer put on the image tokens.",
           compute=lambda capture, **_: head_vision(capture).mass, threshold=VAR_SUMM),
    Metric(name="vlm_image_centric", title="Image-centric share (VAR)", paper=PAPERS["var"], kind="head",
           modalities=VLM,
           explanation="Share of the answer-predicting rows with visual mass ≥ 0.2 and ≤ 50% of it on visual "
                       "sinks; ≥ 0.5 marks an image-centric head.",
           compute=lambda capture, **_: head_vision(capture, _sink_positions(capture)).centric,
           threshold=CENTRIC_SHARE, params={"summ": VAR_SUMM, "rho": VAR_RHO}),
    Metric(name="vlm_gaze_shift", title="Gaze shift while reading the question (GIFT)", paper=PAPERS["gift"],
           kind="head", modalities=VLM,
           explanation="Total positive change of a head's image attention from one question token to the next: "
                       "heads whose gaze follows the question.",
           compute=lambda capture, **_: gaze_per_head(capture)),
    Metric(name="vlm_vhd", title="Vision-aware head divergence (VHD)", paper="He et al. 2025, VHD / VHR (ACL 2025)",
           kind="head", modalities=VLM,
           explanation="How far a head's output on the answer moves when the picture is taken away (L2, mean over "
                       "the answer tokens): heads that use the image.",
           compute=lambda capture, **_: stored_vhd(capture).mean(-1)),
    Metric(name="vlm_visual_sink", title="Massive-activation score φ (visual sinks)", paper=PAPERS["var"],
           kind="token", modalities=VLM,
           explanation="Peak |x/RMS(x)| of each prompt token on the model's massive dimensions (layers 2..L-1); "
                       "> 20 marks a sink, inside the image a visual sink.",
           compute=lambda capture, **_: capture_sinks(capture).phi, threshold=VAR_TAU),
]


__all__ = ["VAR_SUMM", "VAR_RHO", "CENTRIC_SHARE", "decode_rows", "layer_set", "visual_mass", "image_centric_rows",
           "HeadVision", "head_vision", "VisualSinks", "visual_sinks", "capture_sinks", "stored_hidden", "gaze_shifts",
           "tower_grid", "vision_cls_maps", "stored_vision_maps",
           "saliency", "Gaze", "gaze", "gaze_per_head", "question_words", "t_vhd", "stored_vhd", "T_VHD_K",
           "VLM_METRICS"]
