"""The fused C++ kernels of HeadScope's recorded passes (`fused.cpp`), built once with torch's cpp_extension.

- `record_layer`: one plain layer of the stored-maps pass (capture.engine.recorder.Recorder.record): scores,
  float32 softmax, fp16 maps (packed lower triangle or full), block-max thumbnails and the output.
- `attend_rows`: one KV group's block of query rows of the long-context pass (capture.engine.longctx):
  scores, softmax, output and the one-pass reductions.

In torch ops each step reads the block's [rows, keys] weights from memory again; the kernels do the
row-wise steps while a row is in the core's cache and leave the matrix products to MKL, which brings
the long-context pass close to SDPA's time and the stored-maps pass under eager's.

`load()` returns the compiled module, or None when it cannot be built (no C++ compiler): then the
recorders use their torch ops, which give the same numbers more slowly.  `make` builds it during the
set-up (`python -m capture.engine.fused`), so the first capture does not wait for the compiler; torch keeps
the build under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and rebuilds it when the
source changes.  HEADSCOPE_FUSED=0 turns the kernels off.

A build is guarded by a lock of our own (flock: released when its holder dies) around torch's: torch's
build lock is a plain file that a process killed mid-build (Ctrl-C during the first capture) leaves
behind, and every later process would wait for it for ever.  Under our lock, a torch lock file can only
be such a leftover, and is removed.  Each checkout builds under its own name (a hash of its path), so two
checkouts on one machine do not rebuild each other's module at every start.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("fused.cpp")
NAME = "headscope_fused_" + hashlib.sha1(str(SOURCE.resolve()).encode()).hexdigest()[:8]  # one build per checkout
# -ffast-math at compile time only (vectorised expf from glibc's libmvec); linking with it would
# add crtfastmath.o, which flushes denormals to zero for the whole process
# -fopenmp: at::parallel_for (ATen/Parallel.h, inline) is only parallel where _OPENMP is defined; the
# module then needs libgomp.so.1, which resolves to the copy torch has already loaded (same soname)
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
WHOLE_LAYER_BYTES = 4 * 2**20  # record_layer: a layer with float32 scores up to this size goes in two bands of rows, one per thread
RECORD_TILE = 128  # record_layer: query rows per head and tile, rounded up to whole thumbnail bins (512 tokens: 32 rows 9.5 ms a layer, 64 5.1, 128 4.6)
QK_TILE = 128  # attend_rows: query rows per head and tile (measured at 8,192 tokens: 16 rows 0.74 s a layer, 64 0.64 s, 128 0.61 s)

_lock = threading.Lock()
_state: dict = {}
log = logging.getLogger(__name__)


def load(verbose: bool = False):
    """The compiled kernel module, or None if it cannot be built (the reason is in `problem()`)."""
    with _lock:
        if "module" not in _state:
            if os.environ.get("HEADSCOPE_FUSED", "1") == "0":
                _state.update(module=None, problem="disabled by HEADSCOPE_FUSED=0")
            else:
                try:
                    from torch.utils.cpp_extension import _get_build_directory
                    from torch.utils.cpp_extension import load as build

                    folder = Path(_get_build_directory(NAME, verbose=False))
                    with open(folder / "headscope.flock", "a+") as guard:
                        fcntl.flock(guard, fcntl.LOCK_EX)  # one HeadScope process builds at a time
                        (folder / "lock").unlink(missing_ok=True)  # torch's lock, left by a build that died
                        module = build(name=NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS,
                                       extra_ldflags=LDFLAGS, verbose=verbose)
                    _state.update(module=module, problem=None)
                except Exception as exc:  # no compiler, no ninja, a failed build: fall back to torch ops
                    _state.update(module=None, problem=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
                    log.warning("The fused capture kernels could not be built (%s); using torch ops.",
                                _state["problem"])
        return _state["module"]


def problem() -> str | None:
    """Why `load()` returned None (None if it has not been tried or it worked)."""
    return _state.get("problem")


def main() -> int:
    """Build the kernel now (make's set-up step); exit status 0 either way, with a line saying which."""
    if load(verbose="-v" in sys.argv) is None:
        print(f"capture.engine.fused: not built ({problem()}); captures will use the slower torch ops")
    else:
        print("capture.engine.fused: fused capture kernels ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
