"""Where models run and in which precision: HEADSCOPE_DEVICE and HEADSCOPE_DTYPE.

    HEADSCOPE_DEVICE   auto (default) | cpu | cuda | cuda:N
                       auto = the first CUDA GPU when torch sees one, else the CPU
    HEADSCOPE_DTYPE    auto (default) | float32 | bfloat16 | float16
                       auto = bfloat16 on a GPU, float32 on the CPU

`python -m headscope run --device / --dtype` set the same variables, and Ray workers inherit them
(probes.batch forwards every HEADSCOPE_ variable).  Every module that loads a model reads these
functions (capture.text.load, capture.vlm, capture.dit): the API is `device()`, `dtype()` and their
torch-free names `device_name()`, `dtype_name()`; `placement()` (from_pretrained's dtype and
device_map), `to_host()` (a finished GPU tensor to numpy through pinned memory) and `keyed_revision`.

What the precision changes and what it does not:
- the weights and the model's activations are in `dtype()`; every softmax HeadScope computes is in
  float32 whatever the model's dtype (capture.engine.call), and stored maps are float16 as always;
- a map computed in one dtype is not served for another: `keyed_revision` folds a dtype other than
  float32 into the model revision, so every float32 cache key (all keys made before this setting
  existed) stays the same and a bfloat16 capture gets its own key.

Resolving the settings is torch-free on a machine without an NVIDIA driver (no
/proc/driver/nvidia), so a capture served from the cache never imports torch; elsewhere torch is
asked whether CUDA works.  A bad setting is one sentence (core.errors.InputError): an unknown
device, a GPU that is not there, a dtype the device cannot compute in (float16 on the CPU, bfloat16 on
a GPU older than Ampere).
"""
from __future__ import annotations

import os
from pathlib import Path

from core.errors import InputError

DEVICE_ENV = "HEADSCOPE_DEVICE"
DTYPE_ENV = "HEADSCOPE_DTYPE"
DTYPES = ("float32", "bfloat16", "float16")
BASE_DTYPE = "float32"  # keys of this dtype carry no suffix


def _setting(env: str) -> str:
    return os.environ.get(env, "auto").strip().lower() or "auto"


def _cuda_present() -> bool:
    """True when torch sees a CUDA GPU; torch is imported only where an NVIDIA driver is installed."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not Path("/proc/driver/nvidia").exists():
        return False
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    """"cpu" or "cuda:N", from HEADSCOPE_DEVICE (one sentence when it names no device of this machine)."""
    wanted = _setting(DEVICE_ENV)
    if wanted == "auto":
        return "cuda:0" if _cuda_present() else "cpu"
    if wanted == "cpu":
        return "cpu"
    kind, _, index = wanted.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"{DEVICE_ENV}={wanted!r} is not a device HeadScope knows; use auto, cpu, cuda or cuda:N.")
    if not _cuda_present():
        raise InputError(f"{DEVICE_ENV}={wanted} asks for a CUDA GPU, but this machine has none that torch can use; "
                         "use auto or cpu.")
    import torch

    number = int(index or 0)
    if number >= torch.cuda.device_count():
        raise InputError(f"{DEVICE_ENV}={wanted} names GPU {number}, but this machine has "
                         f"{torch.cuda.device_count()} (cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    return f"cuda:{number}"


def dtype_name(device: str | None = None) -> str:
    """"float32", "bfloat16" or "float16", from HEADSCOPE_DTYPE for `device` (default `device_name()`);
    one sentence when the device cannot compute in it."""
    device = device or device_name()
    wanted = _setting(DTYPE_ENV)
    if wanted == "auto":
        return "float32" if device == "cpu" else "bfloat16" if _bf16_on(device) else "float16"
    if wanted not in DTYPES:
        raise InputError(f"{DTYPE_ENV}={wanted!r} is not a dtype HeadScope runs models in; use auto, "
                         + ", ".join(DTYPES) + ".")
    if device == "cpu" and wanted == "float16":
        raise InputError(f"{DTYPE_ENV}=float16 needs a GPU: the CPU runs models in float32 or bfloat16, so set "
                         f"{DTYPE_ENV} to one of those (or auto).")
    if wanted == "bfloat16" and device != "cpu" and not _bf16_on(device):
        raise InputError(f"{DTYPE_ENV}=bfloat16 is not supported by the GPU {device} (it needs an Ampere or newer "
                         "GPU); use float16 or float32.")
    return wanted


def _bf16_on(device: str) -> bool:
    import torch

    with torch.cuda.device(torch.device(device)):
        return torch.cuda.is_bf16_supported()


def device():
    """torch.device to run models on."""
    import torch

    return torch.device(device_name())


def dtype():
    """torch dtype of the model weights and activations (softmax stays float32 regardless)."""
    import torch

    return getattr(torch, dtype_name())


def keyed_revision(revision: str) -> str:
    """A model revision as cache keys see it: the dtype appended when it is not float32, so a map is never
    served for another precision and every float32 key stays as it was."""
    name = dtype_name()
    return revision if name == BASE_DTYPE else f"{revision}|{name}"




GPU_SHARE = 0.9  # of a GPU's free memory the weights may fill before the model is spread over devices


def placement(weight_bytes: int | None = None) -> dict:
    """from_pretrained keyword arguments that put a model on `device_name()` in `dtype()`.

    On the CPU: nothing but the dtype (the model stays where transformers puts it).  On a GPU: the whole
    model on that GPU when its weights (`weight_bytes` in `dtype()`, when known) fit in GPU_SHARE of its
    free memory, else accelerate's device_map="auto", which spreads the layers over every GPU (and the
    CPU) when the model is larger than one GPU."""
    name = device_name()
    kwargs = {"dtype": dtype()}
    if name == "cpu":
        return kwargs
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(name))
    fits = weight_bytes is None or weight_bytes <= free * GPU_SHARE
    kwargs["device_map"] = {"": name} if fits else "auto"
    return kwargs


def to_host(tensor):
    """tensor -> numpy array in host memory: a CPU tensor as it is, a GPU tensor through pinned memory
    (the copy waits for the kernels that made it; the numpy array keeps the pinned buffer alive)."""
    if tensor.device.type == "cpu":
        return tensor.numpy()
    import torch

    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return pinned.numpy()


__all__ = ["DEVICE_ENV", "DTYPE_ENV", "DTYPES", "device", "device_name", "dtype", "dtype_name", "keyed_revision",
           "placement", "to_host"]
