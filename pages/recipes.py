"""The seed papers' findings in one click: one recipe per finding, each a link (ViewState query parameters)
to the view that shows it on an embedded model, two sentences (what the paper found, what HeadScope
measures here) and the numbers, read from this server's cache.

Nothing here runs a model: `numbers(store)` reads cached captures and probe results (None when they are
not there yet, and `missing` says what opening the link runs and for how long); `bench/recipes.py` runs
them all and prints the table in the README.  No streamlit either: pages/home.py draws the cards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

import capture
import probes
from analytics import METRICS, ProbeMissing, attribution, vision, vlm
from analytics import dit as dit_analytics
from capture import RunSpec, dit_capture, dit_presets, presets, scenes
from pages.shared import DIT_PROMPT, VLM_IMAGE, VLM_QUESTION
from state import DEFAULT_PROMPT as SINK_PROMPT

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ATLAS_PROMPTS = (SINK_PROMPT, "In 1851 the lighthouse keeper wrote that the storm had broken three windows and the "
                 "lamp.")  # the pattern atlas recipe's inputs, with ACT_PROMPT
ACT_PROMPT = ("The harbour was quiet that night. The keeper wrote three lines in the log, trimmed the lamp, and "
              "watched the boats come in one by one. At midnight the wind turned, the rain began, and the last "
              "boat, late and low in the water, came round the point. The keeper")
NEEDLE = 2  # assets/needles.json: "The name of the inspector's grey horse was Captain Marlowe."
MASKED = 30  # heads masked (Wu et al.'s README example)


def needle_prompt() -> str:
    """The haystack (assets/haystack.txt) with the needle at a sentence boundary half way in, and Wu et al.'s
    question (probes.needle asks it the same way)."""
    needle = json.loads((ASSETS / "needles.json").read_text(encoding="utf-8"))["needles"][NEEDLE]
    text = (ASSETS / "haystack.txt").read_text(encoding="utf-8").strip()
    middle = text.find(". ", len(text) // 2) + 1
    return (text[:middle] + " " + needle["needle"] + text[middle:] +
            f" Based on the content of the book, Question: {needle['question']}\nAnswer:")


def needle_spec() -> RunSpec:
    return RunSpec(model="smollm2", prompt=needle_prompt(), chat=True, max_new_tokens=20)


def act_spec() -> RunSpec:
    return RunSpec(model="smollm2", prompt=ACT_PROMPT, max_new_tokens=24)


def dit_spec(intervention=capture.Intervention()) -> RunSpec:
    return RunSpec(model="shapes-dit", prompt=DIT_PROMPT, seed=0, steps=20, intervention=intervention)


def vlm_spec() -> RunSpec:
    return RunSpec(model="shapes-vlm", prompt=VLM_QUESTION, image=VLM_IMAGE, max_new_tokens=capture.VLM_MAX_NEW_TOKENS)


def softpag() -> capture.Intervention:
    return dit_presets.softpag([(1, 0)], u=1.0, scale=dit_presets.DEFAULT_PAG_SCALE)


def _stored(metric: str, model: str = "smollm2", **params) -> np.ndarray | None:
    try:
        return METRICS[metric].compute(None, store=capture.default_store(), revision=capture.revision(model),
                                       model=model, **params)
    except (ProbeMissing, capture.HeadScopeError):
        return None


def _heads(values: np.ndarray, k: int = 3, head: str = "H") -> str:
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), axis=None)[:k]
    return ", ".join(f"L{i // values.shape[1]}{head}{i % values.shape[1]} ({values.flat[i]:.2f})" for i in order)


def _smollm2_meta():
    found = capture.cached(RunSpec(model="smollm2", prompt=SINK_PROMPT))
    return found.meta if found is not None else None


def masking(random: bool = False) -> capture.Intervention | None:
    """Uniform attention on the top-30 retrieval heads of the stored needle probe (or 30 random others)."""
    scores, meta = _stored("retrieval"), _smollm2_meta()
    if scores is None or meta is None:
        return None
    return presets.retrieval_mask(meta, scores=scores, k=MASKED, random=random)


def _generated(found) -> str:
    return " ".join(found.output.text.split())[:70] if found is not None else "not run yet"


# ---- the numbers of each recipe, from the cache -------------------------------------------------------------

def retrieval_numbers() -> str | None:
    scores = _stored("retrieval")
    if scores is None:
        return None
    line = (f"{int((scores > 0.1).sum())} of {scores.size} heads score above 0.1 on the needle sweep; the top: "
            f"{_heads(scores)}.")
    base = capture.cached(needle_spec())
    top, rand = masking(), masking(random=True)
    if base is not None and top is not None:
        masked = capture.cached(replace(needle_spec(), intervention=top))
        control = capture.cached(replace(needle_spec(), intervention=rand))
        line += (f" Asked for the horse's name: “{_generated(base)}”; with the top {MASKED} masked: "
                 f"“{_generated(masked)}”; with {MASKED} random heads masked: “{_generated(control)}”.")
    return line


def act_numbers() -> str | None:
    found = capture.cached(act_spec())
    if found is None:
        return None
    s = METRICS["act_sink"].compute(found)  # [layer, head, token]
    n_prompt = len(found.spans["prompt"])
    hidden = (s[:, :, 1:n_prompt] > 0.1).mean(axis=(0, 1))  # share of heads where each token is a hidden sink
    top = np.argsort(-hidden)[:4] + 1
    line = ("Hidden sinks besides the first token (s_j > 0.1): " +
            ", ".join(f"{found.tokens[j]!r} (token {j}) in {hidden[j - 1]:.0%} of heads" for j in top) + ".")
    after = capture.cached(replace(act_spec(), intervention=presets.act(found.meta)))
    if after is not None:
        pairs = zip(found.tokens[n_prompt:], after.tokens[n_prompt:])
        diff = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        line += (" With ACT on layers 2-28 the continuation " + ("is unchanged." if diff is None else
                 f"parts at generated token {diff}: “{_generated(found)}” → “{_generated(after)}”."))
    return line


def sink_alpha_numbers() -> str | None:
    found = capture.cached(RunSpec(model="smollm2", prompt=SINK_PROMPT))
    if found is None:
        return None
    alpha = METRICS["sink_alpha"].compute(found)  # [layer, head]
    per_layer = alpha.mean(1)
    low = np.argsort(per_layer)[:3]
    return (f"{(alpha > 0.3).mean():.0%} of heads are sink heads (α > 0.3); mean α by layer rises from "
            f"{per_layer[:2].mean():.2f} in layers 0-1 to {per_layer[2:].mean():.2f} after them; the least sink-like "
            f"layers: " + ", ".join(f"L{int(l)} ({per_layer[l]:.2f})" for l in low) + ".")


def induction_numbers() -> str | None:
    induction, previous = _stored("induction"), _stored("prev_token")
    if induction is None or previous is None:
        return None
    return (f"Induction: {int((induction > 0.3).sum())} heads above 0.3, the top {_heads(induction)}; previous-token: "
            f"{int((previous > 0.3).sum())} heads above 0.3, the top {_heads(previous)}.")


def duo_numbers() -> str | None:
    alpha = _stored("duo_gate", granularity="kv")
    if alpha is None:
        return None
    return (f"{(alpha < 0.5).mean():.0%} of the {alpha.size} KV heads gate below 0.5 (streaming: sinks + a recent "
            f"window suffice); the most retrieval-like: {_heads(alpha, head='KV')}.")


def registers_numbers() -> str | None:
    found = capture.cached(RunSpec(model="dinov2-s", image="cat"))
    if found is None or found.store is None:
        return None
    try:
        norms = np.asarray(found.store.get_array(found.key, "vit_token_norms"))  # [layer + 1, token]
    except Exception:  # noqa: BLE001 - the norms probe has not run on this capture
        return None
    layout = vision.Layout.of(found)
    patch = norms[:, layout.patches]  # [layer + 1, patch]
    ratio = patch.max(1) / np.median(patch, 1)
    worst = int(np.argmax(ratio))
    last = found.meta.n_layers - 1
    artifacts = [t for layer in vision.high_norm_tokens(norms, layout, ratio=2.0) for t in layer]
    cls_row = found.attention(last)[:, 0, layout.patches].astype(np.float64).mean(0)  # [patch]: CLS, heads averaged
    return (f"{len(artifacts)} artifact tokens (norm > 2× the median) in any layer: the largest patch norm is "
            f"{ratio[worst]:.2f}× the median (hidden state {worst}), so DINOv2-small has none (Darcet et al. see them "
            f"from ViT-L on). In the last layer the patch CLS reads most takes {cls_row.max():.1%}, an average patch "
            f"{cls_row.mean():.2%}.")


def gaze_numbers() -> str | None:
    found = capture.cached(vlm_spec())
    if found is None:
        return None
    sinks = vlm.capture_sinks(found)
    start = found.spans["prompt"].stop - 1
    reads = np.mean([found.rows(l, start, found.n_tokens).mean(axis=(0, 1)) for l in range(found.meta.n_layers)], 0)
    image = found.spans["image"]
    share = reads[sinks.visual].sum() / max(reads[image.start:image.stop].sum(), 1e-12) if sinks.visual else 0.0
    seen = vlm.gaze(found)
    scene = scenes.make_scene(int(VLM_IMAGE[6:]), scenes.VLM)
    asked = next(qa for qa in scenes.questions(scene) if qa.question == VLM_QUESTION)
    x0, y0, x1, y1 = scene.objects[asked.objects[0]].box
    r, c = np.unravel_index(int(np.argmax(seen.saliency)), seen.saliency.shape)
    h, w = found.image().shape[:2]
    y, x = (r + 0.5) * h / seen.saliency.shape[0], (c + 0.5) * w / seen.saliency.shape[1]
    inside = x0 <= x < x1 and y0 <= y < y1
    return (f"Answer “{_generated(found)}” (expected {asked.answer}). {len(sinks.visual)} visual sink token(s) "
            f"(φ > {sinks.tau:g}) take {share:.0%} of the image attention of the answer rows. The GIFT saliency peaks "
            + ("on the circle the question asks about." if inside else "off the circle the question asks about."))


def dit_numbers() -> str | None:
    found = capture.cached(dit_spec())
    if found is None:
        return None
    a = dit_capture.image_to_text(found)  # [step, layer, head, image, text]
    stats = dit_analytics.sink_stats(a)
    tokens = dit_capture.text_tokens(found)
    sinks = [i for i in range(len(tokens)) if stats.global_sink[i]]
    received = a.mean(axis=(0, 1, 2, 3))  # [text]: what each text token gets from the picture, on average
    top = int(np.argmax(received))
    if sinks:
        share = float(received[sinks].sum() / max(received.sum(), 1e-12))
        line = (f"Global sinks: {', '.join(repr(tokens[i]) for i in sinks)}; they take {share:.0%} of what the "
                "picture reads from the text.")
    else:
        line = (f"No token passes RefAM's test here (read evenly by the picture in ≥ {dit_analytics.SINK_SHARE:.0%} "
                f"of the maps); the most read, {tokens[top]!r}, takes {received[top] / received.sum():.0%} of the "
                f"picture's attention to the text and is a sink in {stats.share[top]:.0%} of the maps.")
    after = capture.cached(dit_spec(softpag()))
    if after is not None:
        change = np.abs(dit_capture.generated_image(after).astype(float) -
                        dit_capture.generated_image(found).astype(float)).mean()
        line += (f" PAG on L1H0 (s = {dit_presets.DEFAULT_PAG_SCALE:g}) moves the picture by {change:.1f} levels "
                 "per pixel.")
    return line


def atlas_specs() -> list[RunSpec]:
    return [RunSpec(model="smollm2", prompt=p) for p in (*ATLAS_PROMPTS, ACT_PROMPT)]


def atlas_key() -> str | None:
    """The newest stored pattern atlas trained on exactly the recipe's captures (atlas_specs)."""
    wanted = {spec.key(capture.revision("smollm2")) for spec in atlas_specs()}
    for key, _ in reversed(probes.stored_atlases()):
        atlas = probes.stored_atlas(key, capture.default_store())
        if atlas is not None and {s.key for s in atlas.maps.sources} == wanted:
            return key
    return None


def patterns_numbers() -> str | None:
    key = atlas_key()
    atlas = probes.stored_atlas(key, capture.default_store()) if key else None
    if atlas is None:
        return None
    counts = np.bincount(atlas.cluster[atlas.cluster >= 0], minlength=atlas.k)
    return (f"{len(atlas.maps):,} maps in {atlas.k} clusters: " +
            ", ".join(f"{label} ({n:,})" for label, n in sorted(zip(atlas.labels, counts), key=lambda x: -x[1])) + ".")


def ioi_numbers() -> str | None:
    try:
        patching = attribution.read_patching(None, store=capture.default_store(), revision=capture.revision("smollm2"),
                                             model="smollm2")
    except (ProbeMissing, capture.HeadScopeError):
        return None
    effect = np.asarray(patching.effect, dtype=np.float64)
    return (f"Patching one head's output from the clean prompt restores at most {np.nanmax(effect):.0%} of the logit "
            f"difference ' Mary' - ' John'; the top heads: {_heads(effect)}.")


# ---- the recipes ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    papers: str
    finding: str  # what the paper found
    measures: str  # what HeadScope measures here, and where the link opens
    link: Callable[[], dict[str, str]]  # the view's query parameters (reads the cache at most)
    numbers: Callable[[], str | None]
    missing: str  # what opening the link runs when the numbers are not in the cache, and how long
    figure: str = ".hs-pic img, .js-plotly-plot .main-svg, [data-testid='stImage'] img"  # what the view draws
    extra: dict = field(default_factory=dict)


def _needle_link() -> dict[str, str]:
    top = masking()
    if top is None:  # no needle probe yet: the atlas says so and offers the run
        return {"page": "atlas", "metric": "retrieval"}
    return {"page": "intervene", "key": needle_spec().key(capture.revision("smollm2")),
            "intervention": capture.remember(top)}


def _act_link() -> dict[str, str]:
    meta = _smollm2_meta()
    params = {"page": "intervene", "prompt": ACT_PROMPT, "max_new_tokens": "24"}
    if meta is not None:
        params["intervention"] = capture.remember(presets.act(meta))
    return params


RECIPES = [
    Recipe("retrieval", "Retrieval heads", "Wu et al. 2024",
           "A few percent of heads copy the needle from a long context; masking them (uniform attention) makes the "
           "model lose the needle, masking as many random heads does not.",
           "The retrieval score of every head from a needle-in-a-haystack sweep, and the same needle prompt answered "
           "with the top 30 masked (the grid coloured by the score).", _needle_link, retrieval_numbers,
           "the needle probe (15 tests, ~3 min on 2 cores), then the masked answer (~20 s)"),
    Recipe("act", "Hidden attention sinks and ACT", "Yu et al. 2024 (ACT)",
           "Besides the first token, punctuation and other low-meaning tokens take a large share of attention; "
           "scaling that share down (β = 0.4) and giving it to the other tokens changes what the model says.",
           "ACT's sink score s_j per token and head, and the continuation before | after ACT on layers 2 to L-2.",
           _act_link, act_numbers, "two captures with 24 generated tokens (~20 s)"),
    Recipe("sink_alpha", "Sinks through the layers", "Gu et al. 2024",
           "The first token becomes an attention sink in most heads after the first layers, whatever it is.",
           "α, the mean attention every query pays to the first token, for every head; the layer profile beside "
           "the grid.", lambda: {"page": "atlas", "metric": "sink_alpha"}, sink_alpha_numbers,
           "one capture (~3 s)"),
    Recipe("induction", "Induction and previous-token heads", "Olsson et al. 2022; RazorAttention",
           "Previous-token heads in early layers and induction heads after them complete repeated sequences "
           "([A][B] … [A] → [B]).",
           "Scores on random tokens repeated 3 times: attention to the previous token, and to the token after the "
           "earlier copy.", lambda: {"page": "atlas", "metric": "induction"}, induction_numbers,
           "the pattern probe (one forward pass, ~10 s)"),
    Recipe("duo", "Streaming vs retrieval heads", "Xiao et al. 2024 (DuoAttention)",
           "Most KV heads need only the first tokens and a recent window; a few (retrieval heads) need the whole "
           "context, which a trained gate per KV head finds.",
           "A mini DuoAttention: gates trained on synthetic passkeys, per KV head (α < 0.5: streaming).",
           lambda: {"page": "atlas", "metric": "duo_gate"}, duo_numbers,
           "the DuoAttention probe (24 optimisation steps, ~2 min)"),
    Recipe("registers", "High-norm artifact tokens (registers)", "Darcet et al. 2024",
           "Large ViTs (DINOv2 ViT-L and ViT-g among them) recycle a few background patch tokens as global scratch "
           "space: their norms stand out and CLS attends to them; extra register tokens absorb this.",
           "Patch-token norms per layer and the CLS attention the outliers take, on the sample photo (the "
           "“High-norm tokens” tab under the overlay).",
           lambda: {"page": "vision", "model": "dinov2-s", "image": "cat", "layer": "11", "head": "-1"},
           registers_numbers, "one forward pass of DINOv2-small (~5 s)"),
    Recipe("gaze", "Visual sinks (VAR) and gaze shifts (GIFT)", "Kang et al. 2025; Qi et al. 2025",
           "A few image tokens with massive activations soak up image attention without meaning (VAR moves it to the "
           "other image tokens); where attention moves word by word while reading the question points at the object "
           "asked about (GIFT).",
           "On shapes-vlm: visual sinks by φ, their share of the answer's image attention, and the gaze saliency.",
           lambda: {"page": "gaze", "model": "shapes-vlm", "image": VLM_IMAGE, "prompt": VLM_QUESTION},
           gaze_numbers, "one capture of shapes-vlm (~10 s)"),
    Recipe("refam", "Global sinks and SoftPAG in a DiT", "Kukleva et al. 2025 (RefAM); Ahn et al. 2025",
           "In joint attention some text tokens (end of text, padding, stop words) are read by every image patch "
           "and mean nothing; perturbing a few heads' self-attention toward the identity guides sampling (PAG).",
           "On shapes-dit: each text token's received attention and RefAM's global sinks, and the picture before | "
           "after PAG on one head (Intervene tab).",
           lambda: {"page": "dit", "model": "shapes-dit", "prompt": DIT_PROMPT,
                    "intervention": capture.remember(softpag())}, dit_numbers,
           "two samplings of 20 steps (~30 s)"),
    Recipe("patterns", "Kinds of head: the pattern atlas", "Li et al. 2023 (ViT visual analytics)",
           "An autoencoder over many heads' maps, clustered, finds a handful of pattern types (sinks, previous token, "
           "local windows ...) and where they sit by layer; which types a model has is what the atlas shows.",
           "Every SmolLM2 head's maps on two inputs, encoded, laid out with UMAP and clustered.",
           lambda: {"page": "patterns", **({"atlas": atlas_key()} if atlas_key() else {})}, patterns_numbers,
           "training the atlas on cached captures (~1-2 min)"),
    Recipe("ioi", "Name movers (IOI)", "Wang et al. 2022",
           "In “When Mary and John went to the store, John gave a drink to”, a few late heads move the indirect "
           "object's name to the output; patching their output from the clean run restores the answer.",
           "Direct logit attribution and per-head activation patching of ' Mary' - ' John' on SmolLM2.",
           lambda: {"page": "attribution"}, ioi_numbers, "the patching sweep (270 heads, ~1 min)"),
]


__all__ = ["Recipe", "RECIPES", "needle_spec", "act_spec", "dit_spec", "vlm_spec", "softpag", "masking",
           "SINK_PROMPT", "DIT_PROMPT", "VLM_QUESTION", "VLM_IMAGE"]
