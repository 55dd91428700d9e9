"""Gluon kernel of the Hopper backward at head dims 64 and 128 and its launch (imported by ``hopper_bwd`` only where
Triton has Gluon).

A program owns 128 keys of one (batch, kv head) and walks the query blocks that see them (STEP = 64 rows at D128,
128 at D64: ``tile_rows``, FlashAttention-3's sm90 tiles), for every query head of the GQA group (causal: from its
own diagonal on; otherwise each key block starts at its own query block and wraps around, so the programs running
at once add into different dQ rows). Any L: every tensor is read through a 4D descriptor ``[B, H, L, D]`` (3D
``[B, H, L]`` for the LSE and delta) in boxes of one (batch, head), so TMA zero-fills the rows of a box past L and
drops them from the stores: the last key block's missing keys come as zero K and V rows and its missing queries as
zero Q, dO, LSE and delta, which add nothing to dK, dV and dQ but through P (causal: masked already; otherwise
the last key block's steps mask its keys past L, see ``_step``). Varlen: the packed batch is one sequence of
``total`` rows to the descriptors, so past a sequence's end come the next one's rows, not zeros: its keys are
masked as above, its queries get P = 0 from an LSE of +inf there (:func:`padded_stats`), and a key block that
ends past its sequence stores dK / dV from registers, masked (``benchmarks/experiments/any_length_emulation.py``
replays this arithmetic). Partitions (``gl.warp_specialize``):

* loader, 4 warps: K and V once; per step Q, dO and the rows' LSE and delta through TMA into a ring of
  ``STAGES`` stages; and at D64, between the loads, the dQ reductions: the fp32 part the consumers left in
  shared memory, added into the fp32 dQ buffer with ``red.global.add.v4.f32`` (FlashAttention-2's atomics);
* two consumers, 4 warps each: group g owns keys g*64 .. g*64+63 and their dK, dV accumulators ([64, D] fp32 in
  registers). Per step: S^T = K_g Q^T and dP^T = V_g dO^T ([64, STEP], wgmma from shared memory), P^T =
  exp2(S^T * scale * log2 e - LSE * log2 e), dS^T = P^T (dP^T - delta); dV_g += P^T dO and dK_g += dS^T Q (P^T,
  dS^T as register A operands); dS^T to shared memory, and dQ = dS K, five products in all where the portable
  split computes seven (``backward.py``). dQ needs both groups' dS^T (one mbarrier turn a step, double-buffered):
  group g computes the g-th half of dQ's columns at D128 and of the step's queries at D64, as FlashAttention-3
  splits them. At D128 each group adds its fp32 part into the buffer itself, through a TMA reduction from shared
  memory (``cp.reduce.async.bulk.tensor``, FlashAttention-3's), which runs while the group goes on; at D64 that
  form lengthened the consumers' loops past their registers (LOG), so the loader's atomics stay there.

Shapes in comments: ``[rows, columns]`` of one consumer group.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from hf_flash.ops._hopper_fwd_kernel import _box, box_descriptor, box_layout, tma_load, tma_store

_tma_add = getattr(tma, "async_atomic_add", None)
if _tma_add is None:
    # Triton 3.6: the TMA reduction exists (``tl``'s descriptor atomic_add lowers to it), its Gluon call does not
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _builtin

    @_builtin
    def _tma_add(tensor_desc, coord, src, _semantic=None):
        """``global[coord ...] += src`` for a tile in shared memory, through TMA (``cp.reduce.async.bulk.tensor``);
        completes like a TMA store (``tma.store_wait``)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

ROWS = 64  # keys of a consumer group, query rows of a D128 step
_ROWS = gl.constexpr(ROWS)
BLOCK_N = 2 * ROWS  # keys of a program
# the LSE and delta rows, read in [1, 1, STEP] boxes of the fp32 [B, H, L]
_STAT_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)


@gluon.jit
def _row(ring, i):
    """Box ``i`` of a ring of LSE / delta boxes ``[n, 1, 1, rows]`` as ``[rows]``."""
    return ring.index(i).reshape([ring.type.shape[3]])


@gluon.jit
def _schedule(problem, STEP: gl.constexpr, CAUSAL: gl.constexpr):
    """This program's (batch, kv head, first key n0, first query q_lo, steps per head, steps in all), for steps
    of ``STEP`` queries. ``problem``: (this sequence's length, n_heads_k, n_groups, dq_rows_b, (batch * n_heads_k +
    kv head, first key), (the descriptors' batch coordinate, the sequence's first row): (b, 0) dense, (0, start)
    varlen)."""
    seqlen, n_heads_k, n_groups = problem[0], problem[1], problem[2]
    bh, n0 = problem[4]
    q_lo = n0 if CAUSAL else 0  # causal: queries before the key block see none of it
    per_head = (seqlen - q_lo + STEP - 1) // STEP  # the last step may end past L
    return bh // n_heads_k, bh % n_heads_k, n0, q_lo, per_head, per_head * n_groups


@gluon.jit
def _q_block(i, per_head, n0, q_lo, STEP: gl.constexpr, CAUSAL: gl.constexpr):
    """First query of step ``i`` of a head: causal from the diagonal on (the first 128 queries cross it),
    otherwise from the key block's own query block, wrapping around."""
    if CAUSAL:
        return q_lo + i * STEP
    else:
        return ((i + n0 // STEP) % per_head) * STEP


@gluon.jit
def _red_add(ptrs, vals):
    """``*ptrs += vals`` (fp32, relaxed, no result), 4 neighbouring elements of a thread per instruction: sm90's
    ``red.global.add.v4.f32``, which Triton 3.6 does not emit for ``gl.atomic_add`` (4x the instructions)."""
    gl.inline_asm_elementwise(
        "red.relaxed.gpu.global.add.v4.f32 [$4], {$8, $9, $10, $11};\n\t"
        "mov.b32 $0, 0;\n\tmov.b32 $1, 0;\n\tmov.b32 $2, 0;\n\tmov.b32 $3, 0;",
        "=r,=r,=r,=r,l,l,l,l,f,f,f,f", [ptrs.to(gl.int64, bitcast=True), vals], dtype=gl.int32, is_pure=False,
        pack=4)


@gluon.jit
def _reduce(j, problem, dq_out, STEP: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr):
    """D64: the loader's 4 warps add step ``j``'s dQ parts into the fp32 dQ buffer ``[B * L, H * D]``, each
    group's half of the step's queries ([64, D] each). ``dq_out``: (parts [2, 64, D] fp32 in shared memory, the
    buffer's TMA descriptor (D128's), ready, empty, dQ buffer, its row stride)."""
    dq_smem, dq_desc, dq_ready, dq_empty, dq_ptr, dq_stride = dq_out
    WIDTH: gl.constexpr = dq_smem.type.shape[2]
    TPR: gl.constexpr = WIDTH // 4  # threads per row, 4 floats each
    CHUNK: gl.constexpr = 32 // TPR * 4  # rows per pass of the 4 warps
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPR, TPR], [4, 1], [1, 0])
    n_groups, dq_rows_b = problem[2], problem[3]
    cb, row0 = problem[5]
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, STEP, CAUSAL)
    h = hk * n_groups + j // per_head
    q_start = _q_block(j % per_head, per_head, n0, q_lo, STEP, CAUSAL)
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows, 1) * dq_stride + gl.expand_dims(cols, 0)
    # dense: the buffer's rows per batch are L rounded up to 128, where a step's rows past L add their zeros;
    # varlen: they add zeros into the next sequence's rows (P = 0 there), and 128 spare rows follow the last
    base = dq_ptr + (cb * dq_rows_b + row0 + q_start).to(gl.int64) * dq_stride + h * HEAD_DIM
    mbarrier.wait(dq_ready, j & 1)
    for r in gl.static_range(0, _ROWS, CHUNK):
        for g in gl.static_range(2):
            part = dq_smem.index(g).slice(r, CHUNK, 0).load(layout)
            _red_add(base + (g * _ROWS + r) * dq_stride + offs, part)
    mbarrier.arrive(dq_empty, count=1)


@gluon.jit
def _loader(descs, smem, bars, problem, stats, dq_out, CAUSAL: gl.constexpr):
    """4 warps (one issues the copies): K, V once, then Q, dO, LSE and delta of each step into the stage ring;
    at D64, between the loads, the dQ reduction of the step that released its stage (``_reduce``)."""
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready = bars
    lse_smem, delta_smem, lse_desc, delta_desc = stats
    STAGES: gl.constexpr = q_smem.type.shape[0]
    STEP: gl.constexpr = q_smem.type.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[4]
    n_groups = problem[2]
    cb, row0 = problem[5]
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, STEP, CAUSAL)
    mbarrier.expect(kv_ready, 4 * k_desc.block_type.nbytes)
    for g in gl.static_range(2):
        tma_load(k_desc, [cb, hk, row0 + n0 + g * _ROWS, 0], kv_ready, k_smem.index(g))
        tma_load(v_desc, [cb, hk, row0 + n0 + g * _ROWS, 0], kv_ready, v_smem.index(g))
    for j in range(n_steps):
        h = hk * n_groups + j // per_head
        q_start = _q_block(j % per_head, per_head, n0, q_lo, STEP, CAUSAL)
        stage = j % STAGES
        mbarrier.wait(qdo_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(qdo_ready.index(stage), 2 * q_desc.block_type.nbytes + 2 * lse_desc.block_type.nbytes)
        tma_load(q_desc, [cb, h, row0 + q_start, 0], qdo_ready.index(stage), q_smem.index(stage))
        tma_load(do_desc, [cb, h, row0 + q_start, 0], qdo_ready.index(stage), do_smem.index(stage))
        # the LSE and delta per sequence, [B, H, L] (varlen: padded per sequence, the LSE +inf past its end, so
        # that the next sequence's queries, which the Q and dO boxes hold there, get P = 0)
        tma_load(lse_desc, [b, h, q_start], qdo_ready.index(stage), lse_smem.index(stage))
        tma_load(delta_desc, [b, h, q_start], qdo_ready.index(stage), delta_smem.index(stage))
        if STEP != _ROWS:
            if j >= STAGES:
                _reduce(j - STAGES, problem, dq_out, STEP, HEAD_DIM, CAUSAL)
    if STEP != _ROWS:
        for j in range(gl.maximum(n_steps - STAGES, 0), n_steps):
            _reduce(j, problem, dq_out, STEP, HEAD_DIM, CAUSAL)


@gluon.jit
def _step(c, q_start, dq_at, g: gl.constexpr, smem, bars, acc, offs_key, stats, dq_out, qk_scale, dq_scale, zero_s,
          MASKED: gl.constexpr, a_layout: gl.constexpr, dq_layout: gl.constexpr, CAUSAL: gl.constexpr, seqlen):
    """One query block (rows ``q_start`` ..., STEP of them: 64 at D128, 128 at D64) in stage-ring position ``c``;
    returns (dk, dv). ``dq_at``: (batch coordinate, head, the sequence's first row, first dQ column of this group's
    part) in the fp32 buffer's 4D descriptor (D128). ``MASKED``: causal, the block crosses the diagonal; otherwise
    the key block ends past L."""
    k_smem, v_smem, q_smem, do_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready = bars
    lse_smem, delta_smem = stats
    dq_smem, dq_desc, dq_ready, dq_empty = dq_out
    dk, dv = acc
    k_g = _box(k_smem, g)
    v_g = _box(v_smem, g)
    STAGES: gl.constexpr = q_smem.type.shape[0]
    STEP: gl.constexpr = q_smem.type.shape[3]
    dtype: gl.constexpr = q_smem.dtype
    WIDTH: gl.constexpr = q_smem.type.shape[4] * STEP // (2 * _ROWS)  # dQ columns of a group's part
    col_s: gl.constexpr = gl.SliceLayout(0, zero_s.type.layout)
    stage = c % STAGES
    mbarrier.wait(qdo_ready.index(stage), (c // STAGES) & 1)
    q_s = _box(q_smem, stage)
    do_s = _box(do_smem, stage)
    # -- S^T = K_g Q^T and dP^T = V_g dO^T, both issued before the exponentials
    st = warpgroup_mma(k_g, q_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dpt = warpgroup_mma(v_g, do_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(1, deps=[st])  # [64 keys, STEP queries]
    # the LSE and delta came with Q and dO: read here, where they are used, they hold no registers across the
    # products' waits (loaded per thread at the step's start, they pushed the kernel into spills)
    lse2 = _row(lse_smem, stage).load(col_s) * 1.4426950408889634
    pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
    if MASKED:
        if CAUSAL:  # query i sees keys <= i (keys past L are past every query)
            offs_q = q_start + gl.arange(0, STEP, layout=col_s)
            pt = gl.where(gl.expand_dims(offs_key, 1) <= gl.expand_dims(offs_q, 0), pt, 0.0)
        else:  # keys past L: zero K rows, whose P (exp of -LSE) could overflow and reach dQ as inf * 0
            pt = gl.where(gl.expand_dims(offs_key, 1) < seqlen, pt, 0.0)
    dpt = warpgroup_mma_wait(0, deps=[dpt])
    delta = _row(delta_smem, stage).load(col_s)
    dst = (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)
    # -- dS^T to shared memory: read back transposed as the A operand of dQ = dS K
    ds_buf = c % 2
    ds_smem.index(ds_buf * 2 + g).store(dst)
    fence_async_shared()
    mbarrier.arrive(ds_ready.index(ds_buf), count=1)
    # -- dV_g += P^T dO, dK_g += dS^T Q (P^T, dS^T as A operands from registers) and dQ = dS K
    pt16 = gl.convert_layout(pt.to(dtype), a_layout)
    dst16 = gl.convert_layout(dst, a_layout)
    zero_q = gl.zeros([_ROWS, WIDTH], gl.float32, dq_layout)
    if STEP == _ROWS:
        dv = warpgroup_mma(pt16, do_s, dv, is_async=True)
        dk = warpgroup_mma(dst16, q_s, dk, is_async=True)
        # D128: dK/dV's products finish first: their register operands (P^T, dS^T) die before dQ's accumulator lives
        dv, dk = warpgroup_mma_wait(0, deps=[dv, dk])
        mbarrier.arrive(qdo_empty.index(stage), count=1)
        mbarrier.wait(ds_ready.index(ds_buf), (c // 2) & 1)  # the other group's dS^T is there too
        # dQ[:, g-th half] = dS K[:, g-th half] over both groups' keys
        dq = warpgroup_mma(ds_smem.index(ds_buf * 2).permute((1, 0)), _box(k_smem, 0).slice(g * WIDTH, WIDTH, 1),
                           zero_q, use_acc=False, is_async=True)
        dq = warpgroup_mma(ds_smem.index(ds_buf * 2 + 1).permute((1, 0)), _box(k_smem, 1).slice(g * WIDTH, WIDTH, 1),
                           dq, is_async=True)
        dq = warpgroup_mma_wait(0, deps=[dq])
    else:
        # D64, FlashAttention-3's order: dV, then dQ (its queries g*64 .. over both groups' keys), then dK, which
        # runs while dQ's part goes to shared memory
        dv = warpgroup_mma(pt16, do_s, dv, is_async=True)
        mbarrier.wait(ds_ready.index(ds_buf), (c // 2) & 1)  # the other group's dS^T is there too
        dq = warpgroup_mma(ds_smem.index(ds_buf * 2).slice(g * _ROWS, _ROWS, 1).permute((1, 0)), _box(k_smem, 0),
                           zero_q, use_acc=False, is_async=True)
        dq = warpgroup_mma(ds_smem.index(ds_buf * 2 + 1).slice(g * _ROWS, _ROWS, 1).permute((1, 0)),
                           _box(k_smem, 1), dq, is_async=True)
        dk = warpgroup_mma(dst16, q_s, dk, is_async=True)
        dv, dq = warpgroup_mma_wait(1, deps=[dv, dq])
    if STEP == _ROWS:
        # -- D128: the fp32 part added into the buffer by TMA, in two boxes of 32 columns (a 128-byte swizzle
        # spans 32 floats): its columns split in registers, where bit 5 of a column is a register index of the
        # wgmma layout
        half0, half1 = gl.split(gl.permute(gl.reshape(dq * dq_scale, [_ROWS, 2, WIDTH // 2]), (0, 2, 1)))
        tma.store_wait(0)  # the previous step's reduction has read the buffers
        _box(dq_smem, 2 * g).store(half0)
        _box(dq_smem, 2 * g + 1).store(half1)
        fence_async_shared()
        # rows past L fall outside the descriptor: TMA drops them
        _tma_add(dq_desc, [dq_at[0], dq_at[1], dq_at[2] + q_start, dq_at[3]], dq_smem.index(2 * g))
        _tma_add(dq_desc, [dq_at[0], dq_at[1], dq_at[2] + q_start, dq_at[3] + WIDTH // 2], dq_smem.index(2 * g + 1))
    else:
        # -- D64: the fp32 part to shared memory, for the loader's atomics
        mbarrier.wait(dq_empty, (c & 1) ^ 1)
        dq_smem.index(g).store(dq * dq_scale)
        mbarrier.arrive(dq_ready, count=1)
        dk = warpgroup_mma_wait(0, deps=[dk])
        mbarrier.arrive(qdo_empty.index(stage), count=1)
    return dk, dv


@gluon.jit
def _consume(g: gl.constexpr, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    """4 warps: keys n0 + g*64 ... of this program, every query block of every head of the group (64-query steps
    at D128, 128-query steps at D64), then dK and dV out through K/V's buffers and TMA stores."""
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready = bars
    dq_smem = dq_out[0]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[4]
    STEP: gl.constexpr = q_smem.type.shape[3]
    HALF: gl.constexpr = HEAD_DIM * STEP // (2 * _ROWS)  # dQ columns of a group's part
    dtype: gl.constexpr = q_smem.dtype
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, STEP, CAUSAL)
    cb, row0 = problem[5]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, STEP, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HALF, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([_ROWS, STEP], gl.float32, s_layout)
    acc = (gl.zeros([_ROWS, HEAD_DIM], gl.float32, o_layout), gl.zeros([_ROWS, HEAD_DIM], gl.float32, o_layout))
    offs_key = n0 + g * _ROWS + gl.arange(0, _ROWS, layout=gl.SliceLayout(1, s_layout))
    stats = (stats[0], stats[1])
    dq_out = (dq_out[0], dq_out[1], dq_out[2], dq_out[3])
    seqlen, n_groups = problem[0], problem[2]
    # the masked steps: causal, the query blocks of a head that cross the diagonal (the first ones, which also
    # hold every query of a key block that ends past L); otherwise all steps of a key block that ends past L
    if CAUSAL:
        n_diag = gl.minimum(2 * _ROWS // STEP, per_head)
    else:
        n_diag = per_head * (n0 + 2 * _ROWS > seqlen).to(gl.int32)
    mbarrier.wait(kv_ready, 0)
    c = 0
    for hh in range(n_groups):
        h = hk * n_groups + hh
        for i in range(0, n_diag):
            q_start = _q_block(i, per_head, n0, q_lo, STEP, CAUSAL)
            acc = _step(c, q_start, (cb, h, row0, g * HALF), g, smem, bars, acc, offs_key, stats, dq_out, qk_scale,
                        sm_scale, zero_s, True, a_layout, dq_layout, CAUSAL, seqlen)
            c += 1
        for i in range(n_diag, per_head):
            q_start = _q_block(i, per_head, n0, q_lo, STEP, CAUSAL)
            acc = _step(c, q_start, (cb, h, row0, g * HALF), g, smem, bars, acc, offs_key, stats, dq_out, qk_scale,
                        sm_scale, zero_s, False, a_layout, dq_layout, CAUSAL, seqlen)
            c += 1
    dk, dv = acc
    # the other group may still read this group's keys for its dQ: both pass one more turn first
    mbarrier.arrive(ds_ready.index(c % 2), count=1)
    mbarrier.wait(ds_ready.index(c % 2), (c // 2) & 1)
    dk16 = (dk * sm_scale).to(dtype)
    dv16 = dv.to(dtype)
    if n0 + 2 * _ROWS > seqlen:
        # a key block that ends past the sequence: stored from registers, masked (varlen: the rows past the end are
        # the next sequence's; dense: TMA would drop them as well). A condition on VARLEN here broke the dense
        # specialization's lowering on Triton 3.6 (constexprs reach the partitions as runtime values)
        dkv_ptr, dkv_stride, first = problem[6]
        rows = g * _ROWS + gl.arange(0, _ROWS, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        offs = first + gl.expand_dims(rows.to(gl.int64) * dkv_stride, 1) + gl.expand_dims(cols, 0)
        keep = gl.expand_dims(n0 + rows < seqlen, 1)
        gl.store(dkv_ptr[0] + offs, dk16, mask=keep)
        gl.store(dkv_ptr[1] + offs, dv16, mask=keep)
    else:
        _box(k_smem, g).store(dk16)
        _box(v_smem, g).store(dv16)
        fence_async_shared()
        # dense: rows past L (the zero keys') fall outside the descriptors, TMA drops them
        tma_store(dk_desc, [cb, hk, row0 + n0 + g * _ROWS, 0], k_smem.index(g))
        tma_store(dv_desc, [cb, hk, row0 + n0 + g * _ROWS, 0], v_smem.index(g))
        tma.store_wait(0)


# the partitions: constexprs passed through gl.warp_specialize arrive as runtime values, so the tile's constants
# travel in shared-memory shapes and CAUSAL only picks branches
@gluon.jit
def _consumer0(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _consume(0, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL)


@gluon.jit
def _consumer1(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _consume(1, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL)


@gluon.jit
def _loader_partition(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _loader(descs, smem, bars, problem, stats, dq_out, CAUSAL)


# lengths and head counts are plain integers: a new length compiles nothing new
@gluon.jit(do_not_specialize=["seqlen", "n_heads_k", "n_groups", "dq_rows_b", "dkv_strides_b"])
def _bwd_hopper(
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_desc, delta_desc, dq_desc, dq_ptr, dq_stride, dq_rows_b,
    cu_seqlens, dk_ptr, dv_ptr, dkv_strides_b, dkv_stride, dkv_stride_h, seqlen, n_heads_k, n_groups, qk_scale,
    sm_scale, CAUSAL: gl.constexpr, STAGES: gl.constexpr, KEYS_OUTER: gl.constexpr, VARLEN: gl.constexpr,
):
    """q/do_desc: Q and dO ``[B, H, L, D]`` in ``[1, 1, STEP, D]`` boxes (STEP = 64 queries at D128, 128 at D64),
    k/v/dk/dv_desc: K, V, dK and dV ``[B, Hk, L, D]`` in ``[1, 1, 64, D]`` boxes
    (``_hopper_fwd_kernel.box_descriptor``); lse/delta_desc: the fp32 LSE and delta ``[B, H, L]`` in ``[1, 1,
    STEP]`` boxes; dq_ptr: the zeroed fp32 dQ buffer ``[B, dq_rows_b, H, D]`` (L rounded up to 128 rows; rows
    ``dq_stride`` apart; gets scale * dS K added),
    dq_desc the same as ``[B, H, L, D]`` in ``[1, 1, 64, 32]`` boxes (the TMA reduction's, D128); any L;
    qk_scale = scale * log2(e). Grid ``(cdiv(L, 128), B * Hk)``, or ``(B * Hk, cdiv(L, 128))`` with ``KEYS_OUTER``
    (:func:`launch`). ``VARLEN``: Q, dO, K, V, dK, dV and dQ's buffer are the packed ``[total, ...]`` seen as batch
    1 (``L = total`` above), sequence b's tokens ``cu_seqlens[b] ..`` (int32), L in the grid its longest; the LSE
    and delta ``[B, H, L']`` per sequence (:func:`padded_stats`); a program past its sequence's end returns at
    once. A key block that ends past its sequence stores dK / dV from registers
    (``dk_ptr``, ``dv_ptr`` with batch, token and head strides ``dkv_strides_b``, ``dkv_stride``, ``dkv_stride_h``),
    masked. Dense: ``cu_seqlens`` unused."""
    STEP: gl.constexpr = q_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    dtype: gl.constexpr = q_desc.dtype
    if KEYS_OUTER:  # :func:`keys_outer`
        bh, n0 = gl.program_id(0), gl.program_id(1) * (2 * _ROWS)
    else:
        bh, n0 = gl.program_id(1), gl.program_id(0) * (2 * _ROWS)
    if VARLEN:
        start = gl.load(cu_seqlens + bh // n_heads_k)
        seqlen = gl.load(cu_seqlens + bh // n_heads_k + 1) - start
        coords = (0, start)
        if n0 >= seqlen:  # the grid covers the longest sequence
            return
    else:
        coords = (bh // n_heads_k, 0)
    # rings of TMA boxes, [i, 1, 1, rows, D] (``_box`` reads box i as [rows, D])
    k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, _ROWS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, _ROWS, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, STEP, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, STEP, HEAD_DIM], do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, STEP], lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, STEP], delta_desc.layout)
    # dS^T of both groups, double-buffered: [buffer * 2 + group], [64 keys, STEP queries] each
    ds_smem = gl.allocate_shared_memory(dtype, [4, _ROWS, STEP], gl.NVMMASharedLayout.get_default_for(
        [_ROWS, STEP], dtype))
    # the fp32 dQ parts: D128 [group * 2 + box], half of the columns a group in two TMA boxes of 32 columns; D64
    # [group], half of the step's queries a group
    if STEP == _ROWS:
        dq_smem = gl.allocate_shared_memory(gl.float32, [4, 1, 1, _ROWS, dq_desc.block_type.shape[3]],
                                            dq_desc.layout)
    else:
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, _ROWS, HEAD_DIM], gl.SwizzledSharedLayout(4, 1, 8,
                                                                                                    [1, 0]))
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    qdo_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    dq_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(qdo_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)  # both consumer groups release a stage
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)  # both groups' dS^T stored
    mbarrier.init(dq_ready, count=2)  # D64: both groups' dQ parts stored
    mbarrier.init(dq_empty, count=1)  # D64: the loader has read them
    # a last key block stores dK / dV from registers: their pointers, token stride and this block's offset
    first = (coords[0] * dkv_strides_b + (coords[1] + n0) * dkv_stride + (bh % n_heads_k) * dkv_stride_h).to(gl.int64)
    problem = (seqlen, n_heads_k, n_groups, dq_rows_b, (bh, n0), coords, ((dk_ptr, dv_ptr), dkv_stride, first))
    args = ((q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc), (k_smem, v_smem, q_smem, do_smem, ds_smem),
            (kv_ready, qdo_ready, qdo_empty, ds_ready), problem, (lse_smem, delta_smem, lse_desc, delta_desc),
            (dq_smem, dq_desc, dq_ready, dq_empty, dq_ptr, dq_stride), qk_scale, sm_scale, CAUSAL)
    # setmaxnreg, 2 * consumers + loader = 3 * 168, the launch's: the consumers 240 registers a thread, the loader
    # 24. D128: its loader only loads; D64: at 232 the consumers' non-causal loop spilled 7-10 LDL a step, and the
    # loader's reductions reload 5-11 values a step at 24 (FlashAttention-3's split; offline, Triton 3.6)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_loader_partition, args)], [4, 4], [240, 24])


def _stat_descriptor(t, rows: int) -> TensorDescriptor:
    """The fp32 LSE or delta ``[B, H, L]`` (rows 16-byte aligned apart: ``function._new_lse``) in ``[1, 1, rows]``
    boxes, zero past L."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), t.stride(1), 1], [1, 1, rows], _STAT_LAYOUT)


def padded_stats(lse, delta, cu_seqlens, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen: the LSE and delta ``[H, total]`` as ``[B, H, L']`` per sequence (L' = the longest rounded up to 128,
    every step's rows), the LSE +inf and delta 0 past each sequence's end: the Q and dO boxes hold the next
    sequence's rows there, whose P is then 0. A few small kernels, no device sync (the total is known here)."""
    batch, total = cu_seqlens.shape[0] - 1, lse.shape[1]
    starts = cu_seqlens[:-1].long()
    seq = torch.repeat_interleave(torch.arange(batch, device=lse.device), cu_seqlens[1:].long() - starts,
                                  output_size=total)
    pos = torch.arange(total, device=lse.device) - starts[seq]
    rows = -(-max_seqlen // BLOCK_N) * BLOCK_N
    lse_p = torch.full((batch, lse.shape[0], rows), float("inf"), device=lse.device, dtype=torch.float32)
    delta_p = torch.zeros_like(lse_p)
    lse_p[seq, :, pos] = lse.t()
    delta_p[seq, :, pos] = delta.t()
    return lse_p, delta_p


def dq_buffer(q, varlen: bool = False) -> torch.Tensor:
    """The zeroed fp32 dQ buffer for ``q`` ``[B, L, H, D]``: ``[B, L', H, D]`` with L rounded up to 128, so that
    the D64 loader's atomics of a last step that ends past L stay in its batch; ``[:, :L]`` is dQ. ``varlen``:
    ``q`` is the packed ``[1, total, H, D]`` and L' = total + 128 (the last sequence's last step)."""
    rows = q.shape[1] + BLOCK_N if varlen else -(-q.shape[1] // BLOCK_N) * BLOCK_N
    return torch.zeros((q.shape[0], rows, q.shape[2], q.shape[3]), device=q.device, dtype=torch.float32)


MAX_REGISTERS = 168  # 64K registers over the three warpgroups
# causal with at most this many (batch, kv head) pairs and L (varlen: the longest sequence) up to the head dim's
# bound: programs numbered key block outer (:func:`keys_outer`); at D128 only with 2 query heads a kv head
KEYS_OUTER_MAX_HEADS = 32
KEYS_OUTER_MAX_SEQLEN = {64: 12288, 128: 8192}
KEYS_OUTER_D128_GROUP = 2


def tile_rows(head_dim: int) -> dict:
    """Rows of each descriptor's tile. A step takes FlashAttention-3's sm90 tile: 64 queries x 128 keys at D128,
    128 x 128 at D64 (the 64-query step left the D64 consumers no faster than the portable backward: LOG, seventh
    session), so Q, dO, the LSE and delta come in tiles of 64 or 128 rows; K, V, dK and dV per group, [64, D]."""
    step = BLOCK_N if head_dim == 64 else ROWS
    return {"q_desc": step, "do_desc": step, "k_desc": ROWS, "v_desc": ROWS, "dk_desc": ROWS, "dv_desc": ROWS,
            "lse_desc": step, "delta_desc": step}


def launch_args(*, q, k, v, do, dk, dv, lse, delta, dq_acc, softmax_scale, causal, stages, cu_seqlens=None,
                max_seqlen=None) -> dict:
    """The kernel's keyword arguments (descriptors built here) and launch options; ``dq_acc`` from
    :func:`dq_buffer`. Varlen (``cu_seqlens``, int32, and ``max_seqlen``): the packed tensors as batch 1
    (``[1, total, H, D]``), the LSE and delta from :func:`padded_stats`."""
    tiles = tile_rows(q.shape[-1])
    seqlen = q.shape[1]
    varlen = cu_seqlens is not None
    return dict(
        q_desc=box_descriptor(q, tiles["q_desc"]), do_desc=box_descriptor(do, tiles["do_desc"]),
        k_desc=box_descriptor(k, tiles["k_desc"]), v_desc=box_descriptor(v, tiles["v_desc"]),
        dk_desc=box_descriptor(dk, tiles["dk_desc"]), dv_desc=box_descriptor(dv, tiles["dv_desc"]),
        lse_desc=_stat_descriptor(lse, tiles["lse_desc"]), delta_desc=_stat_descriptor(delta, tiles["delta_desc"]),
        # D128's TMA reduction: the buffer's first L rows of each batch, in boxes of 32 columns (a 128-byte swizzle)
        dq_desc=TensorDescriptor(dq_acc, [q.shape[0], q.shape[2], seqlen, q.shape[3]], [dq_acc.stride(0),
                                 dq_acc.stride(2), dq_acc.stride(1), 1], [1, 1, ROWS, 32],
                                 box_layout((1, 1, ROWS, 32), torch.float32)),
        dq_ptr=dq_acc, dq_stride=dq_acc.stride(1), dq_rows_b=dq_acc.shape[1],
        cu_seqlens=cu_seqlens if varlen else torch.empty(1, dtype=torch.int32, device=q.device), dk_ptr=dk, dv_ptr=dv,
        dkv_strides_b=dk.stride(0), dkv_stride=dk.stride(1), dkv_stride_h=dk.stride(2),
        seqlen=max_seqlen if varlen else seqlen, n_heads_k=k.shape[2], n_groups=q.shape[2] // k.shape[2],
        qk_scale=softmax_scale * 1.4426950408889634, sm_scale=softmax_scale, CAUSAL=causal, STAGES=stages,
        KEYS_OUTER=keys_outer(q, k, causal, _batch(q, cu_seqlens), max_seqlen if varlen else None), VARLEN=varlen,
        num_warps=4, maxnreg=MAX_REGISTERS,
    )  # fmt: skip


def _batch(q, cu_seqlens) -> int:
    """Sequences of a call: ``q``'s batch, or varlen (``q`` the packed batch 1) those of ``cu_seqlens``."""
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def keys_outer(q, k, causal: bool, batch: int | None = None, seqlen: int | None = None) -> bool:
    """Whether the programs are numbered key block outer, (batch, kv head) inner. Causal, a key block's walk is
    as long as the queries after it, so in the default order (key blocks inner) the first, longest block of a late
    (batch, kv head) starts near the end and runs on alone: with 8-32 pairs the other order, longest blocks
    first, read 1.07-1.14x (GQA 32/8 D64 causal at 4k and 8k; H100, LOG ninth session) and 1.10x at 12k (fourteenth
    session). With 64 or 128 pairs it read 0.64-0.93x: the programs running at once then read one key block of as
    many heads, and their Q and dO no longer come from L2. From 16k the lone last walk is a small part of the call
    and key blocks inner read 1.01-1.07x the other order even with 8-32 pairs (D64 and D128, 16k and 32k; H100,
    thirteenth session). At D128 (the kernel with dQ's TMA reduction, fourteenth session) the outer order read
    ahead only with 2 query heads a kv head (GQA 16/8 causal 4k / 8k: 1.07x / 1.10x; 32/16 at 8k: even): with 4
    (GQA 32/8) key blocks inner read 1.22x / 1.16x / 1.06x at 4k / 8k / 12k, with 1 (MHA) 1.06x at 8k.
    ``batch``: the sequences (varlen), else ``q``'s batch; ``seqlen``: the longest (varlen), else ``q``'s L."""
    head_dim, group = q.shape[-1], q.shape[2] // k.shape[2]
    if not causal or (head_dim == 128 and group != KEYS_OUTER_D128_GROUP):
        return False
    pairs = (batch or q.shape[0]) * k.shape[2]
    return pairs <= KEYS_OUTER_MAX_HEADS and (seqlen or q.shape[1]) <= KEYS_OUTER_MAX_SEQLEN[head_dim]


def launch(**kwargs):
    """One program per (128-key block, batch, kv head), numbered as :func:`keys_outer` says (the arguments'
    ``KEYS_OUTER``). Arguments as :func:`launch_args`."""
    args = launch_args(**kwargs)
    grid = (-(-args["seqlen"] // BLOCK_N), _batch(kwargs["q"], kwargs.get("cu_seqlens")) * args["n_heads_k"])
    _bwd_hopper[grid[::-1] if args["KEYS_OUTER"] else grid](**args)
