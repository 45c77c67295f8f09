"""Images for vision models: sample photos, uploads stored by content hash, and preprocessing.

No torch here (PIL + numpy only), so pages can show the picture a capture saw without loading a model.

- A RunSpec names its image as a sample ("cat", see `sample_names()`), a procedural shapes scene
  "scene-<seed>" (core.scenes, shapes-vlm's settings), or as "sha256:<hex>", the
  SHA-256 of an uploaded file's bytes.  Uploads live in `<cache dir>/uploads/<hex>`; the name is the
  content, so a link names no file path and the same picture always has the same cache key.
- `store_upload(bytes)` checks the content (the format is read from the bytes, not a file name:
  PNG, JPEG, WebP, GIF or BMP; at most MAX_UPLOAD_BYTES and MAX_PIXELS; fully decodable) and
  raises `InputError` with one sentence otherwise.
- `ImagePrep` is a model's preprocessing read from its `preprocessor_config.json` (transformers'
  image-processor fields: resize, centre crop, rescale, normalise) and `preprocess` applies it with
  PIL + numpy exactly as transformers' PIL image processors do (tests compare them), because the
  default transformers image processors need torchvision, which HeadScope never installs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = ROOT / "assets" / "images"
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")
UPLOAD_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000
HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
SCENE_RE = re.compile(r"^scene-(\d{1,9})$")  # a procedural shapes scene by seed (core.scenes, VLM settings)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- sample photos and uploads ----------------------------------------------------------------
def sample_names() -> list[str]:
    """The sample photos shipped in assets/images, by name ("astronaut", "cat", ...)."""
    return sorted(p.stem for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES)


def _sample_path(name: str) -> Path | None:
    for suffix in SAMPLE_SUFFIXES:
        path = SAMPLES_DIR / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def uploads_dir() -> Path:
    from cache.store import cache_dir

    return cache_dir() / "uploads"


def _checked(data: bytes) -> Image.Image:
    """Open and fully decode image bytes, or raise InputError saying what is wrong."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"The image is {len(data) / 2**20:.1f} MB; HeadScope takes at most "
                         f"{MAX_UPLOAD_BYTES // 2**20} MB.")
    if not data:
        raise InputError("The image file is empty.")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind = probe.format
            width, height = probe.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "not an image"
        raise InputError("That file is not an image HeadScope can read (PNG, JPEG, WebP, GIF or BMP).") from exc
    if kind not in UPLOAD_FORMATS:
        raise InputError(f"{kind} images are not supported; use PNG, JPEG, WebP, GIF or BMP.")
    if width * height > MAX_PIXELS:
        raise InputError(f"The image is {width} x {height} pixels; HeadScope takes at most "
                         f"{MAX_PIXELS / 1e6:g} megapixels.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # a truncated or corrupt file fails here, not later inside a capture
    except Exception as exc:  # noqa: BLE001
        raise InputError("The image file is damaged or truncated; it could not be decoded.") from exc
    return image


def store_upload(data: bytes) -> str:
    """Check image bytes, store them by content hash, and return their reference "sha256:<hex>"."""
    _checked(data)
    digest = hashlib.sha256(data).hexdigest()
    folder = uploads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / digest
    if not path.exists():
        staging = folder / f".{digest}.tmp{os.getpid()}"
        staging.write_bytes(data)
        os.replace(staging, path)  # atomic: a half-written upload is never seen
    return f"sha256:{digest}"


def store_file(path: str | os.PathLike) -> str:
    """Read an image file from disk and store it as an upload (CLI / Python API)."""
    path = Path(path).expanduser()
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise InputError(f"{path.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
    return store_upload(path.read_bytes())


def canonical_image(image: str | None) -> str | None:
    """A RunSpec image reference: a sample name or "sha256:<hex>"; an existing file path is stored first."""
    if image is None or HASH_RE.match(image) or _sample_path(image) is not None:
        return image
    path = Path(image).expanduser()
    if ("/" in image or "." in image) and path.is_file():
        return store_file(path)
    return image


def load_image(ref: str | None) -> Image.Image:
    """The picture a reference names, as an RGB PIL image; InputError if there is none."""
    if not ref:
        raise InputError("No image given; pick a sample (" + ", ".join(sample_names()) + ") or upload one.")
    match = HASH_RE.match(ref)
    if match:
        path = uploads_dir() / match.group(1)
        if not path.is_file():
            raise InputError("That uploaded image is not on this server any more; upload it again.")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != match.group(1):
            raise InputError("The stored upload is damaged; upload the image again.")
        return _to_rgb(_checked(data))
    scene = SCENE_RE.match(ref)
    if scene:
        return Image.fromarray(scene_picture(int(scene.group(1))))
    path = _sample_path(ref)
    if path is None:
        raise InputError(f"There is no sample image called {ref!r}; pick one of " + ", ".join(sample_names())
                         + ", or upload an image.")
    with Image.open(path) as image:
        image.load()
        return _to_rgb(image)


def scene_picture(seed: int) -> np.ndarray:
    """image  # [112, 112, 3] uint8: the shapes scene `seed` as shapes-vlm reads it
    (core.scenes.make_scene(seed, scenes.VLM)); named "scene-<seed>" in a RunSpec or a link."""
    from core import scenes

    return scenes.make_scene(seed, scenes.VLM).image


PICTURE_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}  # 8 bits a channel


def as_picture(image) -> Image.Image:
    """An RGB PIL picture from a PIL image or a uint8 array [H, W] / [H, W, 3 or 4], for a model's processor;
    InputError with one sentence for another type, mode or dtype, or more than MAX_PIXELS pixels."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(f"A picture array must be uint8 [height, width, 3]; this one is {image.dtype} "
                             f"{list(image.shape)}.")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"A picture must be a PIL image or a uint8 array, not {type(image).__name__}.")
    if image.mode not in PICTURE_MODES:
        raise InputError(f"Pictures in PIL mode {image.mode} (more than 8 bits a channel) are not supported; "
                         "convert the picture to RGB first.")
    width, height = image.size
    if width * height > MAX_PIXELS or min(width, height) < 1:
        raise InputError(f"The picture is {width} x {height} pixels; HeadScope takes 1 to {MAX_PIXELS / 1e6:g} "
                         "megapixels.")
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as most viewers show it)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---- preprocessing --------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePrep:
    """A model's image preprocessing, in transformers' image-processor terms."""

    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 2  # PIL: 0 nearest, 2 bilinear, 3 bicubic, 1 lanczos
    do_center_crop: bool = False
    crop_size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, data: dict, image_size: int = 224) -> "ImagePrep":
        """From a preprocessor_config.json record; missing fields take the ViT defaults at `image_size`."""
        def as_size(value, default):
            if value is None:
                return default
            if isinstance(value, int):
                return {"height": value, "width": value}
            return {k: int(v) for k, v in dict(value).items() if v is not None}

        square = {"height": image_size, "width": image_size}
        mean = data.get("image_mean", cls.image_mean)
        std = data.get("image_std", cls.image_std)
        return cls(
            do_resize=bool(data.get("do_resize", True)),
            size=as_size(data.get("size"), square),
            resample=int(data.get("resample", 2)),
            do_center_crop=bool(data.get("do_center_crop", False)),
            crop_size=as_size(data.get("crop_size"), square),
            do_rescale=bool(data.get("do_rescale", True)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            do_normalize=bool(data.get("do_normalize", True)),
            image_mean=tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)),
            image_std=tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3)),
        )

    @classmethod
    def from_pretrained(cls, source: str, image_size: int = 224, **kwargs) -> "ImagePrep":
        """Read preprocessor_config.json from a folder or the local Hugging Face cache, else the
        "image_processor" record of processor_config.json (where transformers 5 saves a processor's
        image processor); defaults if neither is there."""
        from transformers.utils import cached_file

        for name in ("preprocessor_config.json", "processor_config.json"):
            try:
                path = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False, **kwargs)
            except Exception:  # noqa: BLE001 - no such file
                path = None
            data = json.loads(Path(path).read_text()) if path else {}
            data = data.get("image_processor", {}) if name == "processor_config.json" else data
            if data:
                return cls.from_dict(data, image_size)
        return cls.from_dict({}, image_size)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the pixels the model receives for a width x height picture."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize:
            return _resize_size(self.size, width, height)
        return height, width

    def fixed_size(self) -> tuple[int, int] | None:
        """The model input's (height, width) if it does not depend on the picture's aspect ratio."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        return None


def _resize_size(size: dict, width: int, height: int) -> tuple[int, int]:
    """transformers' resize target (height, width) for `size` (its get_resize_output_image_size)."""
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        if size.get("longest_edge") and new_long > size["longest_edge"]:
            new_short, new_long = int(size["longest_edge"] * new_short / new_long), size["longest_edge"]
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise InputError(f"This model's image processor uses a size HeadScope does not support ({size}).")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of [H, W, C], zero-padded where the picture is smaller (as transformers does)."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


def preprocess(image: Image.Image, prep: ImagePrep) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values  # [3, H, W] float32, shown  # [H, W, 3] uint8: the crop the model sees)."""
    image = _to_rgb(image)
    if prep.do_resize:
        height, width = _resize_size(prep.size, *image.size)
        image = image.resize((width, height), resample=Image.Resampling(prep.resample))
    shown = np.asarray(image, dtype=np.uint8)
    if prep.do_center_crop:
        shown = _center_crop(shown, prep.crop_size["height"], prep.crop_size["width"])
    pixels = shown.astype(np.float64) * prep.rescale_factor if prep.do_rescale else shown.astype(np.float64)
    pixels = pixels.astype(np.float32)
    if prep.do_normalize:
        mean = np.asarray(prep.image_mean, np.float32)
        std = np.asarray(prep.image_std, np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), np.ascontiguousarray(shown)
