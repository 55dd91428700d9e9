"""When the Triton kernels cannot run, and what runs instead.

The kernels need fp16/bf16 tensors on a CUDA GPU of compute capability >= 7.5 (or CPU tensors under
``TRITON_INTERPRET=1``) and a head dim <= 256. Anywhere else, :func:`sdpa_flash_attn_func` and
:func:`sdpa_flash_attn_varlen_func` compute the same thing with the same arguments (flash-attn's
layouts and masking rules, see :mod:`hf_flash.ops.reference`) through PyTorch's
``scaled_dot_product_attention``, so a caller only swaps the function, never its plumbing. SDPA has no
softcap and no attention sinks: calls with either form the scores explicitly (PyTorch's math, in fp32),
with the sink as an extra score column, so that no argument is silently dropped.

Every fallback is announced by :func:`report_fallback`: one :class:`FallbackWarning` per distinct
reason per process, or a :class:`FallbackError` when ``HF_FLASH_STRICT=1`` is set in the environment
(for users who want to be sure the kernels run). :func:`warn_once` is the once-per-process machinery;
:mod:`hf_flash.dispatch` announces its per-chip choices through it too (never raising: they are choices).

Nothing here imports Transformers.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from hf_flash.ops import visibility
from hf_flash.ops.config import MAX_HEAD_DIM, kernels_unavailable_reason

__all__ = [
    "FallbackError",
    "FallbackWarning",
    "kernel_unavailable_reason",
    "report_fallback",
    "reset_warnings",
    "sdpa_flash_attn_func",
    "sdpa_flash_attn_varlen_func",
    "strict_mode",
    "warn_once",
]


class FallbackWarning(UserWarning):
    """hf_flash ran a call through PyTorch instead of its kernels (the message says why)."""


class FallbackError(RuntimeError):
    """Raised instead of falling back when ``HF_FLASH_STRICT=1``."""


_warned: set[str] = set()


def strict_mode() -> bool:
    """``HF_FLASH_STRICT`` set to anything but empty / "0": fallbacks raise."""
    return os.environ.get("HF_FLASH_STRICT", "0") not in ("", "0")


def warn_once(key: str, message: str, category: type[Warning], stacklevel: int = 4) -> None:
    """Warn ``message`` the first time ``key`` is seen in this process (:func:`reset_warnings` forgets)."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)


def report_fallback(reason: str, instead: str = "PyTorch SDPA") -> None:
    """Warn once per distinct ``reason`` that a call runs through ``instead``; raise in strict mode."""
    message = f"hf_flash: this attention call runs through {instead} instead of the hf_flash kernels: {reason}"
    if strict_mode():
        raise FallbackError(message + " (raised because HF_FLASH_STRICT=1)")
    warn_once(reason, message + ". Set HF_FLASH_STRICT=1 to make this an error.", FallbackWarning)


def reset_warnings() -> None:
    """Forget which reasons were already reported (tests use it to see a warning again)."""
    _warned.clear()


def kernel_unavailable_reason(q: torch.Tensor, v: torch.Tensor | None = None) -> str | None:
    """None when the kernels can take ``q`` (and ``v``), else a one-line reason.

    Args:
        q: ``[..., H, D]``; only its device, dtype and head dim matter. v: the same for values.
    """
    reason = kernels_unavailable_reason(q.device, q.dtype)
    if reason is not None:
        return reason
    head_dim = max(q.shape[-1], v.shape[-1] if v is not None else 0)
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} is larger than {MAX_HEAD_DIM}, the largest the kernels support"
    return None


# ----------------------------------------------------------------------------------------------
# Masks: which key each query may see (hf_flash.ops.visibility), in SDPA's [B, 1, Lq, Lk] layout
# ----------------------------------------------------------------------------------------------


def dense_visibility(
    batch: int, seqlen_q: int, seqlen_k: int, causal: bool, window_size, device
) -> torch.Tensor | None:
    """Bool ``[B, 1, Lq, Lk]`` for a plain batch (every row one sequence); None when nothing is hidden."""
    visible = visibility.visible_mask(seqlen_q, seqlen_k, causal, window_size, device)
    return None if visible is None else visible.expand(batch, 1, seqlen_q, seqlen_k)


def varlen_visibility(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, causal: bool, window_size):
    """Bool ``[1, 1, total_q, total_k]`` for packed sequences (block diagonal)."""
    return visibility.varlen_visible_mask(cu_seqlens_q, cu_seqlens_k, total_q, total_k, causal, window_size)[None, None]


# ----------------------------------------------------------------------------------------------
# Attention through PyTorch
# ----------------------------------------------------------------------------------------------


def _sdpa_backends(device: torch.device) -> list:
    """SDPA backends that exist on this chip. MATH always runs, so SDPA can never answer
    "No available kernel" (as it does on a T4 when only the flash backend is enabled)."""
    from torch.nn.attention import SDPBackend

    backends = []
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (8, 0):
            backends.append(SDPBackend.FLASH_ATTENTION)
        backends.append(SDPBackend.EFFICIENT_ATTENTION)
    backends.append(SDPBackend.MATH)
    return backends


def _sdpa(q, k, v, visible, is_causal: bool, scale: float, dropout_p: float, backends=None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on ``[B, H, L, D]`` inside a backend choice that cannot fail,
    or inside ``backends`` when the caller has checked that they take the call."""
    if torch.compiler.is_compiling():
        # the backend context manager is a graph break; under compile SDPA's own choice stands
        return F.scaled_dot_product_attention(q, k, v, visible, dropout_p, is_causal, scale=scale)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends or _sdpa_backends(q.device)):
        return F.scaled_dot_product_attention(q, k, v, visible, dropout_p, is_causal, scale=scale)


def attention_with_mask(
    q, k, v, visible, softmax_scale=None, dropout_p=0.0, softcap=0.0, is_causal=False, backends=None, sinks=None
):
    """Attention on the flash-attn layout with an explicit visibility mask.

    Args:
        q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, Hk, D]`` (GQA: ``H % Hk == 0``).
        visible: bool ``[B, 1, Lq, Lk]`` or None (everything visible, or top-left causal when ``is_causal``).
        backends: SDPA backends to restrict the call to (default: every one this chip has, MATH last).
        sinks: ``[H]`` attention-sink logits (any float dtype) or None: one more softmax term per row,
            with no value (SDPA cannot: the scores are formed explicitly).
    Returns:
        ``[B, Lq, H, D]`` in q's dtype; rows that see no key are 0, as in the kernels.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    has_key = None
    if visible is not None:
        # A row that sees no key would be softmax over nothing (NaN). Let it see everything, then zero it.
        has_key = visible.any(dim=-1, keepdim=True)
        visible = visible | ~has_key
    if softcap > 0 or sinks is not None:
        # SDPA has no softcap and no sinks: the scores are formed explicitly (in fp32, like the eager paths
        # of Gemma 2 and gpt-oss)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        elif is_causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        if sinks is not None:
            # the sink as a last score column, dropped after the softmax (it has no value)
            column = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
        out = torch.matmul(probs.to(v.dtype), v)
    else:
        out = _sdpa(q, k, v, visible, is_causal and visible is None, scale, dropout_p, backends)
    if has_key is not None:
        out = out * has_key
    return out.transpose(1, 2)


def sdpa_flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, backends=None,
    sinks=None, **unused,
):  # fmt: skip
    """``hf_flash.flash_attn_func`` through PyTorch: q ``[B, Lq, H, D]``, k/v ``[B, Lk, Hk, D]`` -> ``[B, Lq, H, D]``.

    Causal is bottom-right aligned when ``Lq != Lk`` (query i sees keys ``j <= i + Lk - Lq``).
    ``backends``, ``sinks [H]``: as in :func:`attention_with_mask`. Extra flash-attn arguments
    (``deterministic``, ...) are accepted and have no effect here.
    """
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    if causal and seqlen_q == seqlen_k and tuple(window_size) == (-1, -1):
        visible = None  # SDPA's is_causal is top-left aligned, which is the same when Lq == Lk
    else:
        visible = dense_visibility(batch, seqlen_q, seqlen_k, causal, tuple(window_size), q.device)
    return attention_with_mask(q, k, v, visible, softmax_scale, dropout_p, softcap, causal, backends, sinks)


def sdpa_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    sinks=None,
    **unused,
):
    """``hf_flash.flash_attn_varlen_func`` through PyTorch.

    q ``[total_q, H, D]``, k/v ``[total_k, Hk, D]``, cu_seqlens_* int32 ``[S + 1]`` -> ``[total_q, H, D]``.
    One SDPA call over all tokens with a block-diagonal mask (``total_q x total_k`` bools): memory
    grows with the square of the packed length, which is acceptable for a fallback and needs no sync.
    """
    visible = varlen_visibility(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], causal, tuple(window_size))
    out = attention_with_mask(q[None], k[None], v[None], visible, softmax_scale, dropout_p, softcap, sinks=sinks)
    return out[0]
