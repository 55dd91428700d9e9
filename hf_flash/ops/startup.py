"""Triton's once-per-process start-up work, begun in the background when hf_flash is imported.

The first kernel a process loads, even straight from Triton's disk cache, first computes ``triton_key()``:
a SHA-256 over Triton's compiler sources and its ``libtriton`` shared library (423 ms on the dev machine,
Triton 3.9), plus ``ptxas --version`` for the backend's hash. On an H100 host the first varlen forward +
backward of a process took 482-492 ms with every kernel in the disk cache, a later call 7 ms
(``benchmarks/first_call.py``), and a LoRA run's first step paid it. Both results are cached for the
process (``functools.lru_cache``) and hashing releases the GIL, so a daemon thread started at import
computes them while the caller loads its model and data. A kernel launched before the thread is done
computes the key itself (the cache does not lock): correct, only not sooner.
"""

from __future__ import annotations

import threading

import torch

from hf_flash.ops.config import interpreter_enabled

__all__ = ["start", "warm"]


def warm() -> None:
    """Compute and cache Triton's process-wide keys (best effort: a failure here shows again, with its real
    message, when the first kernel compiles)."""
    try:
        from triton.runtime.cache import triton_key

        triton_key()
    except Exception:  # noqa: BLE001  (an older Triton keeps it elsewhere; the first compile computes it then)
        pass
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        get_ptxas_version()
    except Exception:  # noqa: BLE001  (no CUDA backend or no ptxas: nothing to warm)
        pass


def start() -> threading.Thread | None:
    """Run :func:`warm` in a daemon thread where kernels will be compiled (a CUDA GPU, no interpreter)."""
    if interpreter_enabled() or not torch.cuda.is_available():
        return None
    thread = threading.Thread(target=warm, name="hf_flash-triton-start-up", daemon=True)
    thread.start()
    return thread
