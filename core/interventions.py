"""Interventions on attention heads, as plain data.

A `HeadEdit` is one primitive on one head; an `Intervention` is a tuple of them (plus the name of
the preset that produced it, if any).  Both are frozen dataclasses with a stable, short, URL-safe
`key()`, so an intervention can live in a cache key and in a share link.

The six primitives (DESIGN.md, "Attention capture and interventions"; METHODS.md §9):

| op            | where it acts                                   | `value` means                |
|---------------|-------------------------------------------------|------------------------------|
| scale         | head output z (o_proj input): z <- s*z          | s (0 ablates the head)       |
| add           | head output: z <- z + value * direction         | strength (ITI: alpha*sigma)  |
| logit         | pre-softmax scores S <- S + b on `keys`         | b (-inf masks the keys out)  |
| redistribute  | post-softmax: mass on `keys` times beta, the    | beta                         |
|               | freed mass to the other visible keys, in        |                              |
|               | proportion; rows keep summing to 1              |                              |
| mix           | post-softmax: A <- (1-u) A + u T                | u in [0, 1]                  |
| window        | keys limited to `keys` (the sinks) + the        | recent window length         |
|               | `value` most recent keys, i - j < value (+ a    |                              |
|               | mean token); encoders: |i - j| < value          |                              |

Composition order inside one forward (per head; `capture.engine.edits` implements it):

    1. logit          pre-softmax, on the scores
    2. window         pre-softmax: keys outside sinks + window get -inf (mode "mean": one extra
                      compensation token, RazorAttention)
       softmax (fp32)
    3. redistribute   post-softmax
    4. mix            post-softmax
       A @ V, then in the o_proj pre-hook:
       head_patches   (activation patching: a head's output replaced, `session(head_patches=...)`)
    5. head_gates     (the analytics gates, `session(head_gates=...)`)
    6. scale, add     on the head output z

Several edits of the same stage on the same head apply in tuple order; stages never interleave
(a `mix` listed before a `logit` still acts after it).  The order of edits on *different* heads
does not matter: heads are independent inside a layer.

Position sets (`keys`, `queries`):
- "all"                every position
- "a:b"                a Python-style index range over absolute positions ("0:4", "-8:", "5:")
- "span:<name>"        a named span of the run ("prompt", "response", "needle", ...)
- "image"              the run's image span
- "sinks", "sinks:<t>" (keys only) the head's hidden sinks, METHODS §2.1 (ACT): s_j = sum_i A_ij/(N-j)
                       over the prompt's prefill rows, sinks are s_j > t (t = 0.1 by default), and
                       the first detected sink (normally BOS) is kept apart (not included).  Detected
                       once per run on the unedited softmax of the head over the prompt rows, then
                       the same set is used by every decode step and by the recorded pass.  On short
                       prompts uniform rows alone pass 0.1 (s_0 = H_N / N > 0.1 for N < 44), so
                       ACT's threshold is meant for prompts of some length.
- "allsinks[:<t>]"     (keys only) the same detection, the first sink included (VAR-style)
- "uniform"            (keys of `mix` only) T = uniform over the visible keys
- "last"               (queries only) the rows that predict a new token: the last prompt token and
                       every generated token (ITI's "last position of every forward")

For `mix`, `keys` picks the target map T: "all" is the identity (PAG / SoftPAG), "uniform" is uniform
over every visible key (retrieval-head masking, uniform ablation), any other key set is uniform over
the visible keys of that set (a row that sees none of them is left as it is).

`direction` (only for `add`) is the vector added to the head output, stored inline as a tuple of
floats (length head_dim), so the edit is self-contained and its `key()` covers the direction.
`mode` (only for `window`) is "" (hard window) or "mean" (RazorAttention's compensation token: the
dropped keys become one token with the mean key and the mean value).  For `redistribute`, mode
"to:<key set>" (e.g. "to:image") gives the freed mass only to the visible keys of that set (less the
taken keys), in proportion, and leaves every other key as it was (VAR: sink mass to the image tokens,
METHODS §2.2); a row that sees none of them stays as it is.  Both new fields are written
to JSON only when set, so the keys of edits that do not use them are the same as before.

GQA: a `HeadEdit` names a query head.  An edit meant for a KV head (DuoAttention gates, Razor
selection) is the same edit on every query head of its group: `kv_group_edits(...)`.

This module is torch-free; the tensor code is in `capture.engine.edits` (attention-level ops) and
`capture.engine.head_outputs` (scale, add).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, fields

from core.errors import InterventionError

OPS = ("scale", "add", "logit", "redistribute", "mix", "window")
OUTPUT_OPS = ("scale", "add")  # act on the head output: keep the fast SDPA path
ATTENTION_OPS = ("logit", "window", "redistribute", "mix")  # in composition order
MODES = ("", "mean")
SINK_THRESHOLD = 0.1  # ACT's THRES (METHODS §2.1)

_NUMBER = r"(\d+\.?\d*|\.\d+)"
_POSITIONS = re.compile(
    r"^(all|image|uniform|last|span:[A-Za-z_][A-Za-z0-9_]*|-?\d*:-?\d*|(all)?sinks(:" + _NUMBER + r")?)$"
)
_SINKS = re.compile(r"^(all)?sinks(?::" + _NUMBER + r")?$")


def sink_set(spec: str) -> tuple[float, bool] | None:
    """("sinks:0.2" -> (0.2, False)), ("allsinks" -> (0.1, True)); None if `spec` is not a sink set.

    The bool says whether the first detected sink is included.
    """
    m = _SINKS.fullmatch(spec)
    if not m:
        return None
    return (float(m.group(2)) if m.group(2) else SINK_THRESHOLD), bool(m.group(1))


@dataclass(frozen=True)
class HeadEdit:
    """One primitive on one query head.  See the module docstring for ops, position sets and order."""

    layer: int
    head: int
    op: str
    value: float = 0.0
    keys: str = "all"
    queries: str = "all"
    direction: tuple[float, ...] | None = None  # `add` only: the vector added, length head_dim
    mode: str = ""  # `window`: "" or "mean" (compensation token); `redistribute`: "" or "to:<key set>"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise InterventionError(f"Unknown intervention op {self.op!r}; use one of {', '.join(OPS)}.")
        # normalise types, so equal edits have equal keys (0 vs 0.0, numpy ints, lists)
        try:
            object.__setattr__(self, "layer", int(self.layer))
            object.__setattr__(self, "head", int(self.head))
            object.__setattr__(self, "value", float(self.value))
            if self.direction is not None:
                object.__setattr__(self, "direction", tuple(float(x) for x in self.direction))
        except (TypeError, ValueError) as exc:
            raise InterventionError(f"Malformed edit: {exc}.") from exc
        if self.layer < 0 or self.head < 0:
            raise InterventionError("Layer and head indices must be non-negative.")
        for name in ("keys", "queries"):
            if not isinstance(getattr(self, name), str) or not _POSITIONS.fullmatch(getattr(self, name)):
                raise InterventionError(
                    f"Bad position set {getattr(self, name)!r} for {name}: use all, sinks, image, "
                    "span:<name> or a range like 0:4."
                )
        self._check_op()

    def _check_op(self) -> None:
        op, value, keys = self.op, self.value, self.keys
        where = f"{op} on layer {self.layer}, head {self.head}"
        if sink_set(self.queries) or self.queries == "uniform":
            raise InterventionError(f"{where}: queries take all, last, image, span:<name> or a range, "
                                    f"not {self.queries!r}.")
        if keys == "last":
            raise InterventionError(f"{where}: 'last' is a query set, not a key set.")
        if keys == "uniform" and op != "mix":
            raise InterventionError(f"{where}: keys='uniform' only makes sense for mix.")
        if self.direction is not None and op != "add":
            raise InterventionError(f"{where}: only add takes a direction.")
        if op == "redistribute" and self.mode.startswith("to:"):
            target = self.mode[3:]
            if target in ("all", "uniform", "last") or not _POSITIONS.fullmatch(target):
                raise InterventionError(f"{where}: the target of redistribute must be a key set (to:image, "
                                        "to:span:<name>, to:a:b), not {target!r}.")
        elif self.mode not in MODES or (self.mode and op != "window"):
            raise InterventionError(f"{where}: mode {self.mode!r} is not known (window takes '' or 'mean'; "
                                    "redistribute takes '' or 'to:<key set>').")
        if math.isnan(value) or (math.isinf(value) and op != "logit"):
            raise InterventionError(f"{where}: the value must be a finite number.")
        if op == "add":
            if not self.direction:
                raise InterventionError(f"{where}: add needs a direction (one float per head dimension).")
            if keys != "all":
                raise InterventionError(f"{where}: add acts on the head output; it has no key set.")
        elif op == "scale" and keys != "all":
            raise InterventionError(f"{where}: scale acts on the head output; it has no key set.")
        elif op == "logit" and value == math.inf:
            raise InterventionError(f"{where}: a +inf logit is not allowed (use a large finite bias).")
        elif op == "redistribute":
            if keys == "all":
                raise InterventionError(f"{where}: redistribute needs a key set to move mass from (e.g. sinks).")
            if value < 0:
                raise InterventionError(f"{where}: beta must be >= 0.")
        elif op == "mix" and not 0.0 <= value <= 1.0:
            raise InterventionError(f"{where}: mix strength u must be in [0, 1].")
        elif op == "window":
            if keys == "all":
                raise InterventionError(f"{where}: window keeps the sink set in `keys` plus a recent window; "
                                        "name the sinks (e.g. 0:4 or sinks), or 0:0 for none.")
            if value < 1 or value != int(value):
                raise InterventionError(f"{where}: the window length must be a whole number >= 1.")

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"

    def to_json(self) -> dict:
        """A JSON-able dict; `direction` and `mode` appear only when set (keeps old keys stable)."""
        out = {"layer": self.layer, "head": self.head, "op": self.op, "value": self.value,
               "keys": self.keys, "queries": self.queries}
        if self.direction is not None:
            out["direction"] = list(self.direction)
        if self.mode:
            out["mode"] = self.mode
        return out


_EDIT_FIELDS = {f.name for f in fields(HeadEdit)}


@dataclass(frozen=True)
class Intervention:
    """A set of head edits (composition order: module docstring) and the preset that made it."""

    edits: tuple[HeadEdit, ...] = ()
    preset: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))

    @property
    def empty(self) -> bool:
        return not self.edits

    def key(self) -> str:
        """Stable, short, URL-safe: "none" for the empty intervention, else 16 hex digits."""
        if self.empty:
            return "none"
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"preset": self.preset, "edits": [e.to_json() for e in self.edits]}

    @classmethod
    def from_json(cls, data: dict) -> "Intervention":
        try:
            edits = []
            for e in data.get("edits", ()):
                unknown = set(e) - _EDIT_FIELDS
                if unknown:
                    raise TypeError(f"unknown field(s) {', '.join(sorted(unknown))}")
                edits.append(HeadEdit(**e))
        except (TypeError, AttributeError) as exc:
            raise InterventionError(f"Malformed intervention: {exc}.") from exc
        return cls(edits=tuple(edits), preset=data.get("preset"))

    def for_layer(self, layer: int) -> tuple[HeadEdit, ...]:
        return tuple(e for e in self.edits if e.layer == layer)

    def heads(self) -> list[tuple[int, int]]:
        """The (layer, head) pairs this intervention touches, sorted."""
        return sorted({(e.layer, e.head) for e in self.edits})

    def __add__(self, other: "Intervention") -> "Intervention":
        """Both sets of edits (self's first); the preset name is kept only if both agree."""
        preset = self.preset if self.preset == other.preset else None
        return Intervention(edits=self.edits + other.edits, preset=preset)

    def validate(self, n_layers: int, n_heads: int, head_dim: int | None = None) -> None:
        for e in self.edits:
            if e.layer >= n_layers or e.head >= n_heads:
                raise InterventionError(
                    f"Edit on layer {e.layer}, head {e.head} is outside this model "
                    f"({n_layers} layers x {n_heads} heads)."
                )
            if head_dim is not None and e.direction is not None and len(e.direction) != head_dim:
                raise InterventionError(
                    f"The add direction on layer {e.layer}, head {e.head} has {len(e.direction)} numbers; "
                    f"this model's heads have {head_dim} dimensions."
                )


def ablate_heads(heads: list[tuple[int, int]] | tuple[tuple[int, int], ...], factor: float = 0.0) -> Intervention:
    """Scale the output of each (layer, head) by `factor`; 0 is zero-ablation (PH3-style pruning)."""
    return Intervention(edits=tuple(HeadEdit(layer=l, head=h, op="scale", value=factor) for l, h in heads))


def uniform_ablation(heads: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> Intervention:
    """Uniform attention on each (layer, head): mix toward uniform with u = 1 (METHODS §1.1, §10.1)."""
    return Intervention(edits=tuple(HeadEdit(layer=l, head=h, op="mix", value=1.0, keys="uniform")
                                    for l, h in heads))


def kv_group_edits(layer: int, kv_head: int, group_size: int, op: str, value: float = 0.0,
                   keys: str = "all", queries: str = "all", direction: tuple[float, ...] | None = None,
                   mode: str = "") -> tuple[HeadEdit, ...]:
    """The same edit on every query head that reads KV head `kv_head` (GQA: heads
    kv_head*group_size ... (kv_head+1)*group_size - 1).  `group_size` is ModelMeta.group_size."""
    if group_size < 1 or kv_head < 0:
        raise InterventionError("kv_group_edits needs a KV head >= 0 and a group size >= 1.")
    return tuple(HeadEdit(layer=layer, head=kv_head * group_size + g, op=op, value=value, keys=keys,
                          queries=queries, direction=direction, mode=mode) for g in range(group_size))


def parse_positions(spec: str, n: int, spans: dict[str, range] | None = None) -> range | None:
    """Resolve a position set to a range over `n` positions; None means "every position".

    `sinks`, `uniform` and `last` are resolved by the code that knows what they mean; here they
    raise, so a caller can never mistake them for "all".  "image" is the span named "image".
    """
    if spec == "all":
        return None
    if spec == "image":
        spec = "span:image"
    if spec.startswith("span:"):
        name = spec[5:]
        if not spans or name not in spans:
            raise InterventionError(f"This input has no span named {name!r}.")
        return spans[name]
    if ":" in spec and not sink_set(spec):
        start, stop = spec.split(":")
        return range(*slice(int(start) if start else None, int(stop) if stop else None).indices(n))
    raise InterventionError(f"Position set {spec!r} needs the capture context to resolve.")


__all__ = ["OPS", "OUTPUT_OPS", "ATTENTION_OPS", "HeadEdit", "Intervention", "InterventionError", "ablate_heads",
           "uniform_ablation", "kv_group_edits", "parse_positions", "sink_set", "SINK_THRESHOLD"]
