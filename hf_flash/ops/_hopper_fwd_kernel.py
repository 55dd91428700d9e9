"""Gluon kernel of the Hopper forward and its launch (imported by ``hopper_fwd`` only where Triton has Gluon).

A program computes one tile: ``GROUPS * SPLIT_M`` query rows of one (batch, head) (``GROUPS`` consumer groups of
64 rows: 2 at D128, 3 at D64, as FlashAttention-3 splits them). Tiles are numbered in groups of ``head_group``
(batch, head) pairs, and within a group heaviest first (causal: the last query blocks, which see the most keys,
all heads of the group for one block before the next), so the short tiles fill the tail. The programs running at
once then share the K/V of few heads, which L2 serves (all heads of one block first had every program stream its
own K/V from DRAM at short L). Partitions of a program (``gl.warp_specialize``):

* loader (one warpgroup, one warp of it busy): K and V blocks into a ring of ``STAGES`` shared-memory stages
  (each stage waits until every consumer group has released it), and Q's 64-row parts after the first K/V block;
* ``GROUPS`` consumers, 4 warps each: rows ``g * 64 .. g * 64 + 63``, ``S = Q K^T`` and ``O += P V`` with
  ``wgmma`` (P from registers), the online softmax between; the O tile leaves through Q's buffer and a TMA
  store. A group whose rows start at or past the sequence's end (the last tile when ``L`` is not a multiple
  of the tile) only releases the stages. Two groups (D128) take turns to issue their products, FlashAttention-3's
  ping-pong (:func:`_turn`): one group's softmax runs while the other's products do (H100, fourteenth session:
  causal 1.07-1.15x the forward without it at 4k-16k, non-causal 1.04-1.09x at 4k-8k and 0.99-1.06x at 16k;
  three groups at D64 keep the tensor cores fed without it).

Any L: Q, K, V and O are read through 4D descriptors ``[B, H, L, D]`` in boxes of one (batch, head)
(:func:`box_descriptor`), so TMA zero-fills a box's rows past L; the keys past L are masked in the last key block
(causal: past every query already), and a group whose rows end past L stores its O rows and LSE masked. Varlen
(packed sequences): the packed batch is one sequence of ``total`` rows to the descriptors, each tile's rows
offset by its sequence's start; past a sequence's end come the next one's rows, not zeros, which the same masks
keep out (its keys from the scores, its rows from the stores).

Shapes in comments: ``[rows, columns]`` of one consumer group (SPLIT_M = 64 rows).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Triton 3.9 renamed the TMA copies (3.6 has only the old names, 3.9 only the new)
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.jit
def _box(ring, i):
    """Box ``i`` of a ring of TMA boxes ``[n, 1, 1, rows, cols]`` as the ``[rows, cols]`` tile the products read
    (the backward kernel's too)."""
    return ring.index(i).reshape([ring.type.shape[3], ring.type.shape[4]])


# named barriers of the consumer groups' turns (:func:`_turn`): above the ones Triton's warp specialization reserves
# (the default group, start, end, one per partition)
TURN_BARRIER = gl.constexpr(12)


@gluon.jit
def _turn(group, ARRIVE: gl.constexpr):
    """FlashAttention-3's ping-pong of two consumer groups: the group whose turn it is issues its products, the
    other does its softmax meanwhile. ``ARRIVE``: give group ``group`` the turn (``bar.arrive``, non-blocking);
    else wait for this group's turn (``bar.sync`` on group ``group``'s barrier). A barrier completes at 256 threads:
    its group's 128 waiting and the other group's 128 arriving. Inline PTX, one instruction a thread (a [128]
    tensor over the partition's 4 warps)."""
    ids = gl.full([128], TURN_BARRIER + group, gl.int32, gl.BlockedLayout([1], [32], [4], [0]))
    op: gl.constexpr = "bar.arrive" if ARRIVE else "bar.sync"
    gl.inline_asm_elementwise(op + " $1, 256;\n\tmov.u32 $0, $1;", "=r,r", [ids], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _lead(seqlen, TILE_M: gl.constexpr, SPLIT_M: gl.constexpr):
    """Causal: rows by which the tiles start before the sequence, so that the last one ends at its end (to within a
    group). The tile that L leaves partly empty is then the first, which sees one key block, not the last, which
    sees them all: at D64 (192-row tiles) and L = 4096 the last tile had 1 of its 3 groups at work through 32 key
    blocks. Whole groups (``SPLIT_M``), so that a group's rows are all before the start or none are."""
    return (gl.cdiv(seqlen, TILE_M) * TILE_M - seqlen) // SPLIT_M * SPLIT_M


@gluon.jit
def _tile(t, seqlen, n_heads, n_groups, n_bh, head_group, TILE_M: gl.constexpr):
    """Tile ``t`` (``TILE_M`` query rows, ``seqlen``: the longest sequence): its batch, head, K/V head and first
    query. Tiles come in groups of ``head_group`` (batch, head) pairs (the last group may be smaller), heaviest
    query block first within a group."""
    n_m = gl.cdiv(seqlen, TILE_M)
    group = t // (head_group * n_m)
    first_bh = group * head_group
    size = gl.minimum(head_group, n_bh - first_bh)
    within = t - group * (head_group * n_m)
    pid_m = n_m - 1 - within // size
    bh = first_bh + within % size
    h = bh % n_heads
    return bh // n_heads, h, h // n_groups, pid_m * TILE_M


@gluon.jit
def _loader(descs, smem, bars, problem, CAUSAL: gl.constexpr):
    """1 warp: K and V block by block into the stage ring, Q's 64-row parts after the first block."""
    q_desc, k_desc, v_desc = descs[0], descs[1], descs[2]
    q_smem, k_smem, v_smem = smem
    q_ready, k_ready, v_ready, kv_empty = bars
    SPLIT_M: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    GROUPS: gl.constexpr = q_smem.type.shape[0]
    cb, row0, h, hk, q_start, n_blocks = problem[1], problem[2], problem[3], problem[4], problem[5], problem[6]
    for j in range(n_blocks):
        stage = j % STAGES
        # a fresh mbarrier counts as having completed phase 1: the first round does not wait
        mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma_load(k_desc, [cb, hk, row0 + j * BLOCK_N, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma_load(v_desc, [cb, hk, row0 + j * BLOCK_N, 0], v_ready.index(stage), v_smem.index(stage))
        if j == 0:
            # Q after the first K/V block, whose load then runs while Q's come in
            for g in gl.static_range(GROUPS):
                mbarrier.expect(q_ready.index(g), q_desc.block_type.nbytes)
                tma_load(q_desc, [cb, h, row0 + q_start + g * SPLIT_M, 0], q_ready.index(g), q_smem.index(g))


@gluon.jit
def _softmax(s, m_i, l_i, k_start, offs_m, seqlen, qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
             s_layout: gl.constexpr):
    """One block's online softmax on S ``[64, BLOCK_N]`` (fp32, wgmma layout): P (fp32), the new running max
    m and sum l (base 2, scaled), and alpha, the factor that rescales the accumulator to the new max.
    ``MASKED``: causal, keys past the row; else keys past ``seqlen`` (the last block when ``BLOCK_N`` does not
    divide L: zero K rows there, whose scores of 0 would count)."""
    BLOCK_N: gl.constexpr = s.type.shape[1]
    if MASKED:
        offs_n = k_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if CAUSAL:
            s = gl.where(gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m, 1), s, -float("inf"))
        else:
            s = gl.where(gl.expand_dims(offs_n < seqlen, 0), s, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    if MASKED:
        m_new = gl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no visible key yet: -inf - -inf = NaN
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _step(j, g: gl.constexpr, q_buf, smem, bars, m_i, l_i, acc, offs_m, seqlen, qk_scale, zero_s,
          MASKED: gl.constexpr, CAUSAL: gl.constexpr, o_layout: gl.constexpr):
    """Key block j (stage-ring position j) of group ``g``: S = Q K_j^T, the softmax, acc += P V_j; the stage is
    released after its two products. Two groups take turns (:func:`_turn`): a group holds the turn from its P V_j
    through its S of block j + 1, then gives it to the other group and does its softmax."""
    q_smem, k_smem, v_smem = smem
    q_ready, k_ready, v_ready, kv_empty = bars
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[3]
    PINGPONG: gl.constexpr = q_smem.type.shape[0] == 2
    s_layout: gl.constexpr = zero_s.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    stage = j % STAGES
    phase = (j // STAGES) & 1
    mbarrier.wait(k_ready.index(stage), phase)
    s = warpgroup_mma(q_buf, _box(k_smem, stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    if PINGPONG:
        _turn(1 - g, True)
    s = warpgroup_mma_wait(0, deps=[s])  # [64, BLOCK_N]
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, j * BLOCK_N, offs_m, seqlen, qk_scale, MASKED, CAUSAL, s_layout)
    p16 = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    mbarrier.wait(v_ready.index(stage), phase)
    if PINGPONG:
        _turn(g, False)
    acc = warpgroup_mma_wait(0, deps=[warpgroup_mma(p16, _box(v_smem, stage), acc, is_async=True)])  # [64, D]
    mbarrier.arrive(kv_empty.index(stage), count=1)
    return m_i, l_i, acc


@gluon.jit
def _consume(g: gl.constexpr, descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL: gl.constexpr):
    """4 warps (one warpgroup): rows g * 64 ... g * 64 + 63 of the program's tile."""
    o_desc = descs[3]
    q_smem, k_smem, v_smem = smem
    q_ready, k_ready, v_ready, kv_empty = bars
    SPLIT_M: gl.constexpr = q_smem.type.shape[3]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[3]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[4]
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    zero_s = gl.zeros([SPLIT_M, BLOCK_N], gl.float32, s_layout)
    q_buf = _box(q_smem, g)
    seqlen, cb, row0, h, q_start, n_blocks, lse_off = (problem[0], problem[1], problem[2], problem[3], problem[5],
                                                       problem[6], problem[7])
    first = q_start + g * SPLIT_M  # the group's first row in its sequence
    # the blocks that every row of the group sees in full (no mask); causal: up to the group's first row
    if CAUSAL:
        n_full = gl.minimum((first + 1) // BLOCK_N, n_blocks)
    else:
        n_full = seqlen // BLOCK_N
    PINGPONG: gl.constexpr = q_smem.type.shape[0] == 2
    if PINGPONG:
        # a group holds the turn while it waits for its next K block: with one stage that block waits for the other
        # group's release, which waits for the turn (benchmarks/experiments/pingpong_protocol.py)
        gl.static_assert(STAGES >= 2, "the groups' turns need 2 K/V stages")
        # group 0 takes the first turn; every group waits for its turn before its first S, and gives the turn on
        # after its last P V (the steps in between pass it on, :func:`_step`)
        if g == 0:
            _turn(0, True)
        _turn(g, False)
    mbarrier.wait(q_ready.index(g), 0)
    if (first >= 0) & (first < seqlen):
        offs_m = first + gl.arange(0, SPLIT_M, layout=row_s)
        m_i = gl.full([SPLIT_M], -float("inf"), gl.float32, row_s)
        l_i = gl.full([SPLIT_M], 0.0, gl.float32, row_s)
        acc = gl.zeros([SPLIT_M, HEAD_DIM], gl.float32, o_layout)
        # -- the blocks every row of the group sees in full, then those that cross the causal diagonal (or the
        # sequence's end)
        for j in range(0, n_full):
            m_i, l_i, acc = _step(j, g, q_buf, smem, bars, m_i, l_i, acc, offs_m, seqlen, qk_scale, zero_s, False,
                                  CAUSAL, o_layout)
        for j in range(n_full, n_blocks):
            m_i, l_i, acc = _step(j, g, q_buf, smem, bars, m_i, l_i, acc, offs_m, seqlen, qk_scale, zero_s, True,
                                  CAUSAL, o_layout)
        if PINGPONG:  # the other group's last P V need not wait for this group's epilogue
            _turn(1 - g, True)
        # -- O = acc / l; LSE = (m + log2 l) / log2(e). Every row sees a key (Lq == Lk), so l > 0; the guard keeps
        # the portable forward's convention (O = 0, LSE = +inf) should one not
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
        lse = gl.where(l_i == 0.0, float("inf"), (m_i + gl.log2(l_safe)) / 1.4426950408889634)
        gl.store(lse_ptr + lse_off + g * SPLIT_M + gl.arange(0, SPLIT_M, layout=row_s), lse, mask=offs_m < seqlen)
        if first + SPLIT_M > seqlen:
            # rows past the sequence's end: varlen, the next sequence's, so O goes from registers, masked (dense,
            # TMA would drop them; a condition on VARLEN here is a runtime value in a partition)
            o_ptr, o_stride, o_off = problem[8]
            rows = first + gl.arange(0, SPLIT_M, layout=gl.SliceLayout(1, o_layout))
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            offs = o_off + gl.expand_dims(rows.to(gl.int64) * o_stride, 1) + gl.expand_dims(cols, 0)
            gl.store(o_ptr + offs, out.to(dtype), mask=gl.expand_dims(rows < seqlen, 1))
        else:
            # Q's buffer is free once every block is done: it carries O to the TMA store
            q_buf.store(out.to(dtype))
            fence_async_shared()
            tma_store(o_desc, [cb, h, row0 + first, 0], q_smem.index(g))
            tma.store_wait(0)
    else:
        # rows all past the end (or, causal, before the start: :func:`_lead`): nothing to compute or store, but
        # every stage waits for all groups, so release each once it has arrived
        for j in range(n_blocks):
            mbarrier.wait(k_ready.index(j % STAGES), (j // STAGES) & 1)
            if PINGPONG:  # the turns as a computing group takes them, so that the other group's go on
                _turn(1 - g, True)
                _turn(g, False)
            mbarrier.arrive(kv_empty.index(j % STAGES), count=1)
        if PINGPONG:
            _turn(1 - g, True)


@gluon.jit
def _consumer0(descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL: gl.constexpr):
    _consume(0, descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL)


@gluon.jit
def _consumer1(descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL: gl.constexpr):
    _consume(1, descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL)


@gluon.jit
def _consumer2(descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL: gl.constexpr):
    _consume(2, descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL)


@gluon.jit
def _loader_partition(descs, smem, bars, problem, lse_ptr, qk_scale, CAUSAL: gl.constexpr):
    _loader(descs, smem, bars, problem, CAUSAL)


@gluon.jit
def _fwd_hopper(
    q_desc, k_desc, v_desc, o_desc, lse_ptr, cu_seqlens, o_ptr, o_strides_b, o_stride, o_stride_h, seqlen, n_heads,
    n_groups, n_bh, stride_lb, stride_lh, qk_scale, head_group, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
    GROUPS: gl.constexpr, VARLEN: gl.constexpr,
):
    """q/o_desc: Q and O ``[B, H, L, D]`` in ``[1, 1, SPLIT_M, D]`` boxes, k/v_desc: K and V ``[B, Hk, L, D]`` in
    ``[1, 1, BLOCK_N, D]`` boxes (:func:`box_descriptor`); lse: fp32 with (batch, head) strides ``stride_lb,
    stride_lh``; n_bh = B * H; qk_scale = softmax scale * log2(e); any L; head_group: (batch, head) pairs whose
    tiles are numbered together (module docstring). Grid ``(cdiv(L, GROUPS * SPLIT_M) * B * H,)``, one program a
    tile. ``VARLEN``: Q, K, V and O are the packed ``[total, ...]`` seen as batch 1 (``L = total`` above),
    sequence b's tokens ``cu_seqlens[b] ..`` (int32), ``seqlen`` its longest and B the sequences; the LSE ``[H,
    total]`` (``stride_lh``); a tile past its sequence's end returns at once. A group whose rows end past its
    sequence stores O from registers (``o_ptr`` with batch, token and head strides ``o_strides_b``,
    ``o_stride``, ``o_stride_h``), masked. Dense: ``cu_seqlens`` unused."""
    SPLIT_M: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[3]
    dtype: gl.constexpr = k_desc.dtype
    b, h, hk, q_start = _tile(gl.program_id(0), seqlen, n_heads, n_groups, n_bh, head_group, GROUPS * SPLIT_M)
    if VARLEN:
        row0 = gl.load(cu_seqlens + b)  # the sequence's first row in the packed batch
        seqlen = gl.load(cu_seqlens + b + 1) - row0
    if CAUSAL:
        q_start -= _lead(seqlen, GROUPS * SPLIT_M, SPLIT_M)
    if VARLEN:
        if q_start >= seqlen:  # the grid covers the longest sequence (the lead keeps its tiles past the end)
            return
        cb = 0  # the descriptors' batch coordinate
        lse_off = h.to(gl.int64) * stride_lh + row0 + q_start
        o_off = h.to(gl.int64) * o_stride_h + row0.to(gl.int64) * o_stride
    else:
        row0 = 0
        cb = b
        lse_off = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_start
        o_off = b.to(gl.int64) * o_strides_b + h.to(gl.int64) * o_stride_h
    if CAUSAL:
        n_blocks = gl.cdiv(gl.minimum(seqlen, q_start + GROUPS * SPLIT_M), BLOCK_N)
    else:
        n_blocks = gl.cdiv(seqlen, BLOCK_N)
    # rings of TMA boxes, [i, 1, 1, rows, D] (``_box`` reads box i as [rows, D])
    q_smem = gl.allocate_shared_memory(dtype, [GROUPS, 1, 1, SPLIT_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [GROUPS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for g in gl.static_range(GROUPS):
        mbarrier.init(q_ready.index(g), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=GROUPS)  # every consumer group releases a stage
    # a group whose rows end past the sequence stores O from registers: its pointer, token stride and the
    # sequence's offset (o_off above)
    problem = (seqlen, cb, row0, h, hk, q_start, n_blocks, lse_off, (o_ptr, o_stride, o_off))
    args = ((q_desc, k_desc, v_desc, o_desc), (q_smem, k_smem, v_smem), (q_ready, k_ready, v_ready, kv_empty),
            problem, lse_ptr, qk_scale, CAUSAL)
    # setmaxnreg: the loader's warpgroup drops to 24 registers a thread, the consumers take the rest of the
    # SM's 64K (FlashAttention-3's split: 2 groups 240, 3 groups 160; the launch's maxnreg is what all start at)
    if GROUPS == 3:
        gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_consumer2, args), (_loader_partition, args)],
                           [4, 4, 4], [160, 160, 24])
    else:
        gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_loader_partition, args)], [4, 4], [240, 24])


@functools.lru_cache(maxsize=None)
def box_layout(block: tuple, dtype: torch.dtype):
    """The default swizzled shared-memory layout of a TMA box ``block`` of ``dtype``. Cached: a launch builds up to
    9 descriptors, and deriving the layout was most of their host time (~15 us each on a CI core, profiled)."""
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def box_descriptor(t, rows: int) -> TensorDescriptor:
    """``t`` ``[B, L, H, D]`` (any strides TMA takes: ``hopper_fwd.plain_dense`` checks them, D contiguous) as
    ``[B, H, L, D]`` in ``[1, 1, rows, D]`` boxes with the default swizzled shared-memory layout: a box is rows of
    one (batch, head), so TMA zero-fills its rows past L and drops them from stores (the backward kernel's
    too)."""
    block = (1, 1, rows, t.shape[3])
    return TensorDescriptor(t, [t.shape[0], t.shape[2], t.shape[1], t.shape[3]],
                            [t.stride(0), t.stride(2), t.stride(1), 1], list(block), box_layout(block, t.dtype))


def max_registers(groups: int) -> int:
    """The launch's registers a thread: all of the 64K that ``groups`` consumer warpgroups and the loader's share."""
    return 65536 // (128 * (groups + 1)) // 8 * 8


def launch_args(*, q, k, v, out, lse, qk_scale, causal, tile, head_group, cu_seqlens=None, max_seqlen=None) -> dict:
    """The kernel's keyword arguments (descriptors built here) and its launch options; ``tile``:
    ``hopper_fwd.Tile`` (groups, split_m, block_n, stages). Varlen (``cu_seqlens``, int32, and ``max_seqlen``):
    q, k, v and out the packed tensors as batch 1 (``[1, total, H, D]``), lse ``[H, total]``."""
    varlen = cu_seqlens is not None
    seqlen, n_heads = q.shape[1], q.shape[2]
    batch = cu_seqlens.shape[0] - 1 if varlen else q.shape[0]
    return dict(
        q_desc=box_descriptor(q, tile.split_m), k_desc=box_descriptor(k, tile.block_n),
        v_desc=box_descriptor(v, tile.block_n), o_desc=box_descriptor(out, tile.split_m), lse_ptr=lse,
        cu_seqlens=cu_seqlens if varlen else torch.empty(1, dtype=torch.int32, device=q.device), o_ptr=out,
        o_strides_b=out.stride(0), o_stride=out.stride(1), o_stride_h=out.stride(2),
        seqlen=max_seqlen if varlen else seqlen, n_heads=n_heads, n_groups=n_heads // k.shape[2],
        n_bh=batch * n_heads, stride_lb=0 if varlen else lse.stride(0), stride_lh=lse.stride(-2),
        qk_scale=qk_scale, head_group=head_group, CAUSAL=causal, STAGES=tile.stages, GROUPS=tile.groups,
        VARLEN=varlen, num_warps=4, maxnreg=max_registers(tile.groups),
    )  # fmt: skip


def launch(**kwargs):
    """One program per tile (a persistent grid, one program per SM, measured slower: LOG 2026-12-06).
    Arguments as :func:`launch_args`."""
    args = launch_args(**kwargs)
    tiles = kwargs["tile"].per_head(args["seqlen"]) * args["n_bh"]
    _fwd_hopper[(tiles,)](**args)
