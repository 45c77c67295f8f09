"""How much memory and disk a capture takes: estimated before a run, measured during it.

`estimate(meta, n_tokens, layout)` adds up what the recorded pass holds at its peak, above the
loaded model (bytes; SmolLM2 numbers at 8,192 tokens in brackets):

- the model's own activations during the forward: residual stream, q/k/v, the MLP's intermediate
  tensors and the allocator's slack (`ACTIVATION_FLOATS` x hidden size floats per token) [1.2 GB];
- "tril": the layer buffer being filled plus the `LayerWriter.MAX_PENDING` layers waiting to be
  written (n(n+1)/2 fp16 weights per head each) and the explicit path's fp32 row-block temporaries
  [3.4 GB in all at 8,192 tokens; 0.53 GB at 2,048, where 0.49-0.53 GB was measured];
- "qk": the layer's queries and keys, held the same way (3 layers), the workers' row blocks, the
  reductions ([layer, head, token] float32 each) and the 128-bin thumbnails [1.35 GB in all at
  8,192 tokens, where 0.57 GB was measured];
- "full": as "tril" with n² weights per head.

On a GPU (`device` "cuda:N") the estimate is of GPU memory: the activations in the model's dtype, one
layer's buffer on the device (finished layers wait for the writer in pinned host memory, not on the
GPU) and the row blocks; for "qk" one layer's queries and keys and its reductions (the recorder copies
each layer's to the host when it is done).

The budget is `HEADSCOPE_CAPTURE_GB` when set, else 80 % of the memory the kernel reports available
(MemAvailable) at the time of the run, or on a GPU 80 % of its free memory (torch.cuda.mem_get_info).
`PeakSampler` measures the real peak (resident set size above the start, sampled every 10 ms; on a GPU
also the allocator's peak) so `Capture.timings` can report it beside the estimate.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from core.types import ModelMeta

BYTES_PER_WEIGHT = 2  # fp16 maps on disk and in the recorder's buffers
QK_BYTES = 4  # float32 queries and keys (core.qk explains why)
ACTIVATION_FLOATS = 64  # x hidden size floats per token: the forward's transient tensors and allocator slack (measured: ~60 for SmolLM2)
ROW_BLOCK_TRIL = 256  # capture.engine.call.ROW_BLOCK
PENDING_LAYERS = 3  # the layer being recorded + LayerWriter.MAX_PENDING waiting to be written
AVAILABLE_SHARE = 0.8
REDUCTION_ARRAYS = 5  # core.qk.REDUCTIONS


@dataclass(frozen=True)
class Estimate:
    """Peak memory above the loaded model and bytes written to the cache, for one capture."""

    layout: str
    n_tokens: int
    memory_bytes: int
    disk_bytes: int

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / 2**30

    @property
    def disk_gb(self) -> float:
        return self.disk_bytes / 2**30


def _hidden(meta: ModelMeta) -> int:
    return meta.n_heads * meta.head_dim  # the attention width; SmolLM2: 576 = its hidden size


def map_bytes(meta: ModelMeta, n: int, layout: str) -> int:
    """Bytes of one layer's stored array."""
    if layout == "qk":
        return (meta.n_heads + meta.n_kv_heads) * n * meta.head_dim * QK_BYTES
    per_head = n * (n + 1) // 2 if layout == "tril" else n * n
    return meta.n_heads * per_head * BYTES_PER_WEIGHT


def estimate(meta: ModelMeta, n_tokens: int, layout: str, workers: int = 2, device: str = "cpu",
             dtype_bytes: int = 4) -> Estimate:
    """The peak memory (of `device`) and the disk a capture of `n_tokens` in `layout` needs, for a model whose
    activations take `dtype_bytes` per number (see the module docstring)."""
    n, L, H = n_tokens, meta.n_layers, meta.n_heads
    activations = ACTIVATION_FLOATS * _hidden(meta) * n * dtype_bytes
    layer = map_bytes(meta, n, layout)
    if device != "cpu":
        return _gpu_estimate(meta, n, layout, activations, layer)
    if layout == "qk":
        from capture.engine.longctx import ROW_BLOCK
        from core.qk import HEAD_OVERVIEW_BINS

        group = H // meta.n_kv_heads
        block = workers * 3 * group * ROW_BLOCK * n * 4  # scores, weights and a temporary per worker
        values = meta.n_kv_heads * n * (2 * meta.head_dim + 1) * 4 + H * n * meta.head_dim * 4  # [v|k|j], output
        bins = min(HEAD_OVERVIEW_BINS, n)
        reductions = REDUCTION_ARRAYS * L * H * n * 4 + workers * 2 * H * n * 8
        memory = activations + PENDING_LAYERS * layer + block + values + reductions + L * H * bins * bins * 2
        disk = L * layer + REDUCTION_ARRAYS * L * H * n * 4 + L * H * (bins * bins + 32 * 32) * 2
    else:
        block = 8 * H * ROW_BLOCK_TRIL * n * 4  # scores, weights, packing and pooling temporaries (measured ~6)
        memory = activations + PENDING_LAYERS * layer + block
        disk = L * layer
    return Estimate(layout=layout, n_tokens=n, memory_bytes=int(memory), disk_bytes=int(disk))


def _gpu_estimate(meta: ModelMeta, n: int, layout: str, activations: int, layer: int) -> Estimate:
    """GPU memory of the recorded pass: one layer on the device at a time (module docstring)."""
    L, H = meta.n_layers, meta.n_heads
    if layout == "qk":
        from capture.engine.longctx import GPU_ROW_BLOCK
        from core.qk import HEAD_OVERVIEW_BINS

        block = 3 * (H // meta.n_kv_heads) * GPU_ROW_BLOCK * n * 4  # one group's scores, weights and a temporary
        reductions = REDUCTION_ARRAYS * H * n * 4 + 2 * H * n * 8  # one layer's, float64 column sums
        memory = activations + layer + block + reductions + H * HEAD_OVERVIEW_BINS**2 * 4
        disk = L * layer + REDUCTION_ARRAYS * L * H * n * 4 + L * H * (min(HEAD_OVERVIEW_BINS, n) ** 2 + 32 * 32) * 2
    else:
        memory = activations + layer + 8 * H * ROW_BLOCK_TRIL * n * 4
        disk = L * layer
    return Estimate(layout=layout, n_tokens=n, memory_bytes=int(memory), disk_bytes=int(disk))


def max_tokens(meta: ModelMeta, layout: str, memory_budget: int, disk_budget: int, upper: int,
               device: str = "cpu", dtype_bytes: int = 4) -> int:
    """The longest input (<= upper) whose capture in `layout` fits both budgets (0 if none does)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        e = estimate(meta, mid, layout, device=device, dtype_bytes=dtype_bytes)
        if e.memory_bytes <= memory_budget and e.disk_bytes <= disk_budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def available_bytes(device: str = "cpu") -> int:
    """Memory a capture may use: HEADSCOPE_CAPTURE_GB, else 80 % of MemAvailable (of a GPU's free memory
    when `device` is one)."""
    configured = os.environ.get("HEADSCOPE_CAPTURE_GB")
    if configured:
        try:
            return int(float(configured) * 2**30)
        except ValueError:
            pass
    if device != "cpu":
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0] * AVAILABLE_SHARE)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * AVAILABLE_SHARE)
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * AVAILABLE_SHARE)
    except (ValueError, OSError):
        return 1 << 62


def rss_bytes() -> int:
    """This process's resident set size."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_high_water_mark() -> bool:
    """Reset this process's peak RSS (Linux: "5" to /proc/self/clear_refs); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int | None:
    """This process's peak RSS since the last reset (VmHWM), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakSampler:
    """`.peak`: the largest rise of the resident set size above its value at the start of the block.

    On Linux the kernel keeps the peak (VmHWM), with no thread: the first active block resets the
    process's high-water mark and every block reads it at its end (a 10 ms sampling thread cost ~2 % of
    a 128-token capture and could miss peaks between samples).  The mark is process-wide, so a block
    that starts while another is active does not reset it: its peak is then an upper bound (it may
    include a peak of the other block from before it started).  Where the mark cannot be reset, a
    thread samples the RSS every `interval` seconds instead.

    With `device` a GPU, `.gpu_peak` is the CUDA allocator's peak above its use at the start (the
    allocator's peak statistics are reset when the block starts)."""

    _active = 0  # blocks active in this process
    _kernel = False  # whether they read the kernel's mark (decided by the first of them)
    _active_lock = threading.Lock()

    def __init__(self, interval: float = 0.01, device: str = "cpu"):
        self.interval = interval
        self.device = device
        self.start = rss_bytes()
        self.peak = 0
        self.gpu_peak: int | None = None
        self._gpu_start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):  # wakes at once when the block ends
            self.peak = max(self.peak, rss_bytes() - self.start)

    def __enter__(self) -> "PeakSampler":
        with PeakSampler._active_lock:
            if PeakSampler._active == 0:
                PeakSampler._kernel = _reset_high_water_mark() and _high_water_mark() is not None
            kernel = PeakSampler._kernel
            PeakSampler._active += 1
        self.start = rss_bytes()
        if self.device != "cpu":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._gpu_start = torch.cuda.memory_allocated(self.device)
        if not kernel:
            self._thread = threading.Thread(target=self._sample, daemon=True, name="headscope-peak")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        high = 0 if self._thread is not None else (_high_water_mark() or 0)
        self.peak = max(self.peak, rss_bytes() - self.start, high - self.start)
        if self.device != "cpu":
            import torch

            self.gpu_peak = torch.cuda.max_memory_allocated(self.device) - self._gpu_start
        with PeakSampler._active_lock:
            PeakSampler._active -= 1

    def report(self) -> dict[str, float]:
        """The measured peaks for Capture.timings: "peak_mb" (host), and "gpu_peak_mb" on a GPU."""
        found = {"peak_mb": round(self.peak / 2**20, 1)}
        if self.gpu_peak is not None:
            found["gpu_peak_mb"] = round(self.gpu_peak / 2**20, 1)
        return found


__all__ = ["Estimate", "PeakSampler", "available_bytes", "estimate", "map_bytes", "max_tokens", "rss_bytes"]
