"""ViewState: what a person is looking at, as a dataclass that round-trips through a URL.

Query parameter names are the field names (`?page=explorer&model=smollm2&layer=3&head=2`).
`ViewState.from_params` never raises: unknown or invalid values fall back to the defaults and come
back as warnings to show.  A link can only name models on the allow-list (the embedded models plus
what the operator lists in HEADSCOPE_ALLOWED_MODELS, comma-separated), never a local path, and never
enables remote code (HeadScope has no such switch at all).

This module is pure (no streamlit): app.py moves the dict in and out of `st.query_params`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping

from core.dit_capture import kept_steps
from core.keys import is_key
from core.probe_results import IOI_CLEAN, IOI_CORRUPTED
from core.types import MAX_GUIDANCE, MAX_KEPT, MAX_STEPS

PAGES = ("home", "explorer", "atlas", "intervene", "vision", "dit", "gaze", "patterns", "attribution")
SCALES = ("raw", "log", "row")  # attention colour: raw weights, log10, normalised per row
VIEWS = ("model", "head", "token")
MAX_LINK_PROMPT = 600  # longer prompts travel by capture key
MAX_NEW_TOKENS = 256
ATLAS_COLOURS = ("cluster", "layer", "model", "input", "first", "self", "near", "local", "entropy", "distance",
                 "spread")
MAX_SIDE = 4096  # diffusion: the largest picture side a link may ask for (each model refuses sides it cannot sample)
MEASURES = ("logit_diff", "prob")  # attribution: the patching metric at the last position
DIRECTIONS = ("denoise", "noise")  # attribution: clean into corrupted, or corrupted into clean
RECEIVERS = ("q", "k", "v")  # attribution: the path-patching receivers' input
POSITIONS = ("all", "image", "text")  # attribution on a VLM: the rows whose head outputs are patched
MAX_LINK_TOKEN = 40  # characters of an attribution target / foil token
MEAN_PAGES = ("gaze", "dit")  # pages whose layer / head -1 means "the mean": their links always name both
MAX_LINK_POINTS = 1500  # characters of a pattern-atlas selection ("3.7-12.40" or "z...") a link carries
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"
# whole-number fields and their ranges; -1 means "the mean" for layer / head (where a page offers it),
# "the last token" for token, "the middle step" for step and "none" for cluster
NUMBER_RANGES = {"layer": (-1, 100_000), "head": (-1, 100_000), "token": (-1, 100_000), "q0": (0, 100_000),
                 "k0": (0, 100_000), "max_new_tokens": (0, MAX_NEW_TOKENS), "seed": (0, 2**31 - 1),
                 "steps": (1, MAX_STEPS), "step": (-1, MAX_STEPS - 1), "cluster": (-1, 64),
                 "width": (0, MAX_SIDE), "height": (0, MAX_SIDE)}


def allowed_models() -> tuple[str, ...]:
    """Models a link may name: the embedded ones plus the operator's list."""
    from capture import EMBEDDED  # torch-free

    from_env = [m.strip() for m in os.environ.get("HEADSCOPE_ALLOWED_MODELS", "").split(",") if m.strip()]
    return tuple(EMBEDDED) + tuple(m for m in from_env if m not in EMBEDDED)


def default_model() -> str:
    model = os.environ.get("HEADSCOPE_DEFAULT_MODEL", "smollm2")
    return model if model in allowed_models() else "smollm2"


@dataclass
class ViewState:
    page: str = "home"
    model: str = "smollm2"
    prompt: str = DEFAULT_PROMPT
    key: str = ""  # capture key: the input when the prompt is too long for a link
    chat: bool = False
    max_new_tokens: int = 0
    view: str = "model"
    layer: int = 0
    head: int = 0
    token: int = -1  # query token of the token view; -1 = the last token
    q0: int = 0  # detail window of a long map: first query and first key shown
    k0: int = 0
    patch: str = ""  # vision, diffusion: the query patch "row,col"; "" = the CLS token (diffusion: the centre one)
    scale: str = "raw"
    metric: str = "sink_alpha"
    intervention: str = "none"
    image: str = ""
    atlas: str = ""  # pattern atlas key (analytics.patterns)
    colour: str = "cluster"  # what colours the atlas scatter: ATLAS_COLOURS
    points: str = ""  # selected atlas maps, "3.7-12.40" (or a packed set "z..."): analytics.patterns.selection_text
    cluster: int = -1  # selected atlas cluster; -1 = none
    names: str = ""  # the user's cluster labels, "0=induction|3=my label"
    seed: int = 0  # diffusion: the sampling seed
    steps: int = 20  # diffusion: sampling steps
    step: int = -1  # diffusion: the sampling step shown; -1 = the middle one
    all_steps: bool = False  # diffusion: average the maps over every step (DAAM) instead of one step
    width: int = 0  # diffusion: picture size in pixels; 0 = the model's default
    height: int = 0
    keep: str = ""  # diffusion: the steps whose full maps a capture of real size keeps, "5,20"; "" = the middle one
    guidance: str = ""  # diffusion: the classifier-free guidance scale, "4.5"; "" = the model's default
    clean: str = IOI_CLEAN  # attribution: the clean and corrupted prompts (same token length)
    corrupted: str = IOI_CORRUPTED
    target: str = " Mary"  # attribution: the answer token, and the foil of a logit difference
    foil: str = " John"
    measure: str = "logit_diff"  # attribution: MEASURES
    direction: str = "denoise"  # attribution: DIRECTIONS
    receivers: str = "q"  # attribution: path patching from the selected head into later heads' RECEIVERS
    corrupted_image: str = ""  # attribution on a VLM / ViT: the corrupted picture (image is the clean one); "" = default
    positions: str = "all"  # attribution on a VLM: POSITIONS

    def kept_steps(self) -> tuple[int, ...]:
        """`keep` ("5,20") as RunSpec.keep: the steps, sorted, each once."""
        return kept_steps(self.keep)

    def guidance_scale(self) -> float | None:
        """`guidance` as RunSpec.guidance (None: the model's default)."""
        return float(self.guidance) if self.guidance else None

    def to_params(self) -> dict[str, str]:
        """The query parameters of this view: only fields that differ from the defaults."""
        base = ViewState(model=default_model())
        out = {}
        for name, value in asdict(self).items():
            if name == "prompt" and self.key and len(self.prompt) > MAX_LINK_PROMPT:
                continue  # long prompts travel by key
            if value != getattr(base, name) or (name in ("layer", "head") and self.page in MEAN_PAGES):
                out[name] = str(int(value)) if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, str | list[str]]) -> tuple["ViewState", list[str]]:
        """Parse query parameters; returns the state and one warning per value that was ignored."""
        state = cls(model=default_model())
        warnings: list[str] = []
        known = {f.name: f for f in fields(cls)}
        for name, raw in params.items():
            if isinstance(raw, list) and not raw:
                continue  # "?x" with no value: nothing to use
            value = raw[-1] if isinstance(raw, list) else raw
            if name not in known:
                warnings.append(f"Ignored unknown link parameter {name!r}.")
                continue
            try:
                state = replace(state, **{name: _parse(name, str(value))})
            except ValueError as exc:
                warnings.append(f"Ignored link parameter {name}: {exc}")
        if state.page in MEAN_PAGES:  # a link to these pages that names no layer / head opens on the mean
            state = replace(state, **{f: -1 for f in ("layer", "head") if f not in params})
        return state, warnings

    def clamp(self, n_layers: int, n_heads: int, n_tokens: int, mean_head: bool = False) -> list[str]:
        """Bring layer/head/token into range for the loaded capture; returns warnings.

        `mean_head`: the page offers "mean of heads" as head -1."""
        warnings = []
        if self.layer == -1:  # "mean of layers" (the DiT page's) is not offered here
            self.layer = 0
        elif not 0 <= self.layer < n_layers:
            warnings.append(f"Layer {self.layer} does not exist (0–{n_layers - 1}); showing layer 0.")
            self.layer = 0
        if self.head == -1 and not mean_head:
            self.head = 0
        elif not (-1 if mean_head else 0) <= self.head < n_heads:
            warnings.append(f"Head {self.head} does not exist (0–{n_heads - 1}); showing head 0.")
            self.head = 0
        if not -1 <= self.token < n_tokens:
            warnings.append(f"Token {self.token} does not exist (0–{n_tokens - 1}); showing the last token.")
            self.token = -1
        return warnings


def guidance_text(value: str) -> str:
    """A classifier-free guidance scale as a link carries it ("4.5"; "" = the model's default); ValueError with a
    short reason when it is none."""
    if not value:
        return ""
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"{value[:20]!r} is not a number.") from None
    if not 0 <= scale <= MAX_GUIDANCE:  # NaN is not either
        raise ValueError(f"a guidance scale is from 0 to {MAX_GUIDANCE:g}.")
    return f"{scale:g}"


def _parse(name: str, value: str):
    """One query parameter value -> the field's value; ValueError with a short reason if invalid."""
    if len(value) > 4 * MAX_LINK_PROMPT:
        raise ValueError("value too long.")
    if name == "page":
        return _choice(value, PAGES)
    if name == "view":
        return _choice(value, VIEWS)
    if name == "scale":
        return _choice(value, SCALES)
    if name == "model":
        if value not in allowed_models():
            raise ValueError(f"model {value[:40]!r} is not available here (allowed: {', '.join(allowed_models())}).")
        return value
    if name in NUMBER_RANGES:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{value[:20]!r} is not a whole number.") from None
        low, high = NUMBER_RANGES[name]
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range.")
        return number
    if name in ("chat", "all_steps"):
        if value not in ("0", "1", "true", "false", "True", "False"):
            raise ValueError("use 0 or 1.")
        return value in ("1", "true", "True")
    if name == "key":
        if value and not is_key(value):
            raise ValueError("not a capture key.")
        return value
    if name == "intervention":
        if value != "none" and not (len(value) == 16 and all(c in "0123456789abcdef" for c in value)):
            raise ValueError("not an intervention key.")
        return value
    if name in ("image", "corrupted_image"):
        if value and not (value.replace("-", "").replace("_", "").isalnum() or
                          (value.startswith("sha256:") and is_hex(value[7:], 64))):
            raise ValueError("images are named samples or sha256:<hash> of an upload, never paths.")
        return value
    if name in ("prompt", "clean", "corrupted"):
        if len(value) > MAX_LINK_PROMPT:
            raise ValueError("prompt too long for a link.")
        return "".join(ch for ch in value if ch in "\n\t" or ch.isprintable())
    if name in ("target", "foil"):
        if len(value) > MAX_LINK_TOKEN or not all(ch.isprintable() for ch in value):
            raise ValueError("not a token.")
        return value
    if name == "measure":
        return _choice(value, MEASURES)
    if name == "direction":
        return _choice(value, DIRECTIONS)
    if name == "receivers":
        return _choice(value, RECEIVERS)
    if name == "positions":
        return _choice(value, POSITIONS)
    if name == "patch":
        parts = value.split(",")
        if value and not (len(parts) == 2 and all(p.isdigit() and len(p) <= 4 for p in parts)):
            raise ValueError("a patch is row,col.")
        return value
    if name == "guidance":
        return guidance_text(value)
    if name == "keep":
        parts = value.split(",")
        if value and not (len(parts) <= MAX_KEPT and all(p.isdigit() and int(p) < MAX_STEPS for p in parts)):
            raise ValueError(f"kept steps are at most {MAX_KEPT} step numbers, 5,20.")
        return value
    if name == "atlas":
        if value and not is_key(value):
            raise ValueError("not an atlas key.")
        return value
    if name == "colour":
        return _choice(value, ATLAS_COLOURS)
    if name == "points":  # analytics.patterns.selection_text: "3.7-12.40" or "z" + base64url(zlib(bitset))
        bad = ValueError("a selection is map numbers and ranges (3.7-12) or a packed set (z...).")
        if len(value) > MAX_LINK_POINTS:
            raise bad
        if value.startswith("z"):
            if not all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
                raise bad
            return value
        if not all(c in "0123456789.-" for c in value):
            raise bad
        for part in filter(None, value.split(".")):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and (not hi.isdigit() or int(hi) < int(lo))):
                raise bad
        return value
    if name == "names":
        return names_text(parse_names(value))
    if name == "metric":
        if not value.replace("_", "").isalnum() or len(value) > 40:
            raise ValueError("not a metric name.")
        return value
    raise ValueError("unsupported.")


def parse_names(value: str) -> dict[int, str]:
    """"0=induction|3=my label" -> {0: "induction", 3: "my label"}; ValueError if malformed."""
    out: dict[int, str] = {}
    for part in filter(None, value.split("|")):
        number, sep, label = part.partition("=")
        if not sep or not number.isdigit() or int(number) > 64:
            raise ValueError("cluster labels are 0=label|1=label.")
        label = "".join(ch for ch in label if ch.isprintable())[:60].strip()
        if label:
            out[int(number)] = label
    return out


def names_text(names: dict[int, str]) -> str:
    """{0: "induction"} -> "0=induction" (the link value of the user's cluster labels)."""
    return "|".join(f"{c}={label.replace('|', '/')}" for c, label in sorted(names.items()) if label)


def _choice(value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{value[:40]!r} is not one of {', '.join(options)}.")
    return value


def is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)
