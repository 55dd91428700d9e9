"""Prototype: the backward's dK/dV kernel warp-specialized in Gluon for Hopper (the forward's split, ``hf_flash/ops/
hopper_fwd.py``, applied to the kernel that takes ~60% of the backward). Not wired into hf_flash.

    python benchmarks/experiments/gluon_dkdv.py                  # check against the portable kernel, then time
    python benchmarks/experiments/gluon_dkdv.py --seqlens 4096 --stages 2,3

A program owns 128 keys of one (batch, kv head) and walks the query blocks (64 rows) that see them, for every
query head of the GQA group. Partitions:

* loader, 1 warp: K and V once (two 64-row halves each), then Q and dO of each query block into a ring of stages;
* two consumers, 4 warps each: group g owns keys g*64 .. g*64+63 and their dK, dV accumulators ([64, D] fp32 in
  registers). Per query block: S^T = K_g Q^T and dP^T = V_g dO^T (wgmma from shared memory), P^T = exp2(S^T *
  scale * log2 e - LSE * log2 e), dS^T = P^T (dP^T - delta), then dV_g += P^T dO and dK_g += dS^T Q with P^T
  and dS^T straight from registers (the accumulator layout of S^T is the A operand's, no shuffle).

The LSE and delta of a query block are read by the consumers from global memory (64 floats, L2-resident); dQ
and delta come from the portable dQ kernel, which runs first as in ``backward.flash_bwd``.
Limits (asserted): dense [B, L, H, D], L a multiple of 128, Lq == Lk, D 64 or 128, causal or not, no window,
softcap or dropout; bf16/fp16, contiguous.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_ROWS = 64  # query rows of a step, and keys of a consumer group
ROWS = gl.constexpr(_ROWS)


@gluon.jit
def _schedule(problem, CAUSAL: gl.constexpr):
    """This program's key block and what it walks: (kv row of its first key, its first key n0, the first query
    block, steps per head, total steps). ``problem``: (seqlen, n_heads_k, n_groups)."""
    seqlen, n_heads_k, n_groups = problem
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // n_heads_k
    n0 = pid_n * (2 * ROWS)
    q_lo = n0 if CAUSAL else 0  # causal: queries before the key block see none of it
    per_head = (seqlen - q_lo) // ROWS
    return b, bh % n_heads_k, n0, q_lo, per_head, per_head * n_groups


@gluon.jit
def _q_block(i, per_head, n0, q_lo, ROTATE: gl.constexpr):
    """First query of step ``i`` of a head. ``ROTATE`` (non-causal): each key block starts at its own query
    blocks and wraps around, so the programs running at once add into different dQ rows."""
    if ROTATE:
        return ((i + n0 // ROWS) % per_head) * ROWS
    else:
        return q_lo + i * ROWS


@gluon.jit
def _red_add(ptrs, vals, VEC: gl.constexpr):
    """``*ptrs += vals`` (fp32, relaxed, no result). ``VEC``: 4 neighbouring elements of a thread per instruction
    (sm90's ``red.global.add.v4.f32``, which Triton 3.6 does not emit for ``atomic_add``)."""
    if VEC == 2:  # "nored": no reduction at all (what the atomics cost)
        pass
    elif VEC == 1:
        gl.inline_asm_elementwise(
            "red.relaxed.gpu.global.add.v4.f32 [$4], {$8, $9, $10, $11};\n\t"
            "mov.b32 $0, 0;\n\tmov.b32 $1, 0;\n\tmov.b32 $2, 0;\n\tmov.b32 $3, 0;",
            "=r,=r,=r,=r,l,l,l,l,f,f,f,f", [ptrs.to(gl.int64, bitcast=True), vals], dtype=gl.int32, is_pure=False, pack=4)
    else:
        gl.atomic_add(ptrs, vals, sem="relaxed")


@gluon.jit
def _reduce(j, problem, dq_out, CAUSAL: gl.constexpr, ROTATE: gl.constexpr, DQ: gl.constexpr, VEC: gl.constexpr):
    """The loader's 4 warps add step ``j``'s dQ part (both groups') into the fp32 dQ with atomics."""
    dq_smem, dq_ready, dq_empty, dq_ptr, dq_stride = dq_out
    DQ_N: gl.constexpr = dq_smem.type.shape[2]
    HEAD_DIM: gl.constexpr = DQ_N * 2 if DQ == 1 else DQ_N
    TPR: gl.constexpr = DQ_N // 4  # threads per row, 4 floats each
    CHUNK: gl.constexpr = 32 // TPR * 4  # rows per pass of the 4 warps
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPR, TPR], [4, 1], [1, 0])
    seqlen, n_heads_k, n_groups = problem
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, CAUSAL)
    h = hk * n_groups + j // per_head
    q_start = _q_block(j % per_head, per_head, n0, q_lo, ROTATE)
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, DQ_N, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows, 1) * dq_stride + gl.expand_dims(cols, 0)
    base = dq_ptr + (b * seqlen + q_start).to(gl.int64) * dq_stride + h * HEAD_DIM
    mbarrier.wait(dq_ready, j & 1)
    for r in gl.static_range(0, ROWS, CHUNK):
        if DQ == 1:  # each group's half of the columns
            for g in gl.static_range(2):
                part = dq_smem.index(g).slice(r, CHUNK, 0).load(layout)
                _red_add(base + r * dq_stride + g * DQ_N + offs, part, VEC)
        else:  # each group's part over its keys: summed here, one atomic per element
            part = dq_smem.index(0).slice(r, CHUNK, 0).load(layout) + dq_smem.index(1).slice(r, CHUNK, 0).load(layout)
            _red_add(base + r * dq_stride + offs, part, VEC)
    mbarrier.arrive(dq_empty, count=1)


@gluon.jit
def _loader(descs, smem, bars, problem, stats, dq_out, CAUSAL: gl.constexpr, ROTATE: gl.constexpr,
            DQ: gl.constexpr, VEC: gl.constexpr):
    """4 warps: K, V once, then Q and dO of each step into the stage ring; with ``DQ``, between the loads, the
    dQ reductions of the steps that released their stage."""
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready = bars
    lse_smem, delta_smem, lse_desc, delta_desc, stat_stride = stats
    STAGES: gl.constexpr = q_smem.type.shape[0]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    seqlen, n_heads_k, n_groups = problem
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, CAUSAL)
    kv_row = b * seqlen + n0
    mbarrier.expect(kv_ready, 4 * k_desc.block_type.nbytes)
    for g in gl.static_range(2):
        _tma_load(k_desc, [kv_row + g * ROWS, hk * HEAD_DIM], kv_ready, k_smem.index(g))
        _tma_load(v_desc, [kv_row + g * ROWS, hk * HEAD_DIM], kv_ready, v_smem.index(g))
    for j in range(n_steps):
        h = hk * n_groups + j // per_head
        q_row = b * seqlen + _q_block(j % per_head, per_head, n0, q_lo, ROTATE)
        stage = j % STAGES
        mbarrier.wait(qdo_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(qdo_ready.index(stage), 2 * q_desc.block_type.nbytes + 2 * lse_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, h * HEAD_DIM], qdo_ready.index(stage), q_smem.index(stage))
        _tma_load(do_desc, [q_row, h * HEAD_DIM], qdo_ready.index(stage), do_smem.index(stage))
        stat = (b * (n_heads_k * n_groups) + h) * stat_stride + _q_block(j % per_head, per_head, n0, q_lo, ROTATE)
        _tma_load(lse_desc, [stat], qdo_ready.index(stage), lse_smem.index(stage))
        _tma_load(delta_desc, [stat], qdo_ready.index(stage), delta_smem.index(stage))
        if DQ != 0:
            if j >= STAGES:
                _reduce(j - STAGES, problem, dq_out, CAUSAL, ROTATE, DQ, VEC)
    if DQ != 0:
        for j in range(gl.maximum(n_steps - STAGES, 0), n_steps):
            _reduce(j, problem, dq_out, CAUSAL, ROTATE, DQ, VEC)


@gluon.jit
def _step(c, q_start, h, g: gl.constexpr, smem, bars, acc, offs_key, stats, dq_out, qk_scale, dq_scale, zero_s,
          MASKED: gl.constexpr, DQ: gl.constexpr, DQ_N: gl.constexpr, a_layout: gl.constexpr,
          dq_layout: gl.constexpr):
    """One query block (rows q_start ..., head h) in stage-ring position c; returns (dk, dv).
    ``DQ``: 0 none; 1 ("split") dQ[:, g-th half of D] = dS K over both groups' keys (dS^T of both groups in
    shared memory, one mbarrier turn a step between the groups); 2 ("own") dQ[:, all of D] = dS_g K_g over this
    group's keys. The fp32 result goes to ``dq_out`` = (buffer [2, 64, DQ_N], ready, empty) for ``_reduce``."""
    k_smem, v_smem, q_smem, do_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready = bars
    lse_smem, delta_smem = stats
    dk, dv = acc
    k_g = k_smem.index(g)
    v_g = v_smem.index(g)
    STAGES: gl.constexpr = q_smem.type.shape[0]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    dtype: gl.constexpr = q_smem.dtype
    col_s: gl.constexpr = gl.SliceLayout(0, zero_s.type.layout)
    stage = c % STAGES
    offs_q = q_start + gl.arange(0, ROWS, layout=col_s)
    mbarrier.wait(qdo_ready.index(stage), (c // STAGES) & 1)
    q_s = q_smem.index(stage)
    do_s = do_smem.index(stage)
    # -- S^T = K_g Q^T and dP^T = V_g dO^T, both issued before the exponentials
    st = warpgroup_mma(k_g, q_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dpt = warpgroup_mma(v_g, do_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(1, deps=[st])  # [64 keys, 64 queries]
    # the rows' LSE and delta came with Q and dO (TMA): read here, where they are used, they hold no registers
    # across the products' waits
    lse2 = lse_smem.index(stage).load(col_s) * 1.4426950408889634
    pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
    if MASKED:  # a block that crosses the causal diagonal: query i sees keys <= i
        pt = gl.where(gl.expand_dims(offs_key, 1) <= gl.expand_dims(offs_q, 0), pt, 0.0)
    dpt = warpgroup_mma_wait(0, deps=[dpt])
    delta = delta_smem.index(stage).load(col_s)
    dst = (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)
    if DQ != 0:
        # dS^T to shared memory: read back transposed as the A operand of dQ = dS K
        ds_buf = c % 2
        ds_smem.index(ds_buf * 2 + g).store(dst)
        fence_async_shared()
        if DQ == 1:
            mbarrier.arrive(ds_ready.index(ds_buf), count=1)
    # -- dV_g += P^T dO, dK_g += dS^T Q (P^T, dS^T as A operands from registers)
    pt16 = gl.convert_layout(pt.to(dtype), a_layout)
    dst16 = gl.convert_layout(dst, a_layout)
    dv = warpgroup_mma(pt16, do_s, dv, is_async=True)
    dk = warpgroup_mma(dst16, q_s, dk, is_async=True)
    if DQ == 0:
        dv, dk = warpgroup_mma_wait(0, deps=[dv, dk])
        mbarrier.arrive(qdo_empty.index(stage), count=1)
    else:
        # dK/dV's products finish first: their register operands (P^T, dS^T) then die before dQ's accumulator lives
        dv, dk = warpgroup_mma_wait(0, deps=[dv, dk])
        mbarrier.arrive(qdo_empty.index(stage), count=1)
        zero_q = gl.zeros([ROWS, DQ_N], gl.float32, dq_layout)
        if DQ == 1:
            mbarrier.wait(ds_ready.index(ds_buf), (c // 2) & 1)  # the other group's dS^T is there too
            dq = warpgroup_mma(ds_smem.index(ds_buf * 2).permute((1, 0)), k_smem.index(0).slice(g * DQ_N, DQ_N, 1),
                               zero_q, use_acc=False, is_async=True)
            dq = warpgroup_mma(ds_smem.index(ds_buf * 2 + 1).permute((1, 0)), k_smem.index(1).slice(g * DQ_N, DQ_N, 1),
                               dq, is_async=True)
        else:
            dq = warpgroup_mma(ds_smem.index(ds_buf * 2 + g).permute((1, 0)), k_g, zero_q, use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(0, deps=[dq])
        # -- the fp32 part to shared memory; the loader's warps add it into dQ (``_reduce``)
        dq_smem, dq_ready, dq_empty = dq_out
        mbarrier.wait(dq_empty, (c & 1) ^ 1)
        dq_smem.index(g).store(dq * dq_scale)
        mbarrier.arrive(dq_ready, count=1)
    return dk, dv


@gluon.jit
def _consume(g: gl.constexpr, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr,
             ROTATE: gl.constexpr, mode):
    """4 warps: keys n0 + g*64 ... of this program, every query block of every head of the group. ``mode``: a
    shared-memory descriptor of shape [DQ + 1, DQ_N] that only carries those two constants (constexprs passed
    through ``gl.warp_specialize`` arrive as runtime values, which shapes cannot use)."""
    DQ: gl.constexpr = mode.type.shape[0] - 1
    DQ_N: gl.constexpr = mode.type.shape[1]
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready = bars
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    dtype: gl.constexpr = q_smem.dtype
    seqlen, n_heads_k, n_groups = problem
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, CAUSAL)
    stats = (stats[0], stats[1])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_N, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    zero_s = gl.zeros([ROWS, ROWS], gl.float32, s_layout)
    acc = (gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout), gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout))
    offs_key = n0 + g * ROWS + gl.arange(0, ROWS, layout=row_s)
    dq_out = (dq_out[0], dq_out[1], dq_out[2])
    dq_scale = sm_scale
    n_diag = 2 if CAUSAL else 0  # causal: the first two query blocks of a head cross the key block's diagonal
    mbarrier.wait(kv_ready, 0)
    c = 0
    for hh in range(n_groups):
        h = hk * n_groups + hh
        for i in range(0, n_diag):
            acc = _step(c, q_lo + i * ROWS, h, g, smem, bars, acc, offs_key, stats, dq_out, qk_scale, dq_scale,
                        zero_s, True, DQ, DQ_N, a_layout, dq_layout)
            c += 1
        for i in range(n_diag, per_head):
            acc = _step(c, _q_block(i, per_head, n0, q_lo, ROTATE), h, g, smem, bars, acc, offs_key, stats, dq_out,
                        qk_scale, dq_scale, zero_s, False, DQ, DQ_N, a_layout, dq_layout)
            c += 1
    dk, dv = acc
    # -- out through K/V's buffers and TMA stores; with dQ ("split") the other group may still read both K
    # halves, so both groups wait until each has passed its last step
    if DQ == 1:
        mbarrier.arrive(ds_ready.index(c % 2), count=1)
        mbarrier.wait(ds_ready.index(c % 2), (c // 2) & 1)
    k_g = k_smem.index(g)
    v_g = v_smem.index(g)
    kv_row = b * seqlen + n0 + g * ROWS
    k_g.store((dk * sm_scale).to(dtype))
    v_g.store(dv.to(dtype))
    fence_async_shared()
    _tma_store(dk_desc, [kv_row, hk * HEAD_DIM], k_g)
    _tma_store(dv_desc, [kv_row, hk * HEAD_DIM], v_g)
    tma.store_wait(0)


@gluon.jit
def _consumer0(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr,
               ROTATE: gl.constexpr, mode, VEC: gl.constexpr):
    _consume(0, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL, ROTATE, mode)


@gluon.jit
def _consumer1(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr,
               ROTATE: gl.constexpr, mode, VEC: gl.constexpr):
    _consume(1, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL, ROTATE, mode)


@gluon.jit
def _loader_partition(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr,
                      ROTATE: gl.constexpr, mode, VEC: gl.constexpr):
    DQ: gl.constexpr = mode.type.shape[0] - 1
    _loader(descs, smem, bars, problem, stats, dq_out, CAUSAL, ROTATE, DQ, VEC)


@gluon.jit
def _dkdv_ws_kernel(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_desc, delta_desc, stat_stride,
                    dq_ptr, dq_stride, seqlen, n_heads_k, n_groups, qk_scale, sm_scale, CAUSAL: gl.constexpr,
                    STAGES: gl.constexpr, DQ: gl.constexpr, ROTATE: gl.constexpr, DQ_N: gl.constexpr,
                    VEC: gl.constexpr):
    """Descriptors over the [B * L, H(k) * D] views in [64, D] tiles. Grid (L / 128, B * Hk). dq_ptr: fp32
    [B * L, H * D] rows of ``dq_stride``, zeroed, only with ``DQ``."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, ROWS], lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, ROWS], delta_desc.layout)
    DS_BUFS: gl.constexpr = 2 if DQ != 0 else 1
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, ROWS], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [DS_BUFS * 2, ROWS, ROWS], ds_layout)  # [buffer * 2 + group]
    mode = gl.allocate_shared_memory(gl.int8, [DQ + 1, DQ_N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    DQ_ROWS: gl.constexpr = ROWS if DQ != 0 else 1
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, DQ_ROWS, DQ_N], gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
    dq_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(dq_ready, count=2)  # both groups' parts stored
    mbarrier.init(dq_empty, count=1)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qdo_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(qdo_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)  # both consumer groups release a stage
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)  # both groups' dS^T stored
    args = ((q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc), (k_smem, v_smem, q_smem, do_smem, ds_smem),
            (kv_ready, qdo_ready, qdo_empty, ds_ready), (seqlen, n_heads_k, n_groups),
            (lse_smem, delta_smem, lse_desc, delta_desc, stat_stride), (dq_smem, dq_ready, dq_empty, dq_ptr, dq_stride), qk_scale, sm_scale, CAUSAL, ROTATE, mode, VEC)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_loader_partition, args)], [4, 4], [232, 40])


def _desc(t):
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    flat = t.view(t.shape[0] * t.shape[1], t.shape[2] * t.shape[3])
    return TensorDescriptor.from_tensor(flat, [_ROWS, t.shape[3]], gl.NVMMASharedLayout.get_default_for(
        [_ROWS, t.shape[3]], dtype))


STAT_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)


def _stat_desc(t):
    """[B, H, L] fp32 whose rows are padded to 16 elements (``function._new_lse``), as one 1D tensor read in
    [64] tiles at (b * H + h) * row_stride + query."""
    assert t.stride(2) == 1 and t.stride(0) == t.shape[1] * t.stride(1) and t.stride(1) % 4 == 0
    flat = torch.as_strided(t, (t.shape[0] * t.stride(0),), (1,))
    return TensorDescriptor.from_tensor(flat, [_ROWS], STAT_LAYOUT)


def gluon_dkdv(q, k, v, do, lse, delta, dk, dv, causal, stages=2, dq_acc=None, dq_mode=0, rotate=False, vec=False):
    """q/do [B, L, H, D], k/v/dk/dv [B, L, Hk, D] contiguous; lse/delta fp32 [B, H, L] (rows padded to 16).
    dq_acc: fp32 like q, zeroed, with ``dq_mode`` 1 or 2 (gets scale * dS K added)."""
    batch, seqlen, n_heads, head_dim = q.shape
    assert seqlen % 128 == 0 and k.shape[1] == seqlen and head_dim in (64, 128)
    grid = (seqlen // 128, batch * k.shape[2])
    scale = 1 / math.sqrt(head_dim)
    dq_arg = dq_acc if dq_mode else lse
    _dkdv_ws_kernel[grid](_desc(q), _desc(do), _desc(k), _desc(v), _desc(dk), _desc(dv), _stat_desc(lse),
                          _stat_desc(delta), lse.stride(1), dq_arg, n_heads * head_dim, seqlen, k.shape[2], n_heads // k.shape[2],
                          scale * LOG2E, scale, CAUSAL=causal, STAGES=stages, DQ=dq_mode, ROTATE=rotate and not causal,
                          DQ_N=head_dim // 2 if dq_mode == 1 else head_dim, VEC=vec,
                          num_warps=4, maxnreg=168)


def delta_of(out, do, lse):
    """delta = rowsum(dO * O) in the LSE's layout, by the portable kernel that the atomic path uses."""
    from hf_flash.ops.backward import _bwd_delta
    from hf_flash.ops.common import lse_strides, strides_blh

    batch, seqlen, n_heads, head_dim = out.shape
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=lse.dtype, device=lse.device)
    _bwd_delta[(triton.cdiv(seqlen, 64), batch * n_heads)](
        Out=out, dO=do, Delta=delta, cu_seqlens_q=lse, **strides_blh(out, False, "o", "m"),
        **strides_blh(do, False, "do", "m"), **lse_strides(lse, False), seqlen_q_arg=seqlen, n_heads=n_heads,
        HEAD_DIM=head_dim, BLOCK_M=64, BLOCK_D=head_dim, IS_VARLEN=False)
    return delta


def gluon_bwd(q, k, v, out, do, lse, dq, dk, dv, causal, stages, dq_mode, rotate, vec=False):
    """The whole backward with dQ from the dK/dV program: delta, zeroed fp32 dQ, the kernel, dQ cast."""
    delta = delta_of(out, do, lse)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    gluon_dkdv(q, k, v, do, lse, delta, dk, dv, causal, stages, dq_acc, dq_mode, rotate, vec)
    dq.copy_(dq_acc)


def _portable(q, k, v, causal):
    """The portable forward and backward; returns (out, lse, delta, dq, dk, dv, do) and the backward's closure."""
    from hf_flash.ops.backward import flash_bwd
    from hf_flash.ops.config import backward_config, forward_config
    from hf_flash.ops.forward import flash_fwd
    from hf_flash.ops.function import _new_lse

    seqlen, head_dim = q.shape[1], q.shape[3]
    out, lse = torch.empty_like(q), _new_lse(q, False, q.shape[0])
    args = (None, None, seqlen, seqlen, 1 / math.sqrt(head_dim), (-1, 0 if causal else -1), 0.0, 0.0, 0)
    flash_fwd(q, k, v, out, lse, *args, forward_config(head_dim, q.device, seqlen))
    do = torch.randn_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfgs = backward_config(head_dim, q.device)

    def bwd():
        return flash_bwd(do, q, k, v, out, lse, dq, dk, dv, *args, *cfgs, True)

    delta = bwd()
    return out, lse, delta, dq, dk, dv, do, bwd


def _variants(stages_list, modes):
    """Variant name -> (stages, dq_mode, rotate, vec). Mode "dkdv": the portable dQ kernel beside; "split"/"own":
    dQ from this kernel (``_step``); "-rot": the non-causal rotation; "-vec": 4-wide reductions; "-nored": none
    (dQ is then wrong: a timing of what the atomics cost, its checks fail)."""
    out = {}
    for st in stages_list:
        for m in modes:
            parts = m.split("-")
            vec = 2 if "nored" in parts else int("vec" in parts)
            out[f"{m}-s{st}"] = (st, {"dkdv": 0, "split": 1, "own": 2}[parts[0]], "rot" in parts, vec)
    return out


def check(head_dim, causal, kv_heads, variants):
    """Runs every variant on one problem; returns the names that match the fp32 reference as the portable
    backward does (error <= 2x the portable kernel's + 1e-5)."""
    torch.manual_seed(0)
    batch, seqlen, heads = 2, 1024, 8
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse, delta, dq, dk, dv, do, _ = _portable(q, k, v, causal)
    # fp32 reference
    qf, kf, vf, dof = (t.float().transpose(1, 2) for t in (q, k, v, do))
    rep = heads // kv_heads
    qf.requires_grad_()
    kf, vf = kf.repeat_interleave(rep, 1).requires_grad_(), vf.repeat_interleave(rep, 1).requires_grad_()
    kf.retain_grad(), vf.retain_grad()
    s = qf @ kf.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    (s.softmax(-1) @ vf).backward(dof)

    def fold(g):  # [B, H, L, D] -> [B, L, Hk, D], summed over each group's heads
        return g.view(batch, kv_heads, rep, seqlen, head_dim).sum(2).transpose(1, 2)

    refs = {"dq": qf.grad.transpose(1, 2), "dk": fold(kf.grad), "dv": fold(vf.grad)}
    base = {"dq": dq, "dk": dk, "dv": dv}
    good = []
    for name, (st, mode, rot, vec) in variants.items():
        g = {"dq": torch.zeros_like(dq), "dk": torch.empty_like(dk), "dv": torch.empty_like(dv)}
        if mode:
            gluon_bwd(q, k, v, out, do, lse, g["dq"], g["dk"], g["dv"], causal, st, mode, rot, vec)
        else:
            gluon_dkdv(q, k, v, do, lse, delta, g["dk"], g["dv"], causal, st)
            g["dq"] = dq
        torch.cuda.synchronize()
        ok = True
        msg = []
        for t in ("dq", "dk", "dv"):
            err, base_err = (g[t].float() - refs[t]).abs().max().item(), (base[t].float() - refs[t]).abs().max().item()
            ok &= err <= 2 * base_err + 1e-5
            msg.append(f"{t} {err:.2e} (portable {base_err:.2e})")
        print(f"check D{head_dim} causal={causal} kv_heads={kv_heads} {name}: {', '.join(msg)} -> "
              f"{'ok' if ok else 'WRONG'}", flush=True)
        if ok:
            good.append(name)
    return good


def time_case(head_dim, causal, seqlen, kv_heads, variants, rounds):
    """Whole backward: the portable one against each variant (kernel times from the profiler, summed over every
    kernel of the call: delta, zeroing and the dQ cast included; "dkdv" variants add the portable dQ kernel)."""
    batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, kv_heads or heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    out, lse, delta, dq, dk, dv, do, bwd = _portable(q, k, v, causal)
    flops = 2.5 * 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    runs = {"portable": bwd}
    for name, (st, mode, rot, vec) in variants.items():
        if mode:
            runs[name] = (lambda st, mode, rot, vec: lambda: gluon_bwd(q, k, v, out, do, lse, dq, dk, dv, causal, st,
                                                                       mode, rot, vec))(st, mode, rot, vec)
        else:
            runs[name] = (lambda st: lambda: gluon_dkdv(q, k, v, do, lse, delta, dk, dv, causal, st))(st)
    kernel_ms = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            fn()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            # kernels by name (host-side entries carry no device time), ms per call
            times = {e.key: e.device_time_total / 1e3 / 10 for e in prof.key_averages() if e.device_time_total}
            kernel_ms[name].append(times)
    if "_bwd_dkdv" not in kernel_ms["portable"][0]:
        print("kernels seen by the profiler:", sorted(kernel_ms["portable"][0]), flush=True)
        return
    dq_ms = statistics.median(t.get("_bwd_dq", 0.0) for t in kernel_ms["portable"])
    dkdv_ms = statistics.median(t.get("_bwd_dkdv", 0.0) for t in kernel_ms["portable"])
    whole = dkdv_ms + dq_ms
    cells = [f"portable dkdv {dkdv_ms:.3f} + dq {dq_ms:.3f} ms: {flops / whole * 1e-9:.0f}"]
    for name, (st, mode, rot, vec) in variants.items():
        if mode:
            ms = statistics.median(sum(t.values()) for t in kernel_ms[name])
            ws = statistics.median(sum(v for key, v in t.items() if "dkdv_ws" in key) for t in kernel_ms[name])
            cells.append(f"{name} {ms:.3f} ms (kernel {ws:.3f}) {whole / ms:.2f}x: {flops / ms * 1e-9:.0f}")
        else:
            ms = statistics.median(sum(v for key, v in t.items() if "dkdv_ws" in key) for t in kernel_ms[name]) or 1e-9
            cells.append(f"{name} dkdv {ms:.3f} ms ({dkdv_ms / ms:.2f}x): {flops / (ms + dq_ms) * 1e-9:.0f}")
    print(f"D{head_dim} causal={causal} L={seqlen} kv_heads={kv_heads or heads} backward TFLOP/s: " + "; ".join(cells),
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--seqlens", default="4096,16384")
    p.add_argument("--stages", default="2")
    p.add_argument("--modes", default="split,split-rot,own-rot", help="dkdv, split, own, each with -rot")
    p.add_argument("--causal", default="both", choices=("both", "causal", "plain"))
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, flush=True)
    variants = _variants([int(s) for s in a.stages.split(",")], a.modes.split(","))
    causals = {"both": (False, True), "causal": (True,), "plain": (False,)}[a.causal]
    for d in map(int, a.head_dims.split(",")):
        # "own" at D128 does not compile (a [64, 128] fp32 buffer's rows cannot be sliced across its swizzle)
        good = {n for n, v in variants.items() if not (d == 128 and v[1] == 2)}
        for c in causals:
            for kvh in (8, 2):
                good &= set(check(d, c, kvh, {n: variants[n] for n in good if variants[n][3] != 2}))
        # "nored" computes no dQ: timed without its check
        good |= {n for n, v in variants.items() if v[3] == 2 and not (d == 128 and v[1] == 2)}
        for seqlen in map(int, a.seqlens.split(",")):
            for c in causals:
                if good:
                    time_case(d, c, seqlen, a.kv_heads, {n: variants[n] for n in variants if n in good}, a.rounds)
        if not good:
            print(f"D{d}: no variant passed its checks", flush=True)


if __name__ == "__main__":
    main()
