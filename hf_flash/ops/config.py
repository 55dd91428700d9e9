"""Where the kernels can run, and with which tile sizes.

The kernels run on CUDA GPUs through Triton, or on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before ``hf_flash`` was imported (slow: for tests and debugging).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_unavailable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when the kernels can run on tensors of ``device``/``dtype``, else a one-line reason."""
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by the hf_flash kernels: torch.float16 and torch.bfloat16 are"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7 or (major, minor) < (7, 5):
            return f"GPU compute capability {major}.{minor} is below 7.5 (T4), the oldest the kernels target"
        if dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 needs compute capability 8.0 or newer, this GPU is {major}.{minor}"
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (the kernels need a CUDA GPU)"
    return f"device type {device.type!r} is not supported: the kernels run on CUDA GPUs"


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


def block_d_for(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; the padding columns are masked on load and store
    return max(16, triton.next_power_of_2(head_dim))


# Tile configs (block_m, block_n, num_warps, num_stages) measured on an H100 (bf16, L = 4k, 16k tokens,
# torch 2.11 + Triton 3.6), best of a sweep per head-dim class; see README's benchmark section.
_FWD = {64: (128, 64, 8, 3), 128: (128, 128, 8, 3), 256: (64, 64, 4, 3)}
_DKDV = {64: (32, 64, 4, 3), 128: (64, 128, 8, 3), 256: (32, 64, 4, 3)}
_DQ = {64: (64, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 3)}
# the interpreter's cost grows with the tile; small tiles also exercise the block loops in CPU tests
_INTERPRETER = (16, 16, 4, 1)


def _pick(table: dict, head_dim: int, device: torch.device) -> KernelConfig:
    block_d = block_d_for(head_dim)
    if device.type != "cuda":
        return KernelConfig(*_INTERPRETER[:2], block_d, *_INTERPRETER[2:])
    head_class = min(c for c in table if c >= block_d)
    block_m, block_n, num_warps, num_stages = table[head_class]
    return KernelConfig(block_m, block_n, block_d, num_warps, num_stages)


def forward_config(head_dim: int, device: torch.device) -> KernelConfig:
    return _pick(_FWD, head_dim, device)


def backward_config(head_dim: int, device: torch.device) -> tuple[KernelConfig, KernelConfig]:
    """Configs of the two backward kernels: dK/dV (key blocks of ``block_n`` walking query blocks of
    ``block_m``) and dQ (query blocks of ``block_m`` walking key blocks of ``block_n``)."""
    return _pick(_DKDV, head_dim, device), _pick(_DQ, head_dim, device)
