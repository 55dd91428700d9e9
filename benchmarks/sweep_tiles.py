#!/usr/bin/env python
"""Time hf_flash's kernels over candidate tiles, one kernel at a time, on the GPU at hand.

    python benchmarks/sweep_tiles.py                       # D 64/128/256, causal and not, L = 4k, bf16
    python benchmarks/sweep_tiles.py --head-dims 128 --seqlen 16384 --kernels fwd

Each candidate is (block_m, block_n, num_warps, num_stages). The forward is timed alone; the backward is
timed whole (delta + dK/dV + dQ) while one of its kernels' tile varies and the other keeps the current
table's, so differences between rows are that kernel's. ``dkdv_atomic`` times the dK/dV kernel that also
adds dQ by atomics (the path taken for head dims >= ``ATOMIC_DQ_MIN_HEAD_DIM`` unless deterministic).
Setup as in the benchmark: 16k tokens per batch, hidden 2048. Results go to the log
(``benchmarks/results/LOG.md``) and the winners into ``hf_flash/ops/config.py``'s table for the chip.
"""

from __future__ import annotations

import argparse
import math
import re

import torch
import triton

from hf_flash.ops.backward import flash_bwd
from hf_flash.ops.config import KernelConfig, backward_config, block_d_for, forward_config
from hf_flash.ops.forward import flash_fwd

CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3),
            (64, 128, 4, 3), (128, 64, 8, 4), (128, 128, 4, 3), (64, 64, 4, 4)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 4, 2), (32, 128, 4, 2), (32, 128, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3),
             (32, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 3), (16, 64, 4, 3), (32, 32, 4, 2), (32, 64, 8, 2)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3),
           (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3)],
}
CANDIDATES["dkdv_atomic"] = CANDIDATES["dkdv"]


def parse_tiles(text: str) -> list[tuple[int, int, int, int]]:
    """``"128x64w8s3,64x64w4s3"`` -> [(128, 64, 8, 3), (64, 64, 4, 3)]."""
    tiles = []
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", item.strip())
        if not m:
            raise SystemExit(f"--tiles entries look like 128x64w8s3 (block_m x block_n, warps, stages), got {item!r}")
        tiles.append(tuple(int(g) for g in m.groups()))
    return tiles


def sweep(kernel: str, head_dim: int, causal: bool, seqlen: int, dtype: torch.dtype, tiles, tma_modes,
          compile_only=False, kv_heads=0):
    """Returns [(TFLOP/s, tile, tma)] best first; 0 TFLOP/s where the tile failed to compile or run.
    ``compile_only``: run each candidate once (fills Triton's cache for a later timed run); ``kv_heads``:
    GQA with that many K/V heads (0: as many as query heads)."""
    batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
    do = torch.randn_like(q)
    k, v = (torch.randn(batch, seqlen, kv_heads or heads, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    out, lse = torch.empty_like(q), torch.empty(batch, heads, seqlen, device="cuda")
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flops = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    scale, window, block_d = 1 / math.sqrt(head_dim), (-1, 0 if causal else -1), block_d_for(head_dim)
    args = (None, None, seqlen, seqlen, scale, window, 0.0, 0.0, 0)
    flash_fwd(q, k, v, out, lse, *args, forward_config(head_dim, q.device))
    dkdv_cfg, dq_cfg = backward_config(head_dim, q.device)

    def run(cfg):
        if kernel == "fwd":
            return lambda: flash_fwd(q, k, v, out, lse, *args, cfg)
        if kernel == "dq":
            return lambda: flash_bwd(do, q, k, v, out, lse, dq, dk, dv, *args, dkdv_cfg, cfg, True)
        deterministic = kernel == "dkdv"
        return lambda: flash_bwd(do, q, k, v, out, lse, dq, dk, dv, *args, cfg, dq_cfg, deterministic)

    rows = []
    for tile in tiles:
        if block_d >= 256 and tile[0] * tile[1] > (128 * 64 if kernel == "fwd" else 64 * 64):
            continue  # cannot fit shared memory at D=256 (seen on the H100); compiling it only wastes time
        for tma in tma_modes:
            cfg = KernelConfig(tile[0], tile[1], block_d, tile[2], tile[3], tma)
            try:
                if compile_only:
                    run(cfg)()
                    continue
                ms = triton.testing.do_bench(run(cfg), warmup=25, rep=100, return_mode="median")
                rows.append(((1.0 if kernel == "fwd" else 2.5) * flops / ms * 1e-9, tile, tma))
            except Exception as err:  # out of shared memory, out of resources: a row, not a crash
                rows.append((0.0, tile, tma, type(err).__name__))
    return sorted(rows, key=lambda r: -r[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--kernels", default="fwd,dkdv,dq,dkdv_atomic")
    parser.add_argument("--tiles", default="", help="candidates for every kernel, e.g. 128x64w8s3,64x64w4s3 "
                        "(default: each kernel's own list)")
    parser.add_argument("--tma", choices=("off", "on", "both"), default="off",
                        help="read streamed tiles through TMA descriptors (sm90+, power-of-two head dims)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--kv-heads", type=int, default=0, help="GQA: K/V heads (0: as many as query heads)")
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--shard", default="0/1", help="i/n: run only every n-th candidate from the i-th")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile (run once) without timing, e.g. in parallel shards before a timed run")
    a = parser.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    causals = {"both": (True, False), "yes": (True,), "no": (False,)}[a.causal]
    tma_modes = {"off": (False,), "on": (True,), "both": (False, True)}[a.tma]
    shard, shards = (int(x) for x in a.shard.split("/"))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for head_dim in (int(d) for d in a.head_dims.split(",")):
        for causal in causals:
            for kernel in a.kernels.split(","):
                tiles = (parse_tiles(a.tiles) or CANDIDATES[kernel])[shard::shards]
                rows = sweep(kernel, head_dim, causal, a.seqlen, dtype, tiles, tma_modes, a.compile_only, a.kv_heads)
                if a.compile_only:
                    continue
                best = ", ".join(f"{r[1]}{'+tma' if r[2] else ''}: {r[0]:.0f}" for r in rows[: a.top])
                print(f"{kernel:12s} D{head_dim} causal={causal} L={a.seqlen}: {best}", flush=True)


if __name__ == "__main__":
    main()
