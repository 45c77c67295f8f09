"""Probe results in the cache: their parameters, their keys, and reading them back.

A probe (`probes.runner`) is a multi-pass measurement that needs the model.  Its result is stored
in the same `cache.store.Store` as captures, under

    key = stable_hash({"revision": model revision, "probe": name, "params": params, "version": PROBE_VERSION})

as arrays (`store.put_array(key, name, array)`) plus a JSON record written last (`store.put_meta`),
with `"kind": "probe"` so capture listings skip it.  This module is torch-free, so `analytics`
can read results and the metrics registry can say "run this probe first" when one is absent.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from core.errors import ProbeMissing
from core.keys import stable_hash

PROBE_VERSION = 1
KIND = "probe"


# ---- parameters of each probe (defaults are the keys' defaults) --------------------------------

@dataclass(frozen=True)
class PatternParams:
    """Repeated random tokens (RazorAttention §1.4, shortened): BOS + `period` ids from [low, high),
    repeated `repeats` times."""

    period: int = 64
    repeats: int = 3
    seed: int = 0
    low: int = 10000
    high: int = 12500


@dataclass(frozen=True)
class NeedleParams:
    """Needle-in-a-haystack sweep (Wu et al. §1.1, shortened).  Lengths are prompt tokens; depths in %
    of the context; needles index assets/needles.json (empty = all, cycled over the cells)."""

    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    needles: tuple[int, ...] = ()
    max_new_tokens: int = 24
    chat: bool = True


@dataclass(frozen=True)
class AblationParams:
    """Single-head ablation of every head.  The score is the drop in the summed log-prob of the scored
    tokens: `target` appended to the prompt when given, else the last `score_last` prompt tokens.
    An empty prompt means the first `n_tokens` tokens of assets/haystack.txt."""

    mode: str = "zero"  # zero | mean | uniform
    prompt: str = ""
    target: str = ""
    n_tokens: int = 128
    score_last: int = 32
    layers: tuple[int, ...] = ()  # sweep only these layers' heads (empty = every layer); others stay NaN


@dataclass(frozen=True)
class GradientParams:
    """Michel et al. |dL/d gate| over `n_texts` chunks of `n_tokens` tokens of assets/haystack.txt."""

    n_texts: int = 4
    n_tokens: int = 128


@dataclass(frozen=True)
class DuoParams:
    """Mini DuoAttention gate optimisation on synthetic passkey data (see probes.duo.duo_probe)."""

    steps: int = 24
    context: int = 256
    sink: int = 16
    recent: int = 64
    lr: float = 0.05
    reg: float = 0.05
    passkeys: int = 2
    words: int = 8
    seed: int = 0


@dataclass(frozen=True)
class HiddenParams:
    """The residual stream entering every layer, for one capture (VAR massive activations)."""

    capture: str = ""


IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"  # Wang et al. 2022's template
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"  # the subject flipped


@dataclass(frozen=True)
class PatchingParams:
    """Activation patching of each head's output between a clean and a corrupted prompt of the same token
    length (Wang et al. 2022, IOI).  The metric, at the last position, is the logit difference target -
    foil (`logit_diff`) or the probability of target (`prob`); "denoise" patches clean outputs into the
    corrupted run, "noise" corrupted outputs into the clean run.  With `sender` (layer, head): path
    patching, the sender's patched output reaching only the `receivers` input (q, k or v) of later heads."""

    clean: str = IOI_CLEAN
    corrupted: str = IOI_CORRUPTED
    target: str = " Mary"
    foil: str = " John"
    metric: str = "logit_diff"  # logit_diff | prob
    direction: str = "denoise"  # denoise | noise
    layers: tuple[int, ...] = ()  # patch only these layers' heads (empty = every layer); others stay NaN
    sender: tuple[int, ...] = ()  # (layer, head): path patching from this head; empty = per-head patching
    receivers: str = "q"  # path patching: the receivers' input the sender reaches, q | k | v


@dataclass(frozen=True)
class VlmPatchingParams:
    """Activation patching of each language-model head of a VLM between two pictures (probes.vlm_patching):
    one `question` about a clean and a corrupted picture ("scene-<seed>", a sample or "sha256:<hex>" of an
    upload) that give the same prompt tokens.  The metric, at the answer position (the last prompt token),
    is the logit difference target - foil (`logit_diff`) or the probability of target (`prob`); "denoise"
    patches the clean picture's head outputs into the corrupted picture's run, "noise" the reverse, at the
    `positions` "all" (every token), "image" (the image tokens only: the picture's rows) or "text" (the others).
    Defaults: shapes-vlm's circle is red in scene-3 and yellow in scene-4."""

    clean_image: str = "scene-3"
    corrupted_image: str = "scene-4"
    question: str = "what colour is the circle?"
    target: str = "red"
    foil: str = "yellow"
    metric: str = "logit_diff"  # logit_diff | prob
    direction: str = "denoise"  # denoise | noise
    layers: tuple[int, ...] = ()  # patch only these layers' heads (empty = every layer); others stay NaN
    positions: str = "all"  # all | image | text: the rows whose head outputs are patched


@dataclass(frozen=True)
class VitPatchingParams:
    """Activation patching of each head of a ViT image classifier between two pictures of the same size
    (probes.vit_patching).  The metric is the logit difference of two classes target - foil (`logit_diff`,
    labels or class numbers; "" = the clean picture's top class and the corrupted picture's) or the
    probability of target (`prob`); "denoise" patches the clean picture's head outputs into the corrupted
    picture's run, "noise" the reverse."""

    clean_image: str = "cat"
    corrupted_image: str = "coffee"
    target: str = ""
    foil: str = ""
    metric: str = "logit_diff"  # logit_diff | prob
    direction: str = "denoise"  # denoise | noise
    layers: tuple[int, ...] = ()  # patch only these layers' heads (empty = every layer); others stay NaN


@dataclass(frozen=True)
class DitPatchingParams:
    """Activation patching of each head of shapes-dit between two prompts with as many text tokens, sampled
    from the same `seed` for `steps` steps (probes.dit_patching): each head's output at every step taken
    from the source prompt's run ("denoise": clean into corrupted; "noise": corrupted into clean).  The
    metric (`mse`) is the mean squared difference of the final picture to the clean prompt's, in [-1, 1].
    `patch_pooled` also takes the pooled prompt embedding (the blocks' adaLN input) from the source prompt.
    `guidance`: the classifier-free guidance scale both prompts are sampled at (None: shapes-dit's default, 3; a
    capture's scale, RunSpec.guidance, so patching runs where the capture ran)."""

    clean: str = "a red circle at the center"
    corrupted: str = "a blue circle at the center"
    seed: int = 0
    steps: int = 20
    metric: str = "mse"
    direction: str = "denoise"  # denoise | noise
    patch_pooled: bool = False
    layers: tuple[int, ...] = ()  # patch only these layers' heads (empty = every layer); others stay NaN
    guidance: float | None = None  # None: the model's default (left out of the key: earlier results keep theirs)


@dataclass(frozen=True)
class DLAParams:
    """Direct logit attribution in one capture: every head, MLP and the embedding at every position,
    through the final norm (its scale frozen from the run) and the unembedding onto `target` (minus
    `foil` when given); target "" = each position's next token (the model's top prediction at the last;
    an image classifier's top class)."""

    capture: str = ""
    target: str = ""
    foil: str = ""


PARAMS: dict[str, type] = {
    "patterns": PatternParams,
    "needle": NeedleParams,
    "ablation": AblationParams,
    "gradient": GradientParams,
    "duo": DuoParams,
    "hidden": HiddenParams,
    "patching": PatchingParams,
    "dla": DLAParams,
    "vlm_patching": VlmPatchingParams,
    "dit_patching": DitPatchingParams,
    "vit_patching": VitPatchingParams,
}
CAPTURE_PROBES = ("hidden", "dla")  # probes of one capture, named by its key


def params_of(probe: str, params: Any = None, **overrides) -> Any:
    """The probe's params dataclass, from an instance, a dict or keyword overrides of the defaults."""
    if probe not in PARAMS:
        raise ValueError(f"unknown probe {probe!r}; probes are {', '.join(PARAMS)}")
    cls = PARAMS[probe]
    if isinstance(params, cls):
        base = asdict(params)
    else:
        base = dict(params or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(base) - names)
    if unknown:
        raise ValueError(f"the {probe} probe has no parameter {', '.join(unknown)}")
    for f in fields(cls):  # lists from JSON / argparse become tuples, so keys are stable
        if f.name in base and isinstance(base[f.name], list):
            base[f.name] = tuple(base[f.name])
    return cls(**base)


def probe_key(revision: str, probe: str, params: Any) -> str:
    """The cache key of a probe result."""
    record = {k: v for k, v in asdict(params_of(probe, params)).items() if v is not None}  # None: a default
    return stable_hash({"revision": revision, "probe": probe, "params": record, "version": PROBE_VERSION})


def cli_hint(probe: str, model: str, params: Any) -> str:
    """The command that computes this probe result."""
    p = params_of(probe, params)
    default = PARAMS[probe]()
    args = ["python", "-m", "headscope", "probe", probe]
    args += [p.capture or "KEY"] if probe in CAPTURE_PROBES else ["--model", model]
    for f in fields(p):
        value = getattr(p, f.name)
        if value == getattr(default, f.name) or f.name == "capture":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            args += [flag] + [str(v) for v in value]
        else:
            args += [flag, str(value)]
    return " ".join(shlex.quote(a) for a in args)


# ---- reading results ---------------------------------------------------------------------------

@dataclass
class ProbeResult:
    """A stored probe result: its JSON record and lazily read arrays."""

    key: str
    record: dict
    store: Any

    @property
    def summary(self) -> dict:
        return self.record.get("summary", {})

    def array(self, name: str) -> np.ndarray:
        if name not in self.record.get("arrays", []):
            raise KeyError(f"probe result {self.key} has no array {name!r}")
        return self.store.get_array(self.key, name)


def find(store, revision: str, probe: str, params: Any = None) -> ProbeResult | None:
    """The stored result of (model revision, probe, params), or None."""
    if store is None:
        return None
    key = probe_key(revision, probe, params)
    try:
        record = store.get_meta(key)
    except Exception:  # noqa: BLE001 - a corrupt record is an absent one; the probe rewrites it
        return None
    if not record or record.get("kind") != KIND:
        return None
    return ProbeResult(key=key, record=record, store=store)


def require(store, revision: str, model: str, probe: str, params: Any = None) -> ProbeResult:
    """`find`, or ProbeMissing with the command that makes the result."""
    found = find(store, revision, probe, params)
    if found is None:
        raise ProbeMissing(f"No {probe} probe result for {model} in the cache; run this probe first: "
                           f"{cli_hint(probe, model, params)}")
    return found


__all__ = ["AblationParams", "CAPTURE_PROBES", "DLAParams", "DitPatchingParams", "DuoParams", "GradientParams", "HiddenParams", "KIND",
           "IOI_CLEAN", "IOI_CORRUPTED", "NeedleParams", "PARAMS", "PatchingParams", "PROBE_VERSION", "PatternParams",
           "ProbeMissing", "VitPatchingParams", "VlmPatchingParams", "ProbeResult", "cli_hint", "find", "params_of", "probe_key", "require"]
