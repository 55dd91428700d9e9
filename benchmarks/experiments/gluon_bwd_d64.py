"""Prototype, not wired in: the Hopper backward at head dim 64 in FlashAttention-3's D64 tile (128 queries x 128
keys a step), where ``hf_flash/ops/_hopper_bwd_kernel.py`` (D128) steps over 64 x 128 and reads no faster than the
portable backward at D64 (LOG, seventh session of 2026-12-06).

    python benchmarks/experiments/gluon_bwd_d64.py                    # check against the portable backward, time
    python benchmarks/experiments/gluon_bwd_d64.py --seqlens 8192,32768 --kv-heads 8 --causal causal

A program owns 128 keys of one (batch, kv head) and walks 128-row query blocks. Partitions:

* loader, 4 warps: K and V once ([128, 64] each), Q, dO, LSE and delta per step into 2 stages, and the dQ
  reductions of the steps that released their stage (as the D128 kernel);
* two consumers, 4 warps each. Group g takes queries g*64 .. g*64+63 of the step against all 128 keys: S^T and
  dP^T ([128 keys, 64 queries], in two 64-key halves), P^T and dS^T to shared memory; its own dQ ([64 queries,
  64], over all keys, from its own dS^T: no exchange); after one mbarrier turn, dV and dK of keys g*64 .. from
  both groups' P^T / dS^T (two products of K = 64 each, A from shared memory). A second turn ("read") lets a
  group overwrite its P^T / dS^T only after the other group has read them (double buffers pass 227 KB).

Offline (Triton 3.6, sm90): 199 KB of shared memory, consumers 232 registers, loops of ~700 instructions a 128 x
128 step with 0-3 LDL (the whole [128, 64] S^T and dP^T at once spilled 12-29), the loader's 1-2 at 40 registers.
Untimed.

Limits (asserted): dense [B, L, H, D] contiguous, D = 64, L a multiple of 128, Lq == Lk, causal or not, bf16.
Each line: ``benchmarks/hopper_bwd_speed.py``'s (hidden 2048: 32 heads), the gradients' largest difference from the
portable backward's included. Run from the checkout's root with ``PYTHONPATH=$PWD``.
"""

from __future__ import annotations

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from benchmarks.hopper_bwd_speed import time_case
from hf_flash.ops._hopper_bwd_kernel import _red_add, _stat_descriptor
from hf_flash.ops._hopper_fwd_kernel import descriptor, tma_load, tma_store
from hf_flash.ops.backward import flash_delta
from hf_flash.ops.common import TmaLayout

BLOCK = 128  # queries of a step, keys of a program
HALF = 64  # queries of a consumer group
_BLOCK = gl.constexpr(BLOCK)
_HALF = gl.constexpr(HALF)


@gluon.jit
def _schedule(problem, CAUSAL: gl.constexpr):
    """(batch, kv head, n0, q_lo, steps per head, steps). ``problem``: (seqlen, n_heads_k, n_groups, stat_stride)."""
    seqlen, n_heads_k, n_groups = problem[0], problem[1], problem[2]
    bh = gl.program_id(1)
    n0 = gl.program_id(0) * _BLOCK
    q_lo = n0 if CAUSAL else 0
    per_head = (seqlen - q_lo) // _BLOCK
    return bh // n_heads_k, bh % n_heads_k, n0, q_lo, per_head, per_head * n_groups


@gluon.jit
def _q_block(i, per_head, n0, q_lo, CAUSAL: gl.constexpr):
    if CAUSAL:
        return q_lo + i * _BLOCK
    else:
        return ((i + n0 // _BLOCK) % per_head) * _BLOCK


@gluon.jit
def _reduce(j, problem, dq_out, CAUSAL: gl.constexpr):
    """Step ``j``'s dQ parts: group g's are the rows g*64 .. of the step's 128 queries, all 64 columns."""
    dq_smem, dq_ready, dq_empty, dq_ptr, dq_stride = dq_out
    CHUNK: gl.constexpr = 8  # rows per pass: 16 threads a row, 4 floats each
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    seqlen, n_groups = problem[0], problem[2]
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, CAUSAL)
    h = hk * n_groups + j // per_head
    q_start = _q_block(j % per_head, per_head, n0, q_lo, CAUSAL)
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, _HALF, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows, 1) * dq_stride + gl.expand_dims(cols, 0)
    base = dq_ptr + (b * seqlen + q_start).to(gl.int64) * dq_stride + h * _HALF
    mbarrier.wait(dq_ready, j & 1)
    for g in gl.static_range(2):
        for r in gl.static_range(0, _HALF, CHUNK):
            part = dq_smem.index(g).slice(r, CHUNK, 0).load(layout)
            _red_add(base + (g * _HALF + r) * dq_stride + offs, part)
    mbarrier.arrive(dq_empty, count=1)


@gluon.jit
def _loader(descs, smem, bars, problem, stats, dq_out, CAUSAL: gl.constexpr):
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem, pt_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready, ds_read = bars
    lse_smem, delta_smem, lse_desc, delta_desc = stats
    STAGES: gl.constexpr = q_smem.type.shape[0]
    seqlen, n_heads_k, n_groups, stat_stride = problem
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, CAUSAL)
    mbarrier.expect(kv_ready, 2 * k_desc.block_type.nbytes)
    tma_load(k_desc, [b * seqlen + n0, hk * _HALF], kv_ready, k_smem)
    tma_load(v_desc, [b * seqlen + n0, hk * _HALF], kv_ready, v_smem)
    for j in range(n_steps):
        h = hk * n_groups + j // per_head
        q_start = _q_block(j % per_head, per_head, n0, q_lo, CAUSAL)
        stage = j % STAGES
        mbarrier.wait(qdo_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(qdo_ready.index(stage), 2 * q_desc.block_type.nbytes + 4 * lse_desc.block_type.nbytes)
        tma_load(q_desc, [b * seqlen + q_start, h * _HALF], qdo_ready.index(stage), q_smem.index(stage))
        tma_load(do_desc, [b * seqlen + q_start, h * _HALF], qdo_ready.index(stage), do_smem.index(stage))
        stat = (b * (n_heads_k * n_groups) + h) * stat_stride + q_start
        for g in gl.static_range(2):  # the LSE/delta descriptors read [64] tiles: two per 128 queries
            tma_load(lse_desc, [stat + g * _HALF], qdo_ready.index(stage), lse_smem.index(stage * 2 + g))
            tma_load(delta_desc, [stat + g * _HALF], qdo_ready.index(stage), delta_smem.index(stage * 2 + g))
        if j >= STAGES:
            _reduce(j - STAGES, problem, dq_out, CAUSAL)
    for j in range(gl.maximum(n_steps - STAGES, 0), n_steps):
        _reduce(j, problem, dq_out, CAUSAL)


@gluon.jit
def _step(c, q_start, g: gl.constexpr, smem, bars, acc, offs_key, stats, dq_out, qk_scale, dq_scale, zero_s,
          zero_q, MASKED: gl.constexpr):
    k_smem, v_smem, q_smem, do_smem, pt_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready, ds_read = bars
    lse_smem, delta_smem = stats
    dq_smem, dq_ready, dq_empty = dq_out
    dk, dv = acc
    STAGES: gl.constexpr = q_smem.type.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    col_s: gl.constexpr = gl.SliceLayout(0, zero_s.type.layout)
    stage = c % STAGES
    mbarrier.wait(qdo_ready.index(stage), (c // STAGES) & 1)
    q_g = q_smem.index(stage).slice(g * _HALF, _HALF, 0)  # [64 queries, 64]
    do_g = do_smem.index(stage).slice(g * _HALF, _HALF, 0)
    # the other group has read last step's P^T / dS^T of this group
    mbarrier.wait(ds_read, (c & 1) ^ 1)
    # -- S^T and dP^T for all 128 keys and this group's 64 queries, one 64-key half at a time: the halves hold
    # half the registers (a [128, 64] S^T and dP^T at once spilled 12-29 LDL a step, Triton 3.6)
    for kh in gl.static_range(2):
        st = warpgroup_mma(k_smem.slice(kh * _HALF, _HALF, 0), q_g.permute((1, 0)), zero_s, use_acc=False,
                           is_async=True)
        dpt = warpgroup_mma(v_smem.slice(kh * _HALF, _HALF, 0), do_g.permute((1, 0)), zero_s, use_acc=False,
                            is_async=True)
        st = warpgroup_mma_wait(1, deps=[st])  # [64 keys, 64 queries]
        lse2 = lse_smem.index(stage * 2 + g).load(col_s) * 1.4426950408889634
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
        if MASKED:
            offs_q = q_start + g * _HALF + gl.arange(0, _HALF, layout=col_s)
            pt = gl.where(gl.expand_dims(offs_key + kh * _HALF, 1) <= gl.expand_dims(offs_q, 0), pt, 0.0)
        pt_smem.index(g).slice(kh * _HALF, _HALF, 0).store(pt.to(dtype))
        dpt = warpgroup_mma_wait(0, deps=[dpt])
        delta = delta_smem.index(stage * 2 + g).load(col_s)
        ds_smem.index(g).slice(kh * _HALF, _HALF, 0).store((pt * (dpt - gl.expand_dims(delta, 0))).to(dtype))
    fence_async_shared()
    mbarrier.arrive(ds_ready, count=1)
    # -- dQ of this group's queries over all keys, from its own dS^T
    dq = warpgroup_mma(ds_smem.index(g).permute((1, 0)), k_smem, zero_q, use_acc=False, is_async=True)
    mbarrier.wait(ds_ready, c & 1)  # both groups' P^T and dS^T are there
    # -- dV, dK of this group's 64 keys over all 128 queries (K = 64 from each group's buffer)
    for h in gl.static_range(2):
        p_rows = pt_smem.index(h).slice(g * _HALF, _HALF, 0)  # [64 keys, 64 queries]
        ds_rows = ds_smem.index(h).slice(g * _HALF, _HALF, 0)
        dv = warpgroup_mma(p_rows, do_smem.index(stage).slice(h * _HALF, _HALF, 0), dv, is_async=True)
        dk = warpgroup_mma(ds_rows, q_smem.index(stage).slice(h * _HALF, _HALF, 0), dk, is_async=True)
    dq, dv, dk = warpgroup_mma_wait(0, deps=[dq, dv, dk])
    mbarrier.arrive(ds_read, count=1)
    mbarrier.arrive(qdo_empty.index(stage), count=1)
    mbarrier.wait(dq_empty, (c & 1) ^ 1)
    dq_smem.index(g).store(dq * dq_scale)
    mbarrier.arrive(dq_ready, count=1)
    return dk, dv


@gluon.jit
def _consume(g: gl.constexpr, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem, pt_smem, ds_smem = smem
    kv_ready, qdo_ready, qdo_empty, ds_ready, ds_read = bars
    dtype: gl.constexpr = q_smem.dtype
    seqlen = problem[0]
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, CAUSAL)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, _HALF, 16])
    zero_s = gl.zeros([_HALF, _HALF], gl.float32, s_layout)
    zero_q = zero_s
    acc = (gl.zeros([_HALF, _HALF], gl.float32, s_layout), gl.zeros([_HALF, _HALF], gl.float32, s_layout))
    offs_key = n0 + gl.arange(0, _HALF, layout=gl.SliceLayout(1, s_layout))  # of the first 64-key half
    stats = (stats[0], stats[1])
    dq_out = (dq_out[0], dq_out[1], dq_out[2])
    n_diag = 1 if CAUSAL else 0  # causal: the first step of a head holds the key block's diagonal
    mbarrier.wait(kv_ready, 0)
    c = 0
    for hh in range(problem[2]):
        for i in range(0, n_diag):
            acc = _step(c, q_lo, g, smem, bars, acc, offs_key, stats, dq_out, qk_scale, sm_scale, zero_s, zero_q,
                        True)
            c += 1
        for i in range(n_diag, per_head):
            acc = _step(c, _q_block(i, per_head, n0, q_lo, CAUSAL), g, smem, bars, acc, offs_key, stats, dq_out,
                        qk_scale, sm_scale, zero_s, zero_q, False)
            c += 1
    dk, dv = acc
    # both groups past their last product on K/V before either overwrites its rows with dK/dV
    mbarrier.arrive(ds_ready, count=1)
    mbarrier.wait(ds_ready, c & 1)
    k_g = k_smem.slice(g * _HALF, _HALF, 0)
    v_g = v_smem.slice(g * _HALF, _HALF, 0)
    k_g.store((dk * sm_scale).to(dtype))
    v_g.store(dv.to(dtype))
    fence_async_shared()
    tma_store(dk_desc, [b * seqlen + n0 + g * _HALF, hk * _HALF], k_g)
    tma_store(dv_desc, [b * seqlen + n0 + g * _HALF, hk * _HALF], v_g)
    tma.store_wait(0)


@gluon.jit
def _consumer0(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _consume(0, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL)


@gluon.jit
def _consumer1(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _consume(1, descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL)


@gluon.jit
def _loader_partition(descs, smem, bars, problem, stats, dq_out, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _loader(descs, smem, bars, problem, stats, dq_out, CAUSAL)


@gluon.jit
def _bwd_d64(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_desc, delta_desc, dq_ptr, dq_stride, seqlen,
             n_heads_k, n_groups, stat_stride, qk_scale, sm_scale, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    """q/do/k/v_desc: [128, 64] tiles of the [B * L, H(k) * 64] views; dk/dv_desc: [64, 64] tiles; lse/delta_desc:
    ``_hopper_bwd_kernel._stat_descriptor``; dq_ptr: fp32 [B * L, H * 64], zeroed. Grid (L / 128, B * Hk)."""
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [_BLOCK, _HALF], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [_BLOCK, _HALF], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK, _HALF], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK, _HALF], do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES * 2, _HALF], lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES * 2, _HALF], delta_desc.layout)
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BLOCK, _HALF], dtype)
    pt_smem = gl.allocate_shared_memory(dtype, [2, _BLOCK, _HALF], pds_layout)  # [group]: [128 keys, 64 queries]
    ds_smem = gl.allocate_shared_memory(dtype, [2, _BLOCK, _HALF], pds_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, _HALF, _HALF], gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qdo_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_read = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(qdo_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)
    mbarrier.init(ds_ready, count=2)
    mbarrier.init(ds_read, count=2)
    mbarrier.init(dq_ready, count=2)
    mbarrier.init(dq_empty, count=1)
    args = ((q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc), (k_smem, v_smem, q_smem, do_smem, pt_smem, ds_smem),
            (kv_ready, qdo_ready, qdo_empty, ds_ready, ds_read), (seqlen, n_heads_k, n_groups, stat_stride),
            (lse_smem, delta_smem, lse_desc, delta_desc), (dq_smem, dq_ready, dq_empty, dq_ptr, dq_stride), qk_scale,
            sm_scale, CAUSAL)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_loader_partition, args)], [4, 4], [232, 40])


def gluon_bwd_d64(do, q, k, v, out, lse, dq, dk, dv, softmax_scale: float, causal: bool, stages: int = 2) -> None:
    """q/do/out/dq [B, L, H, 64], k/v/dk/dv [B, L, Hk, 64] contiguous; lse fp32 [B, H, L] (rows 16-aligned); as
    ``hopper_bwd.flash_bwd_hopper``."""
    batch, seqlen, n_heads, head_dim = q.shape
    assert head_dim == HALF and seqlen % BLOCK == 0 and k.shape[1] == seqlen
    assert all(t.is_contiguous() for t in (q, k, v, do, dk, dv))
    dense = TmaLayout()
    delta = flash_delta(out, do, lse, None, seqlen)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    _bwd_d64[(seqlen // BLOCK, batch * k.shape[2])](
        q_desc=descriptor(q, dense, BLOCK), do_desc=descriptor(do, dense, BLOCK), k_desc=descriptor(k, dense, BLOCK),
        v_desc=descriptor(v, dense, BLOCK), dk_desc=descriptor(dk, dense, HALF), dv_desc=descriptor(dv, dense, HALF),
        lse_desc=_stat_descriptor(lse), delta_desc=_stat_descriptor(delta), dq_ptr=dq_acc,
        dq_stride=n_heads * head_dim, seqlen=seqlen, n_heads_k=k.shape[2], n_groups=n_heads // k.shape[2],
        stat_stride=lse.stride(1), qk_scale=softmax_scale * 1.4426950408889634, sm_scale=softmax_scale,
        CAUSAL=causal, STAGES=stages, num_warps=4, maxnreg=168,
    )
    dq.copy_(dq_acc)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="1024,4096,16384")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--causal", default="both", choices=("both", "causal", "plain"))
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, flush=True)
    for seqlen in map(int, a.seqlens.split(",")):
        for causal in {"both": (False, True), "causal": (True,), "plain": (False,)}[a.causal]:
            print(time_case(causal, seqlen, a.rounds, a.kv_heads, HALF, gluon_bwd_d64, "d64"), flush=True)


if __name__ == "__main__":
    main()
