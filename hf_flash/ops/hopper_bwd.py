"""The backward on Hopper (sm90) at head dims 64 and 128: dQ from the dK/dV program, warp-specialized, in Gluon.

The portable backward (``backward.py``) runs two kernels, dQ and dK/dV, so it computes ``Q K^T`` and ``dO V^T``
twice: seven products where the gradients need five. Both already run near the tensor cores' practical rate,
so the split itself caps it (DESIGN, "The backward"). This kernel computes all three gradients in the dK/dV
program, as FlashAttention-2 and -3 do: ``dQ = dS K`` per step, its fp32 part added into a zeroed fp32 buffer
while the consumers go on (D128: TMA reductions; D64: the loader's atomics; ``_hopper_bwd_kernel``). The additions'
order varies run to run, so the call is not bitwise reproducible: flash-attn's contract for ``deterministic=False``,
which is the default; ``deterministic=True`` keeps the portable backward.

It takes what it was measured on (:func:`takes`): dense or packed (varlen, self-attention: one ``cu_seqlens``, or
two equal) batches on an sm90 GPU, head dim 64 or 128, ``Lq == Lk`` (any length: TMA zero-fills past it,
``_hopper_bwd_kernel``) and at least :data:`MIN_SEQLEN` of its head dim and causality (varlen: the mean length),
causal or not, no window, softcap, dropout or sinks, fp16/bf16, Q/dO/K/V readable by TMA (heads side by side or
head-major, as in ``hopper_fwd``), the LSE of ``function._new_lse``. It is on by default since the GPU suite passed
with it (LOG, eighth session); ``HF_FLASH_HOPPER_BWD=0`` turns it off.
"""

from __future__ import annotations

import torch

from hf_flash.ops.backward import flash_delta
from hf_flash.ops.common import tma_layout
from hf_flash.ops.hopper_fwd import (lengths_in_words, on_sm90, plain_dense, plain_varlen, switched_on,
                                     unavailable_reason)

# of Q, dO, LSE and delta: 198 KB (D128) and 199 KB (D64) of shared memory with K, V, dS^T and the dQ parts
# (3 do not fit)
STAGES = 2
# (head dim, causal) -> the shortest L it was measured faster than the portable backward at, by >= 1.03x at
# that L and every longer one measured (benchmarks/hopper_bwd_speed.py --rounds 3 on an H100, thirteenth session:
# D128 1.12-1.17x from 1k, causal 1.06-1.22x from 1.5k (1.01x at 1k); D64 1.08-1.17x from 3k (1.05x, 0.97-1.07,
# at 2k), causal 1.11x at 8k (0.98-1.04x at 2k-4k); docs/DESIGN.md)
MIN_SEQLEN = {(128, False): 1024, (128, True): 1536, (64, False): 3072, (64, True): 8192}
ENV = "HF_FLASH_HOPPER_BWD"
DEFAULT = "1"

if unavailable_reason() is None:
    from hf_flash.ops._hopper_bwd_kernel import dq_buffer as _dq_buffer
    from hf_flash.ops._hopper_bwd_kernel import launch as _launch
    from hf_flash.ops._hopper_bwd_kernel import padded_stats as _padded_stats
else:
    _launch = _dq_buffer = _padded_stats = None


def enabled() -> bool:
    return switched_on(ENV, DEFAULT)


def coverage() -> str:
    """The head dims and lengths it takes, in words (``python -m hf_flash``)."""
    return lengths_in_words(MIN_SEQLEN)


def fits(q, k, v, do, lse, cu_seqlens, window, softcap, dropout_p, sinks, deterministic) -> bool:
    """The calls the kernel computes and was measured faster on (module docstring), whatever the device; arguments
    as ``function._bwd_impl`` has them (``do``: the output's gradient; ``cu_seqlens``: (q's, k's) of a varlen
    call, else None): ``hopper_fwd.plain_dense`` or :func:`_plain_varlen`, not ``deterministic``, a (head dim,
    causal) of :data:`MIN_SEQLEN` and ``L`` (varlen: the mean length) from its bound, dO as Q, the LSE as
    ``function._new_lse`` makes it."""
    min_seqlen = MIN_SEQLEN.get((q.shape[-1], window[1] == 0))
    if deterministic or min_seqlen is None:
        return False
    if cu_seqlens is not None:
        return _plain_varlen(q, k, v, do, lse, cu_seqlens, min_seqlen, window, softcap, dropout_p, sinks)
    seqlen = q.shape[1]
    if seqlen < min_seqlen:
        return False
    # the LSE (and delta, made like it) read as [B, H, L] through TMA: rows evenly spaced, 16-byte aligned
    if lse.stride(2) != 1 or lse.stride(0) != lse.shape[1] * lse.stride(1) or lse.stride(1) % 4 or lse.data_ptr() % 16:
        return False
    return (do.dtype == q.dtype and plain_dense(q, k, v, window, softcap, dropout_p, sinks)
            and tma_layout(do, False) is not None)  # fmt: skip


def _plain_varlen(q, k, v, do, lse, cu_seqlens, min_seqlen, window, softcap, dropout_p, sinks) -> bool:
    """A varlen call the kernel takes: ``hopper_fwd.plain_varlen``, dO as Q, the LSE ``[H, total]`` rows 16-byte
    aligned (read through TMA)."""
    if not plain_varlen(q, k, v, cu_seqlens, min_seqlen, window, softcap, dropout_p, sinks):
        return False
    if do.dtype != q.dtype or lse.stride(1) != 1 or lse.stride(0) % 4 or lse.data_ptr() % 16:
        return False
    return tma_layout(do, True) is not None


def takes(q, k, v, do, lse, cu_seqlens, window, softcap, dropout_p, sinks, deterministic) -> bool:
    """Whether this backward runs the call: :func:`fits`, on an sm90 GPU, the kernel available and not turned
    off. Runs on every backward call: the cheap checks come first."""
    if not fits(q, k, v, do, lse, cu_seqlens, window, softcap, dropout_p, sinks, deterministic):
        return False
    return _launch is not None and enabled() and q.device.type == "cuda" and on_sm90(q.device)


def flash_bwd_hopper(do, q, k, v, out, lse, dq, dk, dv, softmax_scale: float, causal: bool, cu_seqlens=None,
                     max_seqlen: int | None = None) -> None:
    """Launch the backward (delta = rowsum(dO * O), then the kernel) for a call that :func:`takes`. q/do/out/dq
    ``[B, L, H, D]``, k/v/dk/dv ``[B, L, Hk, D]``; lse fp32 ``[B, H, L]``; dq, dk, dv written (dk and dv
    TMA-readable, as ``torch.empty_like`` makes them; dq any). Varlen: ``cu_seqlens`` (int32 ``[B + 1]``, Q's and
    K/V's), ``max_seqlen``, the tensors packed ``[total, H, D]`` and the LSE ``[H, total]``."""
    if (q.shape[-1], causal) not in MIN_SEQLEN:
        raise ValueError(f"the Hopper backward takes head dims {sorted({d for d, _ in MIN_SEQLEN})}, got {q.shape[-1]}")
    varlen = cu_seqlens is not None
    if tma_layout(dk, varlen) is None or tma_layout(dv, varlen) is None:
        raise ValueError("dk and dv must be TMA-readable (torch.empty_like(k)) for the Hopper backward")
    delta = flash_delta(out, do, lse, cu_seqlens, max_seqlen if varlen else q.shape[1])
    if varlen:  # the packed tensors as batch 1, as the kernel reads them; the LSE and delta per sequence
        q, k, v, do, dk, dv = (t.unsqueeze(0) for t in (q, k, v, do, dk, dv))
        lse, delta = _padded_stats(lse, delta, cu_seqlens, max_seqlen)
    dq_acc = _dq_buffer(q, varlen)
    _launch(q=q, k=k, v=v, do=do, dk=dk, dv=dv, lse=lse, delta=delta, dq_acc=dq_acc, softmax_scale=softmax_scale,
            causal=causal, stages=STAGES, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    dq.copy_(dq_acc[0, : q.shape[1]] if varlen else dq_acc[:, : q.shape[1]])
