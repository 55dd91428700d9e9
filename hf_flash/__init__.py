"""hf_flash: FlashAttention in Triton for Hugging Face Transformers.

``import hf_flash`` makes ``attn_implementation="hf_flash"`` available to Transformers (when it is
installed) and exports flash-attn 2's functions, so ``from hf_flash import flash_attn_func`` is a
drop-in replacement for ``from flash_attn import flash_attn_func``.
"""

import importlib.util

from hf_flash.ops import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    kernels_unavailable_reason,
)

from hf_flash.info import info

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "info",
    "kernels_unavailable_reason",
    "register",
]


def register() -> bool:
    """Register ``"hf_flash"`` with Transformers' attention and mask interfaces (idempotent).
    Returns False when Transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return False
    from hf_flash.integrations.transformers import register as _register

    _register()
    return True


register()
