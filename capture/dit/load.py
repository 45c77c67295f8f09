"""Loading a diffusers pipeline folder (model_index.json) whose transformer HeadScope knows.

`load_pipeline(name, folder)` reads model_index.json, picks the family of its transformer class
(capture.dit.families: SD3 / SD3.5, Flux, FLUX.2 [klein] and [dev], Chroma, PixArt-α / Σ, Sana, Qwen-Image,
CogView 4, AuraFlow, HunyuanDiT, Lumina 2, Z-Image; each names the pipeline classes it was checked in), loads the
pipeline with `DiffusionPipeline.from_pretrained` (local files only, no remote code; a component the family builds
itself, FLUX.2 [dev]'s text processor, is left out and set after), installs HeadScope's processors in the
transformer (capture.dit.attention.install) and describes it as a ModelHandle: the transformer in the `model`
slot, a capture.dit.pipeline.PipelineDit in the `tokenizer` slot, one layer per self- or joint-attention
module, `meta.grid` the patch grid at the default picture size. It runs where capture.engine.device says
(HEADSCOPE_DEVICE, HEADSCOPE_DTYPE: bfloat16 or float16 on a GPU, float32 on the CPU), text encoders and VAE
included; the recorded maps are computed in float32 whatever the dtype, and a capture in another dtype than
float32 has its own key (the registry folds the dtype into the revision).
"""
from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

from capture.engine.handle import ModelHandle
from core.errors import ModelUnavailable
from core.types import ModelMeta

FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "ChromaTransformer2DModel": "chroma",
            "PixArtTransformer2DModel": "pixart", "SanaTransformer2DModel": "sana",
            "QwenImageTransformer2DModel": "qwenimage", "Flux2Transformer2DModel": "flux2",
            "CogView4Transformer2DModel": "cogview4", "AuraFlowTransformer2DModel": "auraflow",
            "HunyuanDiT2DModel": "hunyuandit", "Lumina2Transformer2DModel": "lumina2",
            "ZImageTransformer2DModel": "zimage"}
KNOWN = ("SD3 / SD3.5, Flux, FLUX.2, Chroma, PixArt-α / Σ, Sana, Qwen-Image, CogView 4, AuraFlow, HunyuanDiT, "
         "Lumina 2 and Z-Image")


def is_pipeline(folder: Path) -> bool:
    return (Path(folder) / "model_index.json").is_file()


def _index(folder: Path) -> dict:
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def transformer_class(folder: Path) -> str | None:
    """The diffusers class of the pipeline's transformer (None when it has none, or the index is unreadable)."""
    entry = _index(folder).get("transformer")
    return str(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


def family_of(name: str, folder: Path):
    """The capture.dit.families Family of a pipeline folder; ModelUnavailable (one sentence) otherwise."""
    cls = transformer_class(folder)
    if cls is None:
        raise ModelUnavailable(f"The pipeline in {name} has no diffusion transformer; HeadScope captures {KNOWN} "
                               "pipelines.")
    if cls not in FAMILIES:
        raise ModelUnavailable(f"HeadScope does not know the {cls} transformer of {name}; it captures {KNOWN} "
                               "pipelines.")
    module = importlib.import_module(f"capture.dit.families.{FAMILIES[cls]}")
    variants = getattr(module, "VARIANTS", (module.FAMILY,))  # FLUX.2: [klein]'s pipeline and [dev]'s
    pipeline = str(_index(folder).get("_class_name", ""))
    for family in variants:
        if pipeline in family.pipelines:
            return family
    checked = [p for family in variants for p in family.pipelines]
    raise ModelUnavailable(f"HeadScope captures the {cls} transformer in {' or '.join(checked)} only; "
                           f"{name} is a {pipeline or 'pipeline of no named class'}, which it has not been "
                           "checked on.")


def from_folder(folder: Path, family, dtype):
    """The diffusers pipeline in `folder` as diffusers loads it (its own attention processors), but for the
    components the family builds itself (FLUX.2 [dev]'s text processor): diffusers is told to leave them, and they
    are set after (bench/dit.py's plain runs come in here too)."""
    from diffusers import DiffusionPipeline

    built = family.components(folder) if family.components is not None else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **dict.fromkeys(built))
    for attr, component in built.items():
        setattr(pipe, attr, component)
    return pipe


def load_pipeline(name: str, folder: Path) -> ModelHandle:
    """The pipeline in `folder`, ready for capture (module docstring)."""
    from capture.engine import device

    family = family_of(name, folder)
    try:
        pipe = from_folder(folder, family, device.dtype())
        pipe.to(device.device())
    except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelUnavailable(f"The pipeline in {name} could not be loaded ({first[:200]}).") from exc
    return handle_of(name, pipe, family)


def handle_of(name: str, pipe, family) -> ModelHandle:
    """A loaded diffusers pipeline of `family` as a ModelHandle, HeadScope's processors installed (bench/dit_gpu.py
    builds its random-weight pipelines in memory and comes in here)."""
    from capture.dit.attention import install
    from capture.dit.pipeline import PipelineDit

    pipe.set_progress_bar_config(disable=True)
    try:
        layers = install(pipe.transformer)
    except ValueError as exc:
        raise ModelUnavailable(f"{name}: {exc}; HeadScope captures {KNOWN} pipelines.") from exc
    runner = PipelineDit(pipe, family)
    first = layers[0]
    heads = int(first.heads)
    head_dim = int(first.to_q.out_features) // heads
    meta = ModelMeta(name=name, family=family.name, modality="dit", n_layers=len(layers), n_heads=heads,
                     n_kv_heads=int(first.to_k.out_features) // head_dim, head_dim=head_dim, causal=False,
                     grid=runner.grid_of(runner.default_side, runner.default_side))
    return ModelHandle(name=name, model=pipe.transformer, tokenizer=runner, meta=meta, attention_modules=layers,
                       lock=threading.Lock())


__all__ = ["FAMILIES", "family_of", "from_folder", "handle_of", "is_pipeline", "load_pipeline", "transformer_class"]
