"""hf_flash's Triton attention kernels with flash-attn 2's API (no Transformers import here)."""

from hf_flash.ops.config import kernels_unavailable_reason
from hf_flash.ops.function import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from hf_flash.ops.startup import start as _start_up

_start_up()  # Triton's per-process hashing, in the background while the caller loads its model (startup.py)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "kernels_unavailable_reason",
]
