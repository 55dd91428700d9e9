"""Custom ops, autograd and the public flash-attn 2 style functions.

Layers: Triton kernels (``forward.py``, ``backward.py``) <- torch custom ops ``hf_flash::fwd`` /
``hf_flash::bwd`` (with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them)
<- autograd registered on ``hf_flash::fwd`` <- ``flash_attn_func`` and friends, which validate input.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from hf_flash.ops import checks, hopper_bwd, hopper_fwd
from hf_flash.ops.backward import flash_bwd
from hf_flash.ops.config import backward_config, explain_launch_error, forward_config
from hf_flash.ops.forward import flash_fwd

# Atomic dQ (inside the dK/dV kernel) pays off only for large head dims (H100 sweep, bf16: D=256 backward
# 93 -> 159 TFLOP/s), where the separate dQ kernel's register pressure is worst; at D <= 128 the dQ kernel
# was as fast or faster (D=64 causal L=4k: 286 vs 263), so those always take the deterministic path.
# Module-level so tests can lower it to exercise the atomic path on small shapes.
ATOMIC_DQ_MIN_HEAD_DIM = 129

_BATCH_LAYOUT = "[batch, seqlen, nheads, headdim]"
_VARLEN_LAYOUT = "[total_tokens, nheads, headdim]"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # the kernels take any row/head/batch strides (e.g. views of a fused QKV) but need unit stride in D
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_lse(q: torch.Tensor, varlen: bool, batch: int) -> torch.Tensor:
    """An empty fp32 LSE in flash-attn's layouts, ``[B, H, Lq]`` or varlen ``[H, total_q]``, as a view of a buffer
    whose rows are padded to a multiple of 16 elements. Its strides are then multiples of 16 (never 1) whatever
    the length: one class of Triton's specialization (no new compile for a new length), and the kernels keep
    the alignment fact. Without it (strides left out of the specialization), the D128 causal dK/dV kernel
    spilled in its unmasked loop: 712 instructions with 39 LDL + 31 STL per iteration against 544 and none
    (benchmarks/loop_spills.py, Triton 3.6), and its backward ran at 230 instead of 369 TFLOP/s (H100, L 4k)."""
    shape = (q.shape[1], q.shape[0]) if varlen else (batch, q.shape[2], q.shape[1])
    rows = -(-shape[-1] // 16) * 16
    return q.new_empty((*shape[:-1], rows), dtype=torch.float32)[..., : shape[-1]]


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              window_left, window_right, softcap, dropout_p, deterministic, sinks):
    """Returns (out like q, lse fp32, rng_state: int64 [1] on the CPU, the dropout seed or 0).
    ``deterministic`` is only recorded for the backward. ``sinks``: fp32 ``[H]`` contiguous, or None;
    the LSE then includes the sink."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    out = torch.empty_like(q)
    lse = _new_lse(q, varlen, batch)
    # the seed comes from torch's default generator, so torch.manual_seed makes dropout reproducible
    seed = int(torch.randint(0, 2**30, (1,)).item()) if dropout_p > 0 else 0
    window = (window_left, window_right)
    cu_seqlens = (cu_seqlens_q, cu_seqlens_k) if varlen else None
    if out.numel() > 0 and hopper_fwd.takes(q, k, v, cu_seqlens, window, softcap, dropout_p, sinks):
        hopper_fwd.flash_fwd_hopper(q, k, v, out, lse, softmax_scale, causal=window_right == 0,
                                    cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen_q)
    elif out.numel() > 0:
        config = forward_config(q.shape[-1], q.device, max_seqlen_q)
        try:  # free unless a launch fails; the first launch of a call is always this one
            flash_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                      window, softcap, dropout_p, seed, config, sinks)
        except (RuntimeError, ValueError) as exc:
            explain_launch_error(exc, q.device)
            raise
    return out, lse, torch.tensor([seed], dtype=torch.int64)


@torch.library.custom_op("hf_flash::fwd", mutates_args=(), device_types=None)
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: int, window_right: int, softcap: float, dropout_p: float, deterministic: bool,
    sinks: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_fwd_impl` as a custom op, the form ``torch.compile`` traces."""
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     window_left, window_right, softcap, dropout_p, deterministic, sinks)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              window_left, window_right, softcap, dropout_p, deterministic, sinks):
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    lse = _new_lse(q, varlen, batch)
    return torch.empty_like(q), lse, torch.empty(1, dtype=torch.int64, device="cpu")


def _sink_grad(sinks, lse, delta, varlen: bool) -> torch.Tensor:
    """fp32 ``[H]``: ``dsink_h = -sum over rows of exp(sink_h - lse) * delta``. The sink is one more score
    column whose probability is ``exp(sink - lse)`` and whose dP is 0 (it has no value), so its dS is
    ``P * (0 - delta)``, summed over every row of the head. ``lse``/``delta``: ``[B, H, Lq]`` or
    ``[H, total_q]``. A plain PyTorch reduction: deterministic, and B * H * Lq elements are cheap."""
    if varlen:
        return -(torch.exp(sinks[:, None] - lse) * delta).sum(1)
    return -(torch.exp(sinks[None, :, None] - lse) * delta).sum((0, 2))


def _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              window_left, window_right, softcap, dropout_p, rng_state, deterministic, sinks):
    """Returns (dq, dk, dv, dsinks): shaped like q, k, v, and fp32 like ``sinks`` (``[0]`` without sinks:
    a custom op cannot return None)."""
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cu_seqlens = None if cu_seqlens_q is None else (cu_seqlens_q, cu_seqlens_k)
    # with no query or no key, every output row is 0, so delta and the sinks' gradient are 0
    dsinks = torch.zeros(0 if sinks is None else sinks.shape[0], device=q.device, dtype=torch.float32)
    if k.numel() > 0 and q.numel() == 0:
        dk.zero_()
        dv.zero_()
    elif k.numel() > 0 and hopper_bwd.takes(q, k, v, dout, lse, cu_seqlens, (window_left, window_right), softcap,
                                            dropout_p, sinks, deterministic):
        hopper_bwd.flash_bwd_hopper(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal=window_right == 0,
                                    cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen_q)
    elif k.numel() > 0:
        config_dkdv, config_dq = backward_config(q.shape[-1], q.device, cu_seqlens_q is not None)
        deterministic = deterministic or q.shape[-1] < ATOMIC_DQ_MIN_HEAD_DIM
        delta = flash_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, softmax_scale, (window_left, window_right), softcap, dropout_p,
                          int(rng_state[0]), config_dkdv, config_dq, deterministic)
        if sinks is not None:
            dsinks = _sink_grad(sinks, lse, delta, cu_seqlens_q is not None)
    else:
        dq.zero_()
    return dq, dk, dv, dsinks


@torch.library.custom_op("hf_flash::bwd", mutates_args=(), device_types=None)
def _bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: int, window_right: int, softcap: float, dropout_p: float, rng_state: torch.Tensor,
    deterministic: bool, sinks: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_bwd_impl` as a custom op."""
    return _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, window_left, window_right, softcap, dropout_p, rng_state, deterministic, sinks)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, *args):
    sinks = args[-1]
    dsinks = q.new_empty(0 if sinks is None else sinks.shape[0], dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


# the fwd op's arguments after (q, k, v), in order
_FWD_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "window_left",
             "window_right", "softcap", "dropout_p", "deterministic", "sinks")
_TENSOR_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "sinks")  # saved with save_for_backward, the rest in ctx.args


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse, rng_state = output
    args = dict(zip(_FWD_ARGS, rest))
    ctx.save_for_backward(q, k, v, out, lse, rng_state, *(args.pop(name) for name in _TENSOR_ARGS))
    ctx.args = args
    ctx.mark_non_differentiable(lse, rng_state)


def _backward(ctx, dout, dlse, drng, bwd=_bwd_op):
    q, k, v, out, lse, rng_state, cu_q, cu_k, sinks = ctx.saved_tensors
    a = ctx.args
    dq, dk, dv, dsinks = bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"], a["softmax_scale"],
        a["window_left"], a["window_right"], a["softcap"], a["dropout_p"], rng_state, a["deterministic"], sinks,
    )
    # one gradient per fwd input: q, k, v, the ten options of _FWD_ARGS before sinks, sinks
    return dq, dk, dv, *([None] * (len(_FWD_ARGS) - 1)), (None if sinks is None else dsinks)


torch.library.register_autograd("hf_flash::fwd", _backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward outside ``torch.compile``, without the custom-op dispatcher. That
    dispatch costs hundreds of microseconds of host time per call (argument normalisation, autograd
    wrapping; measured with ``benchmarks/launch_overhead.py``), more than the kernel itself takes on
    short sequences, so eager calls that need a gradient come here, calls that need none go to
    :func:`_fwd_impl` directly (another ~20 µs of host time saved), and only traced calls use the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, *args):
        output = _fwd_impl(q, k, v, *args)
        _setup_context(ctx, (q, k, v, *args), output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse, drng):
        return _backward(ctx, dout, dlse, drng, bwd=_bwd_impl)


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
               causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks):
    """Shared tail of the public functions: options, then the op. Returns out or (out, lse, None)."""
    left, right = checks.check_options(dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    if sinks is not None:
        # computed in fp32 whatever the parameter's dtype; autograd casts the gradient back
        sinks = sinks.float().contiguous()
    if causal:
        right = 0
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if checks.is_compiling():
        forward = _fwd_op
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks)):
        forward = _EagerAttention.apply
    else:
        forward = _fwd_impl  # nothing to differentiate (inference, generation): no autograd bookkeeping
    out, lse, _ = forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale),
        left, right, float(softcap), float(dropout_p), bool(deterministic), sinks,
    )
    # flash-attn returns a third tensor (the dropout-masked scores) for testing; it is never built here
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False, sinks=None,
):
    """Scaled dot-product attention, flash-attn 2's ``flash_attn_func``.

    Args:
        q: ``[B, Lq, H, D]`` fp16 or bf16, on a CUDA GPU (or the CPU under ``TRITON_INTERPRET=1``).
        k, v: ``[B, Lk, Hk, D]``, same dtype and device. ``H % Hk == 0``: MQA/GQA, query head ``h`` uses
            key/value head ``h // (H // Hk)``; K/V are read in place, never repeated.
        dropout_p: dropout on the attention probabilities (pass 0.0 in evaluation). The mask comes from
            torch's default generator (``torch.manual_seed``) and is regenerated in backward, not stored.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        causal: with ``Lq != Lk`` aligned to the bottom-right corner: query ``i`` sees keys
            ``j <= i + Lk - Lq``. E.g. Lq = 2, Lk = 5::

                1 1 1 1 0
                1 1 1 1 1

            A query row that sees no key (``Lq > Lk``) outputs 0.
        window_size: ``(left, right)``: query ``i`` sees keys ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``;
            -1 leaves that side unbounded. ``causal`` sets ``right = 0``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` (scores already scaled).
        alibi_slopes: not supported (raises NotImplementedError).
        deterministic: True makes the backward bitwise reproducible run to run: dQ comes from a kernel of its
            own. False (default) does the same below head dim 129 (``ATOMIC_DQ_MIN_HEAD_DIM``), where that
            kernel is as fast, so those head dims are reproducible either way; from 129 on it adds dQ with fp32
            atomics inside the dK/dV kernel, faster there but not bitwise reproducible. On an sm90 GPU (H100,
            H200), False takes the Hopper backward where it applies (``hopper_bwd``: dense, head dim 64 or 128,
            equal lengths from its ``MIN_SEQLEN``, a multiple of 128), which adds dQ with atomics too: faster there, not
            bitwise reproducible. The sinks' gradient is always reproducible.
        return_attn_probs: also return ``softmax_lse`` ``[B, H, Lq]`` (fp32, ``+inf`` on rows that see no key)
            and ``None`` in place of flash-attn's debugging score matrix.
        sinks: attention sinks (gpt-oss's ``s_aux``), ``[H]``, one logit per query head, any float dtype
            (computed in fp32). Each row's softmax gets one more term ``exp(sinks[h])`` in its denominator,
            with no value: ``out = sum_j exp(s_j) v_j / (exp(sinks[h]) + sum_j exp(s_j))``, ``s_j`` the
            scores after ``softmax_scale`` and ``softcap`` (the sink itself is not scaled). ``softmax_lse``
            includes it (``sinks[h]`` on rows that see no key, whose output is 0). Its gradient is returned
            when it requires grad.

    Returns:
        out ``[B, Lq, H, D]`` in q's dtype, or ``(out, softmax_lse, None)``.
    """
    checks.check_tensors(("q", "k", "v"), (q, k, v), 4, _BATCH_LAYOUT)
    checks.check_shapes(q, k, v, varlen=False)
    checks.check_sinks(sinks, q.shape[2], q.device)
    return _attention(q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, softmax_scale, causal,
                      window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None, sinks=None,
):
    """Attention over packed variable-length sequences, flash-attn 2's ``flash_attn_varlen_func``.

    Args:
        q: ``[total_q, H, D]``, the batch's query sequences concatenated; k, v: ``[total_k, Hk, D]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on q's device, cumulative sequence starts
            (``[0, len_0, len_0 + len_1, ...]``); sequence ``b`` is rows ``cu[b]:cu[b + 1]``. Empty
            sequences are allowed.
        max_seqlen_q, max_seqlen_k: Python ints, the longest sequence of each.
        Other arguments as in :func:`flash_attn_func`, applied per sequence (causal alignment uses each
        sequence's own lengths), ``sinks`` ``[H]`` included. ``block_table`` (paged KV cache) is not supported.

    Returns:
        out ``[total_q, H, D]``, or ``(out, softmax_lse [H, total_q], None)`` with ``return_attn_probs``.
    """
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV cache) is not supported by hf_flash; pass None")
    checks.check_tensors(("q", "k", "v"), (q, k, v), 3, _VARLEN_LAYOUT)
    checks.check_shapes(q, k, v, varlen=True)
    checks.check_sinks(sinks, q.shape[1], q.device)
    checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks)


def _unpack(name, packed, index_dim, count):
    if not isinstance(packed, torch.Tensor) or packed.dim() <= index_dim or packed.shape[index_dim] != count:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"{name} must have size {count} in dimension {index_dim}, got {shape}")
    return packed.unbind(index_dim)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             sinks=None):
    """:func:`flash_attn_func` with ``kv`` ``[B, Lk, 2, Hk, D]`` holding K and V."""
    k, v = _unpack("kv", kv, 2, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, sinks=sinks)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              sinks=None):
    """:func:`flash_attn_func` with ``qkv`` ``[B, L, 3, H, D]`` holding Q, K and V."""
    q, k, v = _unpack("qkv", qkv, 2, 3)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, sinks=sinks)


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, sinks=None,
):
    """:func:`flash_attn_varlen_func` with ``kv`` ``[total_k, 2, Hk, D]``."""
    k, v = _unpack("kv", kv, 1, 2)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, sinks=sinks)


def flash_attn_varlen_qkvpacked_func(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, sinks=None,
):
    """:func:`flash_attn_varlen_func` with ``qkv`` ``[total, 3, H, D]`` and one ``cu_seqlens`` for all."""
    q, k, v = _unpack("qkv", qkv, 1, 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, sinks=sinks)
