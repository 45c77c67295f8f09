"""The pattern atlas as one object, and its parts as the Store keeps them.

An `Atlas` is the result of the whole pipeline (probes.pattern_atlas: sample -> train the autoencoder
-> embed -> cluster -> describe): the sampled maps, their latent codes, the 2-D embedding, the
clusters, each cluster's decoded prototype, nearest maps, traits and label.  `AtlasParams` is
everything that determines it besides its captures (defaults: centred image maps, 16 query patches,
a 16-d latent, 600 Adam steps of 128 maps at lr 3e-3, seed 0; `ClusterParams` for the rest).

cache.atlas stores an atlas as plain arrays and JSON; `model_to_store` / `atlas_to_store` give it
those, and `model_from_store` / `atlas_from_store` build the objects back from what it read (its
`Record`s: key, meta, arrays, weights).  A stored atlas is labelled by today's `describe` rules on
its stored cluster traits.  Pure numpy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from analytics.patterns.cluster import ClusterParams
from analytics.patterns.describe import cluster_labels, cluster_modalities, head_profiles
from analytics.patterns.sample import MapSet, Source


@dataclass(frozen=True)
class AtlasParams:
    """Everything that determines an atlas besides its captures (all of it goes into the cache keys)."""

    vision: str = "centred"  # encoding of patch-grid models: "centred" | "uncentred"
    queries: int = 16  # vision: query patches per head
    latent: int = 16
    steps: int = 600  # autoencoder optimiser steps (mini-batches of `batch`), whatever the number of maps
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0
    cluster: ClusterParams = ClusterParams()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "AtlasParams":
        data = dict(data)
        data["cluster"] = ClusterParams(**data.get("cluster", {}))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def model_json(self) -> dict:
        """The part that determines the maps and the trained autoencoder."""
        d = self.to_json()
        d.pop("cluster")
        return d


@dataclass
class Atlas:
    """A trained pattern atlas: maps, codes, 2-D embedding, clusters, prototypes, labels."""

    key: str  # atlas key (model key + embedding/clustering params)
    model_key: str  # autoencoder key (captures + encoding + training params)
    params: AtlasParams
    maps: MapSet
    codes: np.ndarray  # [map, latent] float32
    xy: np.ndarray  # [map, 2] float32
    cluster: np.ndarray  # [map] int
    k: int
    prototypes: np.ndarray  # [k, SIZE, SIZE] float32: the decoded centre of each cluster (mass units)
    nearest: np.ndarray  # [k, m] map indices nearest to each centre
    labels: list[str]  # automatic labels
    ctraits: np.ndarray  # [k, len(TRAITS)]
    scores: dict[str, dict[int, float]] = field(default_factory=dict)  # per family: silhouette per tried k
    chosen: dict[str, int] = field(default_factory=dict)  # per family: clusters used
    loss: list[float] = field(default_factory=list)  # autoencoder training loss (every 50 steps)
    timings: dict[str, float] = field(default_factory=dict)

    def groups(self) -> list[str]:
        """Source groups (model · intervention) in first-seen order."""
        return list(dict.fromkeys(s.group for s in self.maps.sources))

    def group_mask(self, group: str, source: int | None = None) -> np.ndarray:
        """[map] bool: the maps of one group (optionally of one source in it)."""
        in_group = np.asarray([s.group == group for s in self.maps.sources])
        mask = in_group[self.maps.source]
        return mask if source is None else mask & (self.maps.source == source)

    def profiles(self, group: str, source: int | None = None) -> np.ndarray:
        """[layer, head, k] of one group's heads (over all its inputs, or one `source`)."""
        src = next(s for s in self.maps.sources if s.group == group)
        return head_profiles(self.cluster, self.maps.layer, self.maps.head, src.n_layers, src.n_heads, self.k,
                             self.group_mask(group, source))


# ---- to and from the Store (cache.atlas) ----------------------------------------------------------

MAP_FIELDS = ("images", "source", "layer", "head", "query", "traits")


def model_to_store(maps: MapSet, codes: np.ndarray, params: AtlasParams, loss: list[float],
                   timings: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of the model record: the sampled maps and their codes (cache.atlas.save_model adds
    the autoencoder's weights)."""
    meta = {"sources": [asdict(s) for s in maps.sources], "params": params.to_json(), "loss": list(loss),
            "timings": timings}
    return meta, {**{name: getattr(maps, name) for name in MAP_FIELDS}, "codes": codes}


def model_from_store(record) -> tuple[MapSet, np.ndarray, dict[str, np.ndarray], dict]:
    """(maps, codes, weights, meta) of a model record read by cache.atlas.load_model."""
    arrays = record.arrays
    maps = MapSet(*(arrays[name] for name in MAP_FIELDS), [Source(**s) for s in record.meta["sources"]])
    return maps, arrays["codes"], record.weights, record.meta


def atlas_to_store(atlas: Atlas) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of the atlas record: embedding, clusters, prototypes, nearest maps, cluster traits."""
    meta = {"model_key": atlas.model_key, "k": atlas.k, "labels": atlas.labels,
            "modalities": cluster_modalities(atlas.maps, atlas.cluster, atlas.k), "params": atlas.params.to_json(),
            "scores": {f: {str(k): v for k, v in sc.items()} for f, sc in atlas.scores.items()},
            "chosen": atlas.chosen, "timings": atlas.timings}
    arrays = {"xy": atlas.xy, "cluster": atlas.cluster, "prototypes": atlas.prototypes, "nearest": atlas.nearest,
              "ctraits": atlas.ctraits}
    return meta, arrays


def atlas_from_store(record, model) -> Atlas:
    """The `Atlas` of an atlas record and its model record, read by cache.atlas.load_atlas."""
    maps, codes, _, model_meta = model_from_store(model)
    meta, arrays = record.meta, record.arrays
    return Atlas(key=record.key, model_key=meta["model_key"], params=AtlasParams.from_json(meta["params"]),
                 maps=maps, codes=codes, xy=arrays["xy"], cluster=arrays["cluster"], k=int(meta["k"]),
                 prototypes=arrays["prototypes"], nearest=arrays["nearest"], ctraits=arrays["ctraits"],
                 labels=cluster_labels(arrays["ctraits"], meta["modalities"]),  # today's rules on the stored traits
                 scores={f: {int(k): float(v) for k, v in sc.items()} for f, sc in meta.get("scores", {}).items()},
                 chosen={f: int(v) for f, v in meta.get("chosen", {}).items()},
                 loss=list(model_meta.get("loss", [])),
                 timings={**model_meta.get("timings", {}), **meta.get("timings", {})})
