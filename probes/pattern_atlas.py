"""The pattern atlas's autoencoder (torch) and the pipeline that builds an atlas from cached captures.

    captures ─▶ analytics.patterns.sample_maps ─▶ MapSet (32 x 32 images) ─▶ PatternAE (train) ─▶ codes
             ─▶ analytics.patterns.embed_2d (UMAP) + cluster_codes (k-means / HDBSCAN) ─▶ Atlas

`PatternAE` is a small convolutional autoencoder on sqrt(mass) images (Li et al., TVCG 2023;
METHODS.md §3.2):

    encoder  1x32x32 -conv3 s2-> 8x16x16 -conv3 s2-> 16x8x8 -conv3 s2-> 32x4x4 -linear-> latent (16)
    decoder  latent -linear-> 32x4x4 -convT4 s2-> 16x8x8 -convT4 s2-> 8x16x16 -convT4 s2-> 1x32x32
    (ReLU between layers; 33 k parameters)

Training is deterministic: `torch.manual_seed(seed)`, a seeded generator for the mini-batches, one
thread and `torch.use_deterministic_algorithms(True)` for the duration (restored afterwards).  The
trained weights, the sampled maps and their codes are cached in the Store under a key made of the
capture keys and the parameters; the embedding and clusters under a second key that adds the
clustering parameters, and the 2-D embedding under a third key (autoencoder + UMAP parameters), so
re-clustering with another k neither re-trains nor re-embeds.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from torch import nn

from analytics import patterns as P
from cache.atlas import KIND, load_atlas, load_model, save_atlas, save_model
from core.keys import stable_hash
from core.progress import Progress, no_progress

VERSION = 5  # bump when the encoding, the network or the training loop changes


class PatternAE(nn.Module):
    """Convolutional autoencoder for SIZE x SIZE single-channel images (see the module docstring)."""

    def __init__(self, latent: int = 16, width: int = 8):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * w * 16, latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, 4 * w * 16), nn.ReLU(), nn.Unflatten(1, (4 * w, 4, 4)),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w, 1, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@contextlib.contextmanager
def deterministic(threads: int = 1):
    """One thread and deterministic kernels for the block (process-wide torch settings, restored after)."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def to_input(images: np.ndarray) -> torch.Tensor:
    """images  # [map, SIZE, SIZE] mass -> [map, 1, SIZE, SIZE] sqrt(mass) (Hellinger geometry)."""
    return torch.from_numpy(np.sqrt(np.clip(np.asarray(images, dtype=np.float32), 0.0, None)))[:, None]


def train(images: np.ndarray, params: P.AtlasParams = P.AtlasParams(),
          progress: Progress = no_progress) -> tuple[PatternAE, list[float]]:
    """Train a PatternAE on `images` for params.steps mini-batches; returns (model, loss every 50 steps)."""
    x = to_input(images)
    n = x.shape[0]
    with deterministic():
        torch.manual_seed(params.seed)
        gen = torch.Generator().manual_seed(params.seed)
        model = PatternAE(params.latent)
        opt = torch.optim.Adam(model.parameters(), lr=params.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(params.steps * 0.7)], gamma=0.3)
        losses, running = [], 0.0
        model.train()
        for step in range(params.steps):
            batch = x[torch.randint(n, (min(params.batch, n),), generator=gen)]
            loss = ((model(batch) - batch) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            if (step + 1) % 50 == 0 or step + 1 == params.steps:
                losses.append(running / (50 if (step + 1) % 50 == 0 else (step + 1) % 50))
                running = 0.0
                progress((step + 1) / params.steps, f"training the autoencoder: step {step + 1}/{params.steps}, "
                                                    f"loss {losses[-1]:.5f}")
    model.eval()
    return model, losses


def encode(model: PatternAE, images: np.ndarray, batch: int = 2048) -> np.ndarray:
    """codes  # [map, latent] float32."""
    x = to_input(images)
    with deterministic(), torch.no_grad():
        return torch.cat([model.encoder(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def decode(model: PatternAE, codes: np.ndarray) -> np.ndarray:
    """images  # [n, SIZE, SIZE] float32 in mass units (the decoder's sqrt output, clipped at 0, squared)."""
    with deterministic(), torch.no_grad():
        out = model.decoder(torch.from_numpy(np.asarray(codes, dtype=np.float32)))[:, 0]
    return (out.clamp(min=0) ** 2).numpy()


def weights_of(model: PatternAE) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}


def model_from(weights: dict[str, np.ndarray], latent: int) -> PatternAE:
    model = PatternAE(latent)
    model.load_state_dict({name: torch.tensor(np.asarray(w, dtype=np.float32)) for name, w in weights.items()})
    model.eval()
    return model


def model_key(capture_keys: list[str], params: P.AtlasParams) -> str:
    """Cache key of the sampled maps + trained autoencoder: the set of captures and the parameters."""
    return stable_hash({"kind": "pattern_model", "captures": sorted(capture_keys), "params": params.model_json(),
                        "version": VERSION})


def atlas_key(model_key_: str, params: P.AtlasParams) -> str:
    """Cache key of an atlas: its autoencoder + the embedding/clustering parameters."""
    return stable_hash({"kind": "pattern_atlas", "model": model_key_, "cluster": asdict(params.cluster),
                        "version": VERSION})


def embedding_key(model_key_: str, params: P.AtlasParams) -> str:
    """Cache key of the 2-D embedding: the autoencoder + the UMAP parameters (not the clustering ones)."""
    c = params.cluster
    return stable_hash({"kind": "pattern_embedding", "model": model_key_, "neighbors": c.neighbors,
                        "min_dist": c.min_dist, "epochs": c.epochs, "seed": c.seed, "version": VERSION})


def cached_embedding(store, codes: np.ndarray, model_key_: str, params: P.AtlasParams) -> tuple[np.ndarray, float]:
    """(xy, seconds): the stored embedding of these codes, else UMAP (then stored)."""
    from core.errors import CorruptEntry

    key = embedding_key(model_key_, params)
    try:
        if (store.get_meta(key) or {}).get("part") == "embedding":
            xy = np.asarray(store.get_array(key, "xy"), dtype=np.float32)
            if xy.shape == (len(codes), 2):
                return xy, 0.0
    except CorruptEntry:
        store.evict(key)
    t0 = time.perf_counter()
    xy = P.embed_2d(codes, params.cluster)
    seconds = time.perf_counter() - t0
    store.put_array(key, "xy", xy)
    store.put_meta(key, {"kind": KIND, "part": "embedding", "model_key": model_key_, "seconds": seconds})
    return xy, seconds


def _span(progress: Progress, lo: float, hi: float) -> Progress:
    return lambda f, m: progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), m)


def finish(maps: P.MapSet, codes: np.ndarray, model: PatternAE, params: P.AtlasParams, key: str = "",
           model_key_: str = "", progress: Progress = no_progress, timings: dict | None = None,
           loss: list[float] | None = None, store=None) -> P.Atlas:
    """Embed (cached in `store` when given), cluster, decode the cluster centres, pick the nearest maps
    and label the clusters."""
    timings = dict(timings or {})
    progress(0.0, "embedding the codes in 2-D (UMAP; the first run in a process compiles it)")
    c0 = time.process_time()
    if store is not None:
        xy, timings["embed_s"] = cached_embedding(store, codes, model_key_, params)
    else:
        t0 = time.perf_counter()
        xy = P.embed_2d(codes, params.cluster)
        timings["embed_s"] = time.perf_counter() - t0
    timings["embed_cpu_s"] = time.process_time() - c0
    progress(0.8, "clustering")
    t0, c0 = time.perf_counter(), time.process_time()
    clustering = P.cluster_codes(codes, xy, params.cluster, maps.family())
    k = clustering.k
    labels = clustering.labels
    centres = np.stack([codes[labels == c].mean(0) for c in range(k)]) if k else np.zeros((0, codes.shape[1]))
    prototypes = decode(model, centres) if k else np.zeros((0, P.SIZE, P.SIZE), np.float32)
    ctraits = P.cluster_traits(maps.traits, labels, k)
    names = P.cluster_labels(ctraits, P.cluster_modalities(maps, labels, k))
    nearest = P.nearest_members(codes, labels, k)
    timings["cluster_s"], timings["cluster_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    progress(1.0, "done")
    return P.Atlas(key=key, model_key=model_key_, params=params, maps=maps, codes=codes, xy=xy, cluster=labels, k=k,
                   prototypes=prototypes.astype(np.float32), nearest=nearest, labels=names, ctraits=ctraits,
                   scores=clustering.scores, chosen=clustering.chosen, loss=list(loss or []), timings=timings)


def atlas_from_maps(maps: P.MapSet, params: P.AtlasParams = P.AtlasParams(),
                    progress: Progress = no_progress) -> tuple[P.Atlas, PatternAE]:
    """Train, embed and cluster an in-memory MapSet (no cache): synthetic maps, tests, benchmarks."""
    t0, c0 = time.perf_counter(), time.process_time()
    model, loss = train(maps.images, params, _span(progress, 0.0, 0.7))
    codes = encode(model, maps.images)
    timings = {"train_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0}
    return finish(maps, codes, model, params, progress=_span(progress, 0.7, 1.0), timings=timings, loss=loss), model


def build_atlas(captures: list, params: P.AtlasParams = P.AtlasParams(), store=None,
                progress: Progress = no_progress) -> P.Atlas:
    """The atlas of `captures` (Capture objects): from the cache when this set of captures was trained
    on with these parameters, else sampled, trained, embedded and clustered, and cached."""
    from capture.api import default_store

    store = store or default_store()
    captures = sorted(captures, key=lambda c: c.key)  # the order of a selection does not change the atlas
    if not captures:
        raise ValueError("Pick at least one capture to train on.")
    mkey = model_key([c.key for c in captures], params)
    akey = atlas_key(mkey, params)
    found = load_atlas(store, akey, P.atlas_from_store)
    if found is not None:
        return found
    with store.lock(akey):
        found = load_atlas(store, akey, P.atlas_from_store)
        if found is not None:
            return found
        stored = load_model(store, mkey, P.model_from_store)
        if stored is not None:
            maps, codes, weights, record = stored
            model, loss, timings = model_from(weights, params.latent), record.get("loss", []), record.get("timings", {})
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            maps = P.sample_maps(captures, params.vision, params.queries, _span(progress, 0.0, 0.1))
            timings = {"encode_s": time.perf_counter() - t0, "encode_cpu_s": time.process_time() - c0}
            if len(maps) < 8:
                raise ValueError(f"Only {len(maps)} maps in these captures; pick more to train on.")
            t0, c0 = time.perf_counter(), time.process_time()
            model, loss = train(maps.images, params, _span(progress, 0.1, 0.7))
            codes = encode(model, maps.images)
            timings["train_s"], timings["train_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            save_model(store, mkey, *P.model_to_store(maps, codes, params, loss, timings), weights_of(model))
        atlas = finish(maps, codes, model, params, akey, mkey, _span(progress, 0.7, 1.0), timings, loss, store)
        save_atlas(store, atlas.key, *P.atlas_to_store(atlas))
        return atlas


def recluster(atlas: P.Atlas, cluster: P.ClusterParams, store=None, progress: Progress = no_progress) -> P.Atlas:
    """The same atlas clustered with other parameters (re-uses the trained autoencoder and the maps)."""
    from capture.api import default_store

    store = store or default_store()
    params = replace(atlas.params, cluster=cluster)
    akey = atlas_key(atlas.model_key, params)
    found = load_atlas(store, akey, P.atlas_from_store)
    if found is not None:
        return found
    stored = load_model(store, atlas.model_key, P.model_from_store)
    if stored is None:
        raise ValueError("The autoencoder of this atlas is no longer in the cache; train it again.")
    maps, codes, weights, record = stored
    out = finish(maps, codes, model_from(weights, params.latent), params, akey, atlas.model_key, progress,
                 record.get("timings", {}), record.get("loss", []), store)
    save_atlas(store, out.key, *P.atlas_to_store(out))
    return out
