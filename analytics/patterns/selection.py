"""A selection of atlas maps (a lasso, a cluster): the heads behind it, and its value in a link.

`selection_text` packs map indices into the `points` field of a share link (state.ViewState): ranges
("3.7-12.40") or, when shorter, "z" + the base64url of the zlib-compressed bitset;
`parse_selection` reads it back, refusing anything malformed or over a million maps.  Pure numpy.
"""
from __future__ import annotations

import base64
import binascii
import zlib
from typing import Iterable, Sequence

import numpy as np

from analytics.patterns.sample import MapSet


def selection_heads(maps: MapSet, labels: np.ndarray, selected: np.ndarray, names: Sequence[str]) -> list[dict]:
    """The heads some maps come from: one row per (group, layer, head) with its number of selected maps and
    their clusters ("local ×3, sink ×1"), most maps first."""
    rows: dict = {}
    for i in np.asarray(selected, dtype=np.int64):
        group = maps.sources[maps.source[i]].group
        key = (group, int(maps.layer[i]), int(maps.head[i]))
        row = rows.setdefault(key, {"model": group, "layer": key[1], "head": key[2], "maps": 0, "clusters": {}})
        row["maps"] += 1
        c = int(labels[i])
        row["clusters"][c] = row["clusters"].get(c, 0) + 1
    table = sorted(rows.values(), key=lambda r: (-r["maps"], r["model"], r["layer"], r["head"]))
    for r in table:
        r["clusters"] = ", ".join(f"{names[c] if c >= 0 else 'noise'} ×{m}"
                                  for c, m in sorted(r["clusters"].items(), key=lambda x: -x[1]))
    return table


def selection_text(indices: Iterable[int]) -> str:
    """Map indices -> a compact, URL-safe link value: ranges "3.7-12.40", or, when shorter, "z" + the
    base64url of the zlib-compressed bitset (a lasso over thousands of scattered maps)."""
    idx = sorted(set(int(i) for i in indices))
    parts, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    ranges = ".".join(parts)
    if not idx or len(ranges) < 24:
        return ranges
    mask = np.zeros(idx[-1] + 1, bool)
    mask[idx] = True
    packed = "z" + base64.urlsafe_b64encode(zlib.compress(np.packbits(mask).tobytes(), 9)).decode().rstrip("=")
    return packed if len(packed) < len(ranges) else ranges


def parse_selection(text: str, limit: int = 1_000_000) -> list[int]:
    """A `selection_text` value -> sorted map indices; ValueError if malformed (or over `limit` maps)."""
    if text.startswith("z"):
        try:
            raw = base64.urlsafe_b64decode(text[1:] + "=" * (-len(text[1:]) % 4))
            inflater = zlib.decompressobj()
            bits = inflater.decompress(raw, limit // 8 + 1)
        except (binascii.Error, ValueError, zlib.error) as exc:
            raise ValueError("not a selection") from exc
        if inflater.unconsumed_tail:
            raise ValueError("too many points")
        return np.flatnonzero(np.unpackbits(np.frombuffer(bits, np.uint8))).tolist()
    out: list[int] = []
    for part in filter(None, text.split(".")):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if a < 0 or b < a or b - a > limit:
            raise ValueError(f"bad range {part!r}")
        out.extend(range(a, b + 1))
        if len(out) > limit:
            raise ValueError("too many points")
    return out
