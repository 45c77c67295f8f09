"""Interventions on attention heads, as plain data.

A `HeadEdit` is one primitive on one head; an `Intervention` is an ordered tuple of them (plus the
name of the preset that produced it, if any).  Both are frozen dataclasses with a stable, short,
URL-safe `key()`, so an intervention can live in a cache key and in a share link.

How each primitive acts (DESIGN.md, "Attention capture and interventions"; METHODS.md §9):

| op            | where it acts                          | `value` means          |
|---------------|----------------------------------------|------------------------|
| scale         | head output z (o_proj input): z <- s*z | s (0 ablates the head) |
| add           | z <- z + value * direction             | strength alpha         |
| logit         | pre-softmax scores on `keys`           | bias b (-inf masks)    |
| redistribute  | post-softmax mass on `keys`            | beta                   |
| mix           | A <- (1-u) A + u T                     | u                      |
| window        | keys limited to sinks + recent window  | window length          |

This module is torch-free: it holds the data and the position-set parser.  The tensor code that
applies an edit lives in `capture.attention` (attention-level ops) and `capture.adapters` (the
output pre-hook for `scale`).  The foundation applies `scale`; the other ops are accepted as data
and validated, and `capture.attention` refuses to run an op it does not implement yet rather than
silently ignoring it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

OPS = ("scale", "add", "logit", "redistribute", "mix", "window")
OUTPUT_OPS = ("scale", "add")  # act on the head output: keep the fast SDPA path
_POSITIONS = re.compile(r"^(all|sinks|image|uniform|span:[A-Za-z_][A-Za-z0-9_]*|-?\d*:-?\d*)$")


class InterventionError(ValueError):
    """An edit that cannot be applied; the message is one sentence meant for the user."""


@dataclass(frozen=True)
class HeadEdit:
    """One primitive on one head (a query head; `kv:` ops are expressed by listing the group)."""

    layer: int
    head: int
    op: str
    value: float = 0.0
    keys: str = "all"
    queries: str = "all"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise InterventionError(f"Unknown intervention op {self.op!r}; use one of {', '.join(OPS)}.")
        if self.layer < 0 or self.head < 0:
            raise InterventionError("Layer and head indices must be non-negative.")
        for name in ("keys", "queries"):
            if not _POSITIONS.match(getattr(self, name)):
                raise InterventionError(
                    f"Bad position set {getattr(self, name)!r} for {name}: use all, sinks, image, "
                    "span:<name> or a range like 0:4."
                )


@dataclass(frozen=True)
class Intervention:
    """An ordered set of head edits.  Edits compose in tuple order (DESIGN.md)."""

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
        return {"preset": self.preset, "edits": [asdict(e) for e in self.edits]}

    @classmethod
    def from_json(cls, data: dict) -> "Intervention":
        try:
            edits = tuple(HeadEdit(**e) for e in data.get("edits", ()))
        except TypeError as exc:
            raise InterventionError(f"Malformed intervention: {exc}.") from exc
        return cls(edits=edits, preset=data.get("preset"))

    def for_layer(self, layer: int) -> tuple[HeadEdit, ...]:
        return tuple(e for e in self.edits if e.layer == layer)

    def validate(self, n_layers: int, n_heads: int) -> None:
        for e in self.edits:
            if e.layer >= n_layers or e.head >= n_heads:
                raise InterventionError(
                    f"Edit on layer {e.layer}, head {e.head} is outside this model "
                    f"({n_layers} layers x {n_heads} heads)."
                )


def ablate_heads(heads: list[tuple[int, int]] | tuple[tuple[int, int], ...], factor: float = 0.0) -> Intervention:
    """Scale the output of each (layer, head) by `factor`; 0 is zero-ablation (PH3-style pruning)."""
    return Intervention(edits=tuple(HeadEdit(layer=l, head=h, op="scale", value=factor) for l, h in heads))


def parse_positions(spec: str, n: int, spans: dict[str, range] | None = None) -> range | None:
    """Resolve a position set to a range over `n` positions; None means "every position".

    `sinks`, `image` and `uniform` are resolved by the code that knows what they mean; here they
    raise, so a caller can never mistake them for "all".
    """
    if spec == "all":
        return None
    if spec.startswith("span:"):
        name = spec[5:]
        if not spans or name not in spans:
            raise InterventionError(f"This input has no span named {name!r}.")
        return spans[name]
    if ":" in spec:
        start, stop = spec.split(":")
        return range(*slice(int(start) if start else None, int(stop) if stop else None).indices(n))
    raise InterventionError(f"Position set {spec!r} needs the capture context to resolve.")


__all__ = ["OPS", "OUTPUT_OPS", "HeadEdit", "Intervention", "InterventionError", "ablate_heads", "parse_positions"]
