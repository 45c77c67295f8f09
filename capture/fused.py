"""The fused C++ kernel of the long-context pass (`fused.cpp`), built once with torch's cpp_extension.

`capture.longctx.QKRecorder` computes, per KV group and block of query rows, scores, softmax, output
and the one-pass reductions.  In torch ops each of those reads the block's [rows, keys] weights from
memory again (about 12 MB per block at 8,192 tokens); the kernel does them one row at a time while
the row is in the core's cache (two passes over each row's visible keys), which brings the pass
close to SDPA's time.

`load()` returns the compiled module, or None when it cannot be built (no C++ compiler): then the
recorder uses the torch ops, which give the same numbers more slowly.  `make` builds it during the
set-up (`python -m capture.fused`), so the first long capture does not wait for the compiler;
torch keeps the build under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and rebuilds it
when the source changes.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("fused.cpp")
# -ffast-math at compile time only (vectorised expf from glibc's libmvec); linking with it would
# add crtfastmath.o, which flushes denormals to zero for the whole process
CFLAGS = ["-O3", "-march=native", "-ffast-math"]
WHOLE_LAYER_BYTES = 4 * 2**20  # record_layer: a layer with float32 scores up to this size in one GEMM each way
RECORD_TILE = 64  # query rows per head and tile in record_layer (rounded up to whole thumbnail bins)
TILE = 128  # query rows per head and tile (measured at 8,192 tokens: 16 rows 0.74 s a layer, 64 0.64 s, 128 0.61 s)

_lock = threading.Lock()
_state: dict = {}
log = logging.getLogger(__name__)


def load(verbose: bool = False):
    """The compiled kernel module, or None if it cannot be built (the reason is in `problem()`)."""
    with _lock:
        if "module" not in _state:
            if os.environ.get("HEADSCOPE_QK_KERNEL", "1") == "0":
                _state.update(module=None, problem="disabled by HEADSCOPE_QK_KERNEL=0")
            else:
                try:
                    from torch.utils.cpp_extension import load as build

                    module = build(name="headscope_fused", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                                   verbose=verbose)
                    _state.update(module=module, problem=None)
                except Exception as exc:  # no compiler, no ninja, a failed build: fall back to torch ops
                    _state.update(module=None, problem=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
                    log.warning("The fused long-context kernel could not be built (%s); using torch ops.",
                                _state["problem"])
        return _state["module"]


def problem() -> str | None:
    """Why `load()` returned None (None if it has not been tried or it worked)."""
    return _state.get("problem")


def main() -> int:
    """Build the kernel now (make's set-up step); exit status 0 either way, with a line saying which."""
    if load(verbose="-v" in sys.argv) is None:
        print(f"capture.fused: not built ({problem()}); long captures will use the slower torch ops")
    else:
        print("capture.fused: fused long-context kernel ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
