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
def _loader(descs, smem, bars, problem, CAUSAL: gl.constexpr):
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem = smem
    kv_ready, qdo_ready, qdo_empty = bars
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
        q_row = b * seqlen + q_lo + (j % per_head) * ROWS
        stage = j % STAGES
        mbarrier.wait(qdo_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(qdo_ready.index(stage), 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, h * HEAD_DIM], qdo_ready.index(stage), q_smem.index(stage))
        _tma_load(do_desc, [q_row, h * HEAD_DIM], qdo_ready.index(stage), do_smem.index(stage))


@gluon.jit
def _step(c, q_start, h, k_g, v_g, smem, bars, acc, offs_key, stats, qk_scale, zero_s, MASKED: gl.constexpr,
          a_layout: gl.constexpr):
    """One query block (rows q_start ..., head h) in stage-ring position c; returns (dk, dv)."""
    k_smem, v_smem, q_smem, do_smem = smem
    kv_ready, qdo_ready, qdo_empty = bars
    lse_ptr, delta_ptr, stat_b = stats
    dk, dv = acc
    STAGES: gl.constexpr = q_smem.type.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    col_s: gl.constexpr = gl.SliceLayout(0, zero_s.type.layout)
    stage = c % STAGES
    offs_q = q_start + gl.arange(0, ROWS, layout=col_s)
    stat_off = stat_b + h.to(gl.int64) * stats[3]
    lse2 = gl.load(lse_ptr + stat_off + offs_q) * 1.4426950408889634
    delta = gl.load(delta_ptr + stat_off + offs_q)
    mbarrier.wait(qdo_ready.index(stage), (c // STAGES) & 1)
    q_s = q_smem.index(stage)
    do_s = do_smem.index(stage)
    # -- S^T = K_g Q^T and dP^T = V_g dO^T, both issued before the exponentials
    st = warpgroup_mma(k_g, q_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dpt = warpgroup_mma(v_g, do_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(1, deps=[st])  # [64 keys, 64 queries]
    pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
    if MASKED:  # a block that crosses the causal diagonal: query i sees keys <= i
        pt = gl.where(gl.expand_dims(offs_key, 1) <= gl.expand_dims(offs_q, 0), pt, 0.0)
    dpt = warpgroup_mma_wait(0, deps=[dpt])
    dst = pt * (dpt - gl.expand_dims(delta, 0))
    # -- dV_g += P^T dO, dK_g += dS^T Q (P^T, dS^T as A operands from registers)
    pt16 = gl.convert_layout(pt.to(dtype), a_layout)
    dst16 = gl.convert_layout(dst.to(dtype), a_layout)
    dv = warpgroup_mma(pt16, do_s, dv, is_async=True)
    dk = warpgroup_mma(dst16, q_s, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(0, deps=[dv, dk])
    mbarrier.arrive(qdo_empty.index(stage), count=1)
    return dk, dv


@gluon.jit
def _consume(g: gl.constexpr, descs, smem, bars, problem, stats, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    """4 warps: keys n0 + g*64 ... of this program, every query block of every head of the group."""
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc = descs
    k_smem, v_smem, q_smem, do_smem = smem
    kv_ready, qdo_ready, qdo_empty = bars
    lse_ptr, delta_ptr, stride_lb, stride_lh = stats
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    dtype: gl.constexpr = q_smem.dtype
    seqlen, n_heads_k, n_groups = problem
    b, hk, n0, q_lo, per_head, n_steps = _schedule(problem, CAUSAL)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    zero_s = gl.zeros([ROWS, ROWS], gl.float32, s_layout)
    acc = (gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout), gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout))
    k_g = k_smem.index(g)
    v_g = v_smem.index(g)
    offs_key = n0 + g * ROWS + gl.arange(0, ROWS, layout=row_s)
    stats = (lse_ptr, delta_ptr, b.to(gl.int64) * stride_lb, stride_lh)
    n_diag = 2 if CAUSAL else 0  # causal: the first two query blocks of a head cross the key block's diagonal
    mbarrier.wait(kv_ready, 0)
    c = 0
    for hh in range(n_groups):
        h = hk * n_groups + hh
        for i in range(0, n_diag):
            acc = _step(c, q_lo + i * ROWS, h, k_g, v_g, smem, bars, acc, offs_key, stats, qk_scale, zero_s, True,
                        a_layout)
            c += 1
        for i in range(n_diag, per_head):
            acc = _step(c, q_lo + i * ROWS, h, k_g, v_g, smem, bars, acc, offs_key, stats, qk_scale, zero_s, False,
                        a_layout)
            c += 1
    dk, dv = acc
    # -- out through K/V's buffers (free once every step is done) and TMA stores
    kv_row = b * seqlen + n0 + g * ROWS
    k_g.store((dk * sm_scale).to(dtype))
    v_g.store(dv.to(dtype))
    fence_async_shared()
    _tma_store(dk_desc, [kv_row, hk * HEAD_DIM], k_g)
    _tma_store(dv_desc, [kv_row, hk * HEAD_DIM], v_g)
    tma.store_wait(0)


@gluon.jit
def _consumer0(descs, smem, bars, problem, stats, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _consume(0, descs, smem, bars, problem, stats, qk_scale, sm_scale, CAUSAL)


@gluon.jit
def _consumer1(descs, smem, bars, problem, stats, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _consume(1, descs, smem, bars, problem, stats, qk_scale, sm_scale, CAUSAL)


@gluon.jit
def _loader_partition(descs, smem, bars, problem, stats, qk_scale, sm_scale, CAUSAL: gl.constexpr):
    _loader(descs, smem, bars, problem, CAUSAL)


@gluon.jit
def _dkdv_ws_kernel(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_ptr, delta_ptr, stride_lb, stride_lh,
                    seqlen, n_heads_k, n_groups, qk_scale, sm_scale, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    """Descriptors over the [B * L, H(k) * D] views in [64, D] tiles. Grid (L / 128, B * Hk)."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], do_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qdo_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(qdo_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)  # both consumer groups release a stage
    args = ((q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc), (k_smem, v_smem, q_smem, do_smem),
            (kv_ready, qdo_ready, qdo_empty), (seqlen, n_heads_k, n_groups),
            (lse_ptr, delta_ptr, stride_lb, stride_lh), qk_scale, sm_scale, CAUSAL)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_loader_partition, args)], [4, 4], [240, 24])


def _desc(t):
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    flat = t.view(t.shape[0] * t.shape[1], t.shape[2] * t.shape[3])
    return TensorDescriptor.from_tensor(flat, [_ROWS, t.shape[3]], gl.NVMMASharedLayout.get_default_for(
        [_ROWS, t.shape[3]], dtype))


def gluon_dkdv(q, k, v, do, lse, delta, dk, dv, causal, stages=2):
    """q/do [B, L, H, D], k/v/dk/dv [B, L, Hk, D] contiguous; lse/delta fp32 [B, H, L] (any row stride)."""
    batch, seqlen, n_heads, head_dim = q.shape
    assert seqlen % 128 == 0 and k.shape[1] == seqlen and head_dim in (64, 128)
    grid = (seqlen // 128, batch * k.shape[2])
    scale = 1 / math.sqrt(head_dim)
    _dkdv_ws_kernel[grid](_desc(q), _desc(do), _desc(k), _desc(v), _desc(dk), _desc(dv), lse, delta, lse.stride(0),
                          lse.stride(1), seqlen, k.shape[2], n_heads // k.shape[2], scale * LOG2E, scale,
                          CAUSAL=causal, STAGES=stages, num_warps=4, maxnreg=168)


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


def check(head_dim, causal, kv_heads, stages):
    torch.manual_seed(0)
    batch, seqlen, heads = 2, 1024, 8
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse, delta, dq, dk, dv, do, _ = _portable(q, k, v, causal)
    gdk, gdv = torch.empty_like(dk), torch.empty_like(dv)
    gluon_dkdv(q, k, v, do, lse, delta, gdk, gdv, causal, stages)
    torch.cuda.synchronize()
    # fp32 reference of dK/dV
    qf, kf, vf, dof = (t.float().transpose(1, 2) for t in (q, k, v, do))
    rep = heads // kv_heads
    kf, vf = kf.repeat_interleave(rep, 1).requires_grad_(), vf.repeat_interleave(rep, 1).requires_grad_()
    kf.retain_grad(), vf.retain_grad()
    s = qf @ kf.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    (s.softmax(-1) @ vf).backward(dof)

    def fold(g):  # [B, H, L, D] -> [B, L, Hk, D], summed over each group's heads
        return g.view(batch, kv_heads, rep, seqlen, head_dim).sum(2).transpose(1, 2)

    ok = True
    for name, ours, base, ref in (("dk", gdk, dk, fold(kf.grad)), ("dv", gdv, dv, fold(vf.grad))):
        err, base_err = (ours.float() - ref).abs().max().item(), (base.float() - ref).abs().max().item()
        good = err <= 2 * base_err + 1e-5
        ok &= good
        print(f"check D{head_dim} causal={causal} kv_heads={kv_heads} stages={stages} {name}: err {err:.2e} "
              f"(portable {base_err:.2e}) -> {'ok' if good else 'WRONG'}", flush=True)
    return ok


def time_case(head_dim, causal, seqlen, kv_heads, stages_list, rounds):
    """Whole backward: the portable one, and the portable dQ kernel + the Gluon dK/dV kernel (kernel times from
    the profiler, the dQ kernel's shared by both)."""
    batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, kv_heads or heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    out, lse, delta, dq, dk, dv, do, bwd = _portable(q, k, v, causal)
    flops = 2.5 * 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    runs = {"portable": bwd}
    for st in stages_list:
        runs[f"gluon-s{st}"] = (lambda st: lambda: gluon_dkdv(q, k, v, do, lse, delta, dk, dv, causal, st))(st)
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
        print("kernels seen by the profiler:", sorted(kernel_ms["portable"][0]), sorted(kernel_ms[name][0]), flush=True)
        return
    dq_ms = statistics.median(t.get("_bwd_dq", 0.0) for t in kernel_ms["portable"])
    dkdv_ms = statistics.median(t.get("_bwd_dkdv", 0.0) for t in kernel_ms["portable"])
    cells = [f"portable dkdv {dkdv_ms:.3f} ms + dq {dq_ms:.3f} ms: {flops / (dkdv_ms + dq_ms) * 1e-9:.0f}"]
    for name in runs:
        if name == "portable":
            continue
        ms = statistics.median(sum(v for key, v in t.items() if "dkdv_ws" in key) for t in kernel_ms[name]) or 1e-9
        cells.append(f"{name} dkdv {ms:.3f} ms ({dkdv_ms / ms:.2f}x): {flops / (ms + dq_ms) * 1e-9:.0f}")
    print(f"D{head_dim} causal={causal} L={seqlen} kv_heads={kv_heads or heads} backward TFLOP/s: " + "; ".join(cells),
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--seqlens", default="4096,16384")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, flush=True)
    stages = [int(s) for s in a.stages.split(",")]
    good = [st for st in stages if all([check(d, c, kvh, st) for d in map(int, a.head_dims.split(","))
                                        for c in (True, False) for kvh in (8, 2)])]
    for d in map(int, a.head_dims.split(",")):
        for seqlen in map(int, a.seqlens.split(",")):
            for causal in (False, True):
                if good:
                    time_case(d, causal, seqlen, a.kv_heads, good, a.rounds)


if __name__ == "__main__":
    main()
