"""Backward kernels: recompute P tile by tile from Q, K and the saved log-sum-exp; never store it.

With ``P = softmax(S)`` and ``O = P V``, the gradients are::

    dV = P^T dO            dP = dO V^T
    dS = P * (dP - delta)  with delta = rowsum(dO * O)   (one number per query row)
    dQ = scale * dS K      dK = scale * dS^T Q

Two launches:

1. ``_bwd_dq``: one program per query block and head, walking over the key blocks like the forward. It
   first computes ``delta = rowsum(dO * O)`` for its rows (fp32, in the LSE's layout) and stores it.
2. ``_bwd_dkdv``: one program per key block and kv head. It holds K, V and the dK, dV accumulators on
   chip and walks over the query blocks that see the key block, for every query head of its GQA group,
   so dK/dV of a group are summed in registers: no atomics, no [B, L, H, D] temporaries. It reads the
   delta that ``_bwd_dq`` stored (same stream, so it runs after).

With atomic dQ (``deterministic=False``, large head dims) there is no dQ kernel: ``_bwd_delta`` computes
delta in a launch of its own, and the dK/dV kernel adds dQ.

Splitting dQ from dK/dV costs one extra recompute of ``Q K^T`` and ``dO V^T`` but needs no atomic
additions, so the gradients are bitwise reproducible run to run (``deterministic=True`` for free).

Causal over dense, equal, block-aligned lengths (``common.diag_in_loop``): the blocks that cross the diagonal
are not a loop of their own but the first (dK/dV) or last (dQ) steps of the main loop, which applies the
causal compare on those steps only. A separate masked loop is two or three steps long, too short for the
software pipeline to fill, and cost ~3x an unmasked step (H200: D128 causal L=1k backward 213 -> 260
TFLOP/s, 4k 330 -> 360; ``docs/DESIGN.md``). Ragged, varlen and windowed calls keep the three loops,
and so do head dims <= 64 past ``SHORT_SEQLEN`` tokens (merged, they measured 2-4% slower).

Dropout: the keep-mask is regenerated from (seed, row, column) exactly as in the forward; ``dV`` uses the
dropped and rescaled P, ``dS`` the dropped and rescaled dP (``delta`` already includes the dropout).
Softcap ``s = c * tanh(x / c)`` multiplies dS by its derivative ``1 - tanh^2``.

Attention sinks need nothing here: the saved LSE includes the sink, so the recomputed P is the softmax
with the sink's column, and that column (value 0, so dP = 0 there) adds nothing to ``delta = rowsum(dO * O)``.
The sink's own gradient, ``dsink_h = -sum_rows exp(sink_h - lse) * delta``, is a reduction over the LSE and
delta that :func:`flash_bwd` returns, done in PyTorch by the caller (no atomics: deterministic).
"""

import torch
import triton
import triton.language as tl

from hf_flash.ops.common import (
    UNSPECIALIZED,
    strides_blh as _strides,
    desc_head,
    desc_row0,
    diag_in_loop,
    dropout_keep,
    head_ptr,
    kv_segments,
    load_rows,
    lse_strides,
    option_args,
    q_segments,
    seq_bounds,
    stats_pair,
    tanh,
    tma_pair,
    visible,
)
from hf_flash.ops.config import block_d_for, cdiv


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _bwd_delta(
    Out, dO, Delta, cu_seqlens_q,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
    seqlen_q_arg, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    q_start, _, seqlen_q, _ = seq_bounds(cu_seqlens_q, cu_seqlens_q, off_b, seqlen_q_arg, seqlen_q_arg, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off_b64 = off_b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(head_ptr(Out, off_b64, stride_ob, off_h, stride_oh, q_start, stride_om), Out, 0, 0, offs_m,
                  stride_om, offs_d, seqlen_q, HEAD_DIM, True, False).to(tl.float32)
    do = load_rows(head_ptr(dO, off_b64, stride_dob, off_h, stride_doh, q_start, stride_dom), dO, 0, 0, offs_m,
                   stride_dom, offs_d, seqlen_q, HEAD_DIM, True, False).to(tl.float32)
    delta = tl.sum(o * do, 1)  # [BM]
    tl.store(Delta + off_b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + offs_m, delta,
             mask=offs_m < seqlen_q)


@triton.jit
def _scores_and_grad_factor(s, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw ``q.k`` products -> (base-2 scores, d(score)/d(scaled q.k) or 1.0)."""
    if HAS_SOFTCAP:
        t = tanh(s * (sm_scale / softcap))
        return (softcap * 1.4426950408889634) * t, 1.0 - t * t
    else:
        return s * (sm_scale * 1.4426950408889634), 1.0


@triton.jit
def _bwd_dkdv_inner(
    acc, tile, q_in, do_in, dq_out, descs, stats, heads, rule, opts, start, end, diag_end,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    USE_TMA: tl.constexpr, IS_GQA: tl.constexpr, TMA_HEAD_MAJOR: tl.constexpr, DIAG: tl.constexpr,
    STATS_TMA: tl.constexpr,
):
    """Add the contribution of query blocks ``[start, end)`` of every query head of the GQA group to
    ``acc`` = (dk, dv) ``[BLOCK_N, BLOCK_D]`` (fp32) and return it; with ``ATOMIC_DQ`` add ``dS K`` into the
    fp32 dQ accumulator. ``MASK``: row checks and the full visibility mask on every block; ``DIAG`` (rows and
    keys known to be in range): only the causal compare, on the blocks that start before ``diag_end``.
    With ``IS_GQA`` (``n_groups > 1``) the heads and their blocks are one loop (head-major), so the software
    pipeline fills once per segment instead of once per head; without, the head is fixed and no per-block
    head arithmetic is paid. Tiles are kept transposed (keys x queries) so the products land in dK/dV's
    orientation.

    What the kernel passes in groups (the same for every segment):
    tile: the key block on chip (k, v [BLOCK_N, BLOCK_D], offs_n [BLOCK_N], offs_d [BLOCK_D]);
    q_in, do_in, dq_out: Q, dO and the dQ accumulator, each with its (batch, row, head) strides;
    descs: (q_desc, do_desc, q_row0, desc_rows_h), Q/dO's descriptors with ``USE_TMA`` and their coordinates;
    stats: (Lse, Delta, lse_off0, stride_lh, Lse_desc, Delta_desc, stat_row0), the rows' log-sum-exp and
    delta, from this sequence's row 0; with ``STATS_TMA`` read through their descriptors instead, at row
    ``stat_row0 + head`` and column ``q_start + query``;
    heads: (off_b64, q_start, off_hk, n_groups, seed_b), where the group's sequence and heads are;
    rule: (seqlen_q, seqlen_k, window_left, window_right) of :func:`common.visible`;
    opts: (sm_scale, softcap, dropout_p). Constexpr flags travel one by one (a tuple of them would be
    turned into runtime values)."""
    dk, dv = acc
    k, v, offs_n, offs_d = tile
    Q, stride_qb, stride_qm, stride_qh = q_in
    dO, stride_dob, stride_dom, stride_doh = do_in
    DQacc, stride_dqb, stride_dqm, stride_dqh = dq_out
    q_desc, do_desc, q_row0, desc_rows_h = descs
    Lse, Delta, lse_off0, stride_lh, Lse_desc, Delta_desc, stat_row0 = stats
    off_b64, q_start, off_hk, n_groups, seed_b = heads
    seqlen_q, seqlen_k, window_left, window_right = rule
    sm_scale, softcap, dropout_p = opts
    d_ok = offs_d[None, :] < HEAD_DIM
    n_steps = tl.cdiv(end - start, BLOCK_M)
    if IS_GQA:
        n_steps *= n_groups
    start_m = start
    g = 0
    for i in range(0, n_steps):
        if IS_GQA:
            off_h = off_hk * n_groups + g
        else:
            off_h = off_hk
            start_m = start + i * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)[:, None]
        if MASK:
            q_ok = (offs_m[:, None] < seqlen_q) & d_ok
            row_ok = offs_m < seqlen_q
        else:
            q_ok = d_ok
            row_ok = offs_m >= 0
        q_row, q_col = desc_head(q_row0 + start_m, off_h, desc_rows_h, HEAD_DIM, TMA_HEAD_MAJOR)
        q = load_rows(head_ptr(Q, off_b64, stride_qb, off_h, stride_qh, q_start, stride_qm), q_desc, q_row,
                      q_col, offs_m, stride_qm, offs_d, seqlen_q, HEAD_DIM, MASK, USE_TMA)  # [BM, BD]
        do = load_rows(head_ptr(dO, off_b64, stride_dob, off_h, stride_doh, q_start, stride_dom), do_desc,
                       q_row, q_col, offs_m, stride_dom, offs_d, seqlen_q, HEAD_DIM, MASK, USE_TMA)
        # rows past the sequence end get lse = +inf, so their recomputed p is 0
        if STATS_TMA:
            # one TMA copy per vector: as pointer loads, the [BLOCK_M] slice of the tile's layout had every
            # thread copy its own replica (16 LDGSTS per thread per step at D128, as many bytes as Q and dO)
            col = q_start + start_m
            lse = tl.reshape(Lse_desc.load([stat_row0 + off_h, col]), [BLOCK_M])
            delta = tl.reshape(Delta_desc.load([stat_row0 + off_h, col]), [BLOCK_M])
            # (dense batches only: rows past the length are columns past the matrix, read as zeros; their
            # delta is 0 and the visibility mask zeroes their p)
            lse2 = lse * 1.4426950408889634
        else:
            lse_off = lse_off0 + off_h.to(tl.int64) * stride_lh
            lse2 = tl.load(Lse + lse_off + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634  # [BM]
            delta = tl.load(Delta + lse_off + offs_m, mask=row_ok, other=0.0)  # [BM]
        # -- recompute P^T for this tile; dP^T = V dO^T is issued before the exponentials, so that its
        # wgmma runs while they do (issued after, it waited for them: one product idle per step)
        sT, dcap = _scores_and_grad_factor(tl.dot(k, tl.trans(q)), sm_scale, softcap, HAS_SOFTCAP)  # [BN, BM]
        dpT = tl.dot(v, tl.trans(do))  # [BN, BM]
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASK:
            ok = tl.trans(visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                  MASK_LEFT, MASK_RIGHT))
            pT = tl.where(ok, pT, 0.0)
        elif DIAG:
            if start_m < diag_end:  # a block that crosses the diagonal: rows and keys are all in range
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + (seqlen_k - seqlen_q), pT, 0.0)
        # -- dV += P_dropped^T dO
        if HAS_DROPOUT:
            keep = tl.trans(dropout_keep(seed_b + off_h, offs_m, offs_n, seqlen_k, dropout_p))
            dv = tl.dot(tl.where(keep, pT / (1.0 - dropout_p), 0.0).to(do.dtype), do, dv)
            dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv)
        # -- dS^T = P^T * (dP^T - delta), through the softcap's derivative ; dK += dS^T Q
        dsT = (pT * (dpT - delta[None, :]) * dcap).to(q.dtype)
        dk = tl.dot(dsT, q, dk)
        if ATOMIC_DQ:
            # the order of these fp32 additions varies run to run: not bitwise reproducible
            dq_part = tl.dot(tl.trans(dsT), k) * sm_scale  # [BM, BD]
            dq_head = head_ptr(DQacc, off_b64, stride_dqb, off_h, stride_dqh, q_start, stride_dqm)
            tl.atomic_add(dq_head + rows * stride_dqm + offs_d[None, :], dq_part, mask=q_ok, sem="relaxed")
        if IS_GQA:
            # -- the next block; past the segment's end, the next head's first block
            start_m += BLOCK_M
            wrap = start_m >= end
            start_m = tl.where(wrap, start, start_m)
            g += wrap.to(tl.int32)
    return dk, dv


# per-call integers (lengths, LSE strides, dropout seed) must not trigger a recompile: common.UNSPECIALIZED
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _bwd_dkdv(
    Q, K, V, dO, Q_desc, dO_desc, Lse, Delta, Lse_desc, Delta_desc, dK, dV, DQacc, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
    seqlen_q_arg, seqlen_k_arg, n_heads_k, n_groups, desc_rows_b, desc_rows_h,
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr,
    IS_GQA: tl.constexpr, TMA_HEAD_MAJOR: tl.constexpr, DIAG_IN_LOOP: tl.constexpr, STATS_TMA: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_k, BLOCK_N), B * Hk)``. dK/dV like K/V; Lse/Delta as in the forward;
    DQacc fp32 like Q, zeroed, only with ``ATOMIC_DQ``. Q_desc/dO_desc: tensor descriptors of Q/dO with
    ``USE_TMA``, else unused; their layout as the forward's K/V descriptors. ``DIAG_IN_LOOP``: one loop with
    the diagonal inside (``common.diag_in_loop``), else masked head, unmasked middle, masked tail.
    Lse_desc/Delta_desc: with ``STATS_TMA``, descriptors of the LSE and delta rows (``common.stats_pair``)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // n_heads_k
    off_hk = pid_bh % n_heads_k
    q_start, k_start, seqlen_q, seqlen_k = seq_bounds(
        cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN
    )
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off_b64 = off_b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_rows = offs_n.to(tl.int64)[:, None]
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k_head = head_ptr(K, off_b64, stride_kb, off_hk, stride_kh, k_start, stride_kn)
    v_head = head_ptr(V, off_b64, stride_vb, off_hk, stride_vh, k_start, stride_vn)
    k = load_rows(k_head, K, 0, 0, offs_n, stride_kn, offs_d, seqlen_k, HEAD_DIM, True, False)  # [BN, BD]
    v = load_rows(v_head, V, 0, 0, offs_n, stride_vn, offs_d, seqlen_k, HEAD_DIM, True, False)  # [BN, BD]
    # the descriptors' row of query 0 in head 0
    q_row0 = desc_row0(q_start, off_b, seqlen_q_arg, desc_rows_b, IS_VARLEN, TMA_HEAD_MAJOR)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = q_segments(
        n0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
    )
    # every query head of the GQA group adds into the same dK/dV registers (the heads are inside each loop)
    lse_off0 = off_b64 * stride_lb + q_start
    seed_b = seed + off_b * (n_heads_k * n_groups)  # plus the head: the forward's per-(batch, head) seed
    acc, tile = (dk, dv), (k, v, offs_n, offs_d)
    q_in, do_in = (Q, stride_qb, stride_qm, stride_qh), (dO, stride_dob, stride_dom, stride_doh)
    dq_out, descs = (DQacc, stride_dqb, stride_dqm, stride_dqh), (Q_desc, dO_desc, q_row0, desc_rows_h)
    stat_row0 = off_b * (n_heads_k * n_groups)  # the descriptors' row of head 0 (dense batches only)
    stats = (Lse, Delta, lse_off0, stride_lh, Lse_desc, Delta_desc, stat_row0)
    heads = (off_b64, q_start, off_hk, n_groups, seed_b)
    rule, opts = (seqlen_q, seqlen_k, window_left, window_right), (sm_scale, softcap, dropout_p)
    if DIAG_IN_LOOP:
        bounds = (lo, hi)  # one loop over every query block, the diagonal compared inside (DIAG)
    else:
        bounds = (lo, mid_lo, mid_hi, hi)  # masked head, unmasked middle, masked tail
    # unrolled at compile time, each segment's loop compiled with its own MASK
    for SEG in tl.static_range(len(bounds) - 1):
        acc = _bwd_dkdv_inner(
            acc=acc, tile=tile, q_in=q_in, do_in=do_in, dq_out=dq_out, descs=descs, stats=stats, heads=heads,
            rule=rule, opts=opts, start=bounds[SEG], end=bounds[SEG + 1], diag_end=mid_lo,
            HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, MASK=SEG != 1 and not DIAG_IN_LOOP, MASK_LEFT=MASK_LEFT,
            MASK_RIGHT=MASK_RIGHT, HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, ATOMIC_DQ=ATOMIC_DQ,
            USE_TMA=USE_TMA, IS_GQA=IS_GQA, TMA_HEAD_MAJOR=TMA_HEAD_MAJOR, DIAG=DIAG_IN_LOOP,
            STATS_TMA=STATS_TMA,
        )
    dk, dv = acc
    dk = dk * sm_scale
    dk_head = head_ptr(dK, off_b64, stride_dkb, off_hk, stride_dkh, k_start, stride_dkn)
    dv_head = head_ptr(dV, off_b64, stride_dvb, off_hk, stride_dvh, k_start, stride_dvn)
    tl.store(dk_head + kv_rows * stride_dkn + offs_d[None, :], dk.to(dK.dtype.element_ty), mask=kv_ok)
    tl.store(dv_head + kv_rows * stride_dvn + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_inner(
    dq, tile, kv, rule, opts, start, end, diag_start,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
    DIAG: tl.constexpr,
):
    """Add the contribution of key blocks ``[start, end)`` to dq ``[BLOCK_M, BLOCK_D]`` (fp32) and return it.
    ``MASK`` and ``DIAG`` as in the dK/dV loop; ``DIAG`` compares on the blocks from ``diag_start`` on.
    tile: the query block (q, do [BLOCK_M, BLOCK_D], lse2, delta [BLOCK_M], offs_m [BLOCK_M], offs_d
    [BLOCK_D]); kv, rule, opts: as in the forward's ``_fwd_inner``."""
    q, do, lse2, delta, offs_m, offs_d = tile
    k_head, v_head, k_desc, v_desc, kv_row0, kv_col, stride_kn, stride_vn = kv
    seqlen_q, seqlen_k, window_left, window_right = rule
    sm_scale, softcap, dropout_p, seed = opts
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_head, k_desc, kv_row0 + start_n, kv_col, offs_n, stride_kn, offs_d, seqlen_k,
                      HEAD_DIM, MASK, USE_TMA)  # [BN, BD]
        v = load_rows(v_head, v_desc, kv_row0 + start_n, kv_col, offs_n, stride_vn, offs_d, seqlen_k,
                      HEAD_DIM, MASK, USE_TMA)  # [BN, BD]
        s, dcap = _scores_and_grad_factor(tl.dot(q, tl.trans(k)), sm_scale, softcap, HAS_SOFTCAP)  # [BM, BN]
        if HEAD_DIM > 64:
            # issued before the exponentials, as in the dK/dV loop; at D <= 64 the extra live tile takes the
            # varlen kernel from 128 to 163 registers, one program per SM instead of two
            dp = tl.dot(do, tl.trans(v))  # [BM, BN]
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, MASK_LEFT, MASK_RIGHT)
            p = tl.where(ok, p, 0.0)
        elif DIAG:
            if start_n >= diag_start:  # as in the dK/dV kernel
                p = tl.where(offs_n[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q), p, 0.0)
        if HEAD_DIM <= 64:
            dp = tl.dot(do, tl.trans(v))  # [BM, BN]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, offs_n, seqlen_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None]) * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


# per-call integers (lengths, LSE strides, dropout seed) must not trigger a recompile: common.UNSPECIALIZED
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _bwd_dq(
    Q, K, V, dO, Out, K_desc, V_desc, Lse, Delta, dQ, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_ob, stride_om, stride_oh, stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q_arg, seqlen_k_arg, n_heads, n_groups, desc_rows_b, desc_rows_h,
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, TMA_HEAD_MAJOR: tl.constexpr,
    DIAG_IN_LOOP: tl.constexpr, DELTA_HERE: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), B * H)``. dQ like Q; K_desc/V_desc as in the forward;
    ``DIAG_IN_LOOP`` as in the dK/dV kernel. ``DELTA_HERE``: compute delta from Out (like Q) and dO and
    store it for the dK/dV kernel that runs next, instead of reading what ``_bwd_delta`` stored."""
    pid_m = tl.program_id(0)
    if MASK_RIGHT:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest programs first, as in the forward
    pid_bh = tl.program_id(1)
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    off_hk = off_h // n_groups
    q_start, k_start, seqlen_q, seqlen_k = seq_bounds(
        cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN
    )
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off_b64 = off_b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]
    q_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    row_ok = offs_m < seqlen_q
    q = load_rows(head_ptr(Q, off_b64, stride_qb, off_h, stride_qh, q_start, stride_qm), Q, 0, 0, offs_m,
                  stride_qm, offs_d, seqlen_q, HEAD_DIM, True, False)  # [BM, BD]
    do = load_rows(head_ptr(dO, off_b64, stride_dob, off_h, stride_doh, q_start, stride_dom), dO, 0, 0, offs_m,
                   stride_dom, offs_d, seqlen_q, HEAD_DIM, True, False)  # [BM, BD]
    lse_off = off_b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start
    lse2 = tl.load(Lse + lse_off + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    if DELTA_HERE:
        # each program owns its rows' delta: computing it here, from the dO tile already loaded and one O
        # tile, saves a launch (host time that short sequences feel) and a pass over O and dO
        o = load_rows(head_ptr(Out, off_b64, stride_ob, off_h, stride_oh, q_start, stride_om), Out, 0, 0, offs_m,
                      stride_om, offs_d, seqlen_q, HEAD_DIM, True, False)  # [BM, BD]
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BM]
        tl.store(Delta + lse_off + offs_m, delta, mask=row_ok)
    else:
        delta = tl.load(Delta + lse_off + offs_m, mask=row_ok, other=0.0)
    k_head = head_ptr(K, off_b64, stride_kb, off_hk, stride_kh, k_start, stride_kn)
    v_head = head_ptr(V, off_b64, stride_vb, off_hk, stride_vh, k_start, stride_vn)
    # the descriptors' coordinates of key 0 of this kv head
    kv_row0, kv_col = desc_head(desc_row0(k_start, off_b, seqlen_k_arg, desc_rows_b, IS_VARLEN, TMA_HEAD_MAJOR),
                                off_hk, desc_rows_h, HEAD_DIM, TMA_HEAD_MAJOR)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    seed = seed + pid_bh
    lo, mid_lo, mid_hi, hi = kv_segments(
        m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
    )
    tile = (q, do, lse2, delta, offs_m, offs_d)
    kv = (k_head, v_head, K_desc, V_desc, kv_row0, kv_col, stride_kn, stride_vn)
    rule, opts = (seqlen_q, seqlen_k, window_left, window_right), (sm_scale, softcap, dropout_p, seed)
    if DIAG_IN_LOOP:
        bounds = (lo, hi)  # as in the dK/dV kernel
    else:
        bounds = (lo, mid_lo, mid_hi, hi)
    for SEG in tl.static_range(len(bounds) - 1):
        dq = _bwd_dq_inner(
            dq=dq, tile=tile, kv=kv, rule=rule, opts=opts, start=bounds[SEG], end=bounds[SEG + 1], diag_start=mid_hi,
            HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, MASK=SEG != 1 and not DIAG_IN_LOOP, MASK_LEFT=MASK_LEFT,
            MASK_RIGHT=MASK_RIGHT, HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, USE_TMA=USE_TMA, DIAG=DIAG_IN_LOOP,
        )
    dq = dq * sm_scale
    dq_head = head_ptr(dQ, off_b64, stride_dqb, off_h, stride_dqh, q_start, stride_dqm)
    tl.store(dq_head + rows * stride_dqm + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=q_ok)


def _empty_delta(lse: torch.Tensor) -> torch.Tensor:
    """An fp32 buffer for delta with the LSE's strides (the kernels read both with the same offsets)."""
    return torch.empty_strided(lse.shape, lse.stride(), dtype=lse.dtype, device=lse.device)


def flash_delta(out, do, lse, cu_seqlens_q, max_seqlen_q, delta=None) -> torch.Tensor:
    """``delta = rowsum(dO * O)`` (fp32) laid out as ``lse``: ``[B, H, Lq]``, or varlen ``[H, total_q]`` with
    ``cu_seqlens_q``; into ``delta`` when given, else into a new buffer; returned. out/do ``[B, Lq, H, D]`` or
    ``[total_q, H, D]``."""
    delta = _empty_delta(lse) if delta is None else delta
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else out.shape[0]
    n_heads, head_dim = out.shape[-2], out.shape[-1]
    _bwd_delta[(cdiv(max_seqlen_q, 64), batch * n_heads)](
        Out=out, dO=do, Delta=delta, cu_seqlens_q=cu_seqlens_q if varlen else lse, **_strides(out, varlen, "o", "m"),
        **_strides(do, varlen, "do", "m"), **lse_strides(lse, varlen), seqlen_q_arg=max_seqlen_q, n_heads=n_heads,
        HEAD_DIM=head_dim, BLOCK_M=64, BLOCK_D=block_d_for(head_dim), IS_VARLEN=varlen,
    )  # fmt: skip
    return delta


def flash_bwd(do, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, window, softcap, dropout_p, seed, config_dkdv, config_dq, deterministic=True):
    """Launch the backward kernels: dQ then dK/dV, or delta then dK/dV with atomic dQ. Tensors as in
    ``forward.flash_fwd``; ``do`` like ``out``; dq, dk, dv like q, k, v (written). ``config_dkdv``: key
    blocks of ``block_n`` walking query blocks of ``block_m``; ``config_dq``: query blocks of ``block_m``
    walking key blocks of ``block_n``.
    ``deterministic=False`` folds dQ into the dK/dV kernel with fp32 atomic additions (fewer matmuls,
    run-to-run rounding differences); True runs the separate dQ kernel (bitwise reproducible).
    Returns delta = rowsum(dO * O), fp32 in the LSE's layout (the sinks' gradient is computed from it)."""
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        n_heads, head_dim, n_heads_k = q.shape[1], q.shape[2], k.shape[1]
    else:
        batch, _, n_heads, head_dim = q.shape
        n_heads_k = k.shape[2]
        cu_seqlens_q = cu_seqlens_k = lse  # placeholders, never read when IS_VARLEN is off
    delta = _empty_delta(lse)
    # what the launches share: shapes and layout, the LSE/delta rows, the lengths
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=config_dq.block_d, IS_VARLEN=varlen, cu_seqlens_q=cu_seqlens_q,
                  **lse_strides(lse, varlen), seqlen_q_arg=max_seqlen_q)  # fmt: skip
    # ... and what the dK/dV and dQ kernels share
    shared.update(Q=q, K=k, V=v, dO=do, Lse=lse, Delta=delta, cu_seqlens_k=cu_seqlens_k, seqlen_k_arg=max_seqlen_k,
                  n_groups=n_heads // n_heads_k, **option_args(softmax_scale, window, softcap, dropout_p, seed),
                  **_strides(q, varlen, "q", "m"), **_strides(k, varlen, "k", "n"), **_strides(v, varlen, "v", "n"),
                  **_strides(do, varlen, "do", "m"))  # fmt: skip
    atomic = not deterministic
    if atomic:
        # no dQ kernel to compute delta on the way: its own small launch
        flash_delta(out, do, lse, cu_seqlens_q if varlen else None, max_seqlen_q, delta)
    else:
        # dQ first: it stores delta, which the dK/dV kernel reads
        c = config_dq
        _bwd_dq[(cdiv(max_seqlen_q, c.block_m), batch * n_heads)](
            dQ=dq, Out=out, **tma_pair(k, v, varlen, c.block_n, c.tma).kernel_args("K_desc", "V_desc"),
            **_strides(dq, varlen, "dq", "m"), **_strides(out, varlen, "o", "m"), n_heads=n_heads,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, DELTA_HERE=True,
            DIAG_IN_LOOP=diag_in_loop(varlen, window, max_seqlen_q, max_seqlen_k, c), **shared, **c.launch_options(),
        )
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else dq
    c = config_dkdv
    q_do = tma_pair(q, do, varlen, c.block_m, c.tma)
    _bwd_dkdv[(cdiv(max_seqlen_k, c.block_n), batch * n_heads_k)](
        dK=dk, dV=dv, DQacc=dq_acc, **q_do.kernel_args("Q_desc", "dO_desc"),
        **stats_pair(lse, delta, varlen, c.block_m, q_do.use),
        **_strides(dk, varlen, "dk", "n"), **_strides(dv, varlen, "dv", "n"), **_strides(dq_acc, varlen, "dq", "m"),
        n_heads_k=n_heads_k, BLOCK_M=c.block_m, BLOCK_N=c.block_n, ATOMIC_DQ=atomic, IS_GQA=n_heads != n_heads_k,
        DIAG_IN_LOOP=diag_in_loop(varlen, window, max_seqlen_q, max_seqlen_k, c), **shared, **c.launch_options(),
    )
    if atomic:
        dq.copy_(dq_acc)
    return delta
