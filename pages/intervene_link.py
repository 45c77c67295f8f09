"""What the Intervene page's controls show for an intervention a link names (bug 2 of issue 23: a link
restored the before | after but not the Heads box, the preset or its sliders).

`settings_of(intervention, meta)` reads a preset's heads and parameters back from its edits (the
inverse of capture.presets.build for every preset whose edits carry its parameters); `build` with those
settings gives the same intervention, key for key (tests/models/test_app_links.py holds this).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from capture import Intervention, ModelMeta, presets


@dataclass
class Settings:
    preset: str
    heads: list[tuple[int, int]]  # the Heads box ([] = the preset's own default heads)
    params: dict = field(default_factory=dict)  # slider values (the preset's defaults for the rest)
    note: str = ""  # what the controls cannot show


def _sink_set(keys: str) -> tuple[float, bool]:
    """"sinks:0.2" -> (0.2, False), "allsinks" -> (0.1, True): ACT's threshold and whether the first sink
    is included (core.interventions, position sets)."""
    base, _, tau = keys.partition(":")
    return (float(tau) if tau else 0.1), base == "allsinks"


def _default_heads(name: str, meta: ModelMeta) -> set[tuple[int, int]] | None:
    """The heads a preset takes with no chosen heads (None: it needs chosen heads)."""
    if name in ("act", "var"):
        return set(presets.act(meta).heads())
    if name == "duo-streaming":
        return {(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)}
    return None


def settings_of(intervention: Intervention, meta: ModelMeta) -> Settings | None:
    """The preset, heads and slider values that rebuild `intervention`; None for a custom one (no preset)."""
    name = intervention.preset
    if name not in presets.PRESETS or not intervention.edits:
        return None
    first = intervention.edits[0]
    heads = sorted(set(intervention.heads()))
    if _default_heads(name, meta) == set(heads):
        heads = []
    params: dict = {}
    note = ""
    if name == "prune":
        params["factor"] = float(first.value)
    elif name in ("uniform", "softpag"):
        params["u"] = float(first.value)
    elif name in ("act", "var"):
        tau, include_first = _sink_set(first.keys)
        params.update({"beta" if name == "act" else "p": float(first.value), "tau": tau})
        params["keep_first" if name == "act" else "include_first"] = not include_first if name == "act" \
            else include_first
    elif name == "duo-streaming":
        params.update(recent=int(first.value), sink=int(first.keys.split(":")[1]), mean_token=first.mode == "mean")
    elif name == "iti":
        note = ("ITI's strength is alpha x sigma, and sigma comes from the steering prompts: the link restores the "
                "steered heads and the result; compute directions again to change it.")
    return Settings(preset=name, heads=heads, params=params, note=note)


__all__ = ["Settings", "settings_of"]
