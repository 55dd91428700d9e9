#!/usr/bin/env python
"""The Hopper forward (Gluon, ``hf_flash/ops/hopper_fwd.py``) against the portable forward, per length, on an sm90 GPU.

    python benchmarks/hopper_fwd_speed.py                                  # D128, L 1k-32k, causal and not
    python benchmarks/hopper_fwd_speed.py --seqlens 2048,3072,4096 --rounds 7
    python benchmarks/hopper_fwd_speed.py --head-dim 64 --tiles g3n128s2,g2n128s3 --kv-heads 8

Both launchers are called directly on the same tensors (16k tokens per batch, hidden 2048, bf16), whatever
``hopper_fwd.TILES`` says, so the table shows where the Hopper kernel starts to pay. The two alternate
over ``--rounds`` rounds (the same cell drifted by up to 0.19x between device calls, and a kernel timed once
after another can ride a drift); each round gives a ratio, and the line prints the median TFLOP/s of each and
the median ratio with its range. ``--tiles`` times other tiles than the table's (``g<groups>n<block_n>s<stages>``,
``hopper_fwd.Tile``), each against the portable kernel; every one's output is first checked against the portable
kernel's (max |diff| of O and of the LSE). ``--orders`` times tile numberings: ``wave`` (the launcher's
``hopper_fwd.head_group``), ``all`` (every (batch, head) pair in one group: all heads of a query block before
the next block) or a number of pairs per group. The tiles' ``min_seqlen`` is set from these lines (docs/DESIGN.md).
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import statistics

import torch
import triton

from hf_flash.ops import hopper_fwd
from hf_flash.ops.config import forward_config
from hf_flash.ops.forward import flash_fwd


def parse_tile(name: str) -> hopper_fwd.Tile:
    groups, block_n, stages = map(int, re.fullmatch(r"g(\d)n(\d+)s(\d)", name).groups())
    return hopper_fwd.Tile(groups=groups, block_n=block_n, stages=stages, min_seqlen=0)


def time_case(causal: bool, seqlen: int, rounds: int, kv_heads: int, head_dim: int, tiles: dict,
              orders: list[str], batch: int = 0, heads: int = 0) -> list[str]:
    batch, heads = batch or max(1, 16384 // seqlen), heads or 2048 // head_dim
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, kv_heads or heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    out, lse = torch.empty_like(q), torch.empty(batch, heads, seqlen, device="cuda")
    scale, window = 1 / math.sqrt(head_dim), (-1, 0 if causal else -1)
    config = forward_config(head_dim, q.device, seqlen)
    tiles = tiles or {"hopper": hopper_fwd.TILES[head_dim, causal]}
    runs = {"portable": lambda: flash_fwd(q, k, v, out, lse, None, None, seqlen, seqlen, scale, window, 0.0, 0.0, 0,
                                          config)}
    groups = {"wave": None, "all": batch * heads}
    variants = {}
    for name, t in tiles.items():
        for order in orders:
            label = name if orders == ["wave"] else f"{name}/{order}"
            variants[label] = t
            runs[label] = functools.partial(hopper_fwd.flash_fwd_hopper, q, k, v, out, lse, scale, causal, tile=t,
                                            group=groups[order] if order in groups else int(order))
    tiles = variants
    runs["portable"]()
    base, base_lse = out.clone(), lse.clone()
    errors = {}
    for name in tiles:
        out.zero_(), lse.zero_()
        runs[name]()
        errors[name] = ((out.float() - base.float()).abs().max().item(), (lse - base_lse).abs().max().item())
    flops = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    speeds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            speeds[name].append(flops / triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-9)
    lines = []
    for name in tiles:
        ratios = sorted(h / p for h, p in zip(speeds[name], speeds["portable"]))
        shape = f"D{head_dim} {'causal ' if causal else ''}B{batch} L={seqlen} H{heads}/{kv_heads or heads}"
        portable, ours = statistics.median(speeds["portable"]), statistics.median(speeds[name])
        d_out, d_lse = errors[name]
        lines.append(f"{shape} {name}: portable {portable:.0f}, {name} {ours:.0f} TFLOP/s: "
                     f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}); max |dO| {d_out:.2e}, "
                     f"|dLSE| {d_lse:.2e}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="1024,2048,3072,4096,8192,16384,32768")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kv-heads", type=int, default=0, help="GQA: K/V heads (0: as many as query heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=0, help="sequences per batch (0: 16k tokens per batch)")
    p.add_argument("--heads", type=int, default=0, help="query heads (0: hidden 2048)")
    p.add_argument("--tiles", default="", help="comma-separated g<groups>n<block_n>s<stages> (default: the table's)")
    p.add_argument("--causal", default="both", choices=["both", "causal", "plain"])
    p.add_argument("--orders", default="wave", help="comma-separated tile numberings: wave, all, or pairs per group")
    a = p.parse_args()
    if hopper_fwd.unavailable_reason() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit(hopper_fwd.unavailable_reason() or "the Hopper forward needs an sm90 GPU")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, flush=True)
    tiles = {name: parse_tile(name) for name in a.tiles.split(",") if name}
    for seqlen in map(int, a.seqlens.split(",")):
        for causal in {"both": (False, True), "causal": (True,), "plain": (False,)}[a.causal]:
            for line in time_case(causal, seqlen, a.rounds, a.kv_heads, a.head_dim, tiles, a.orders.split(","),
                                  a.batch, a.heads):
                print(line, flush=True)


if __name__ == "__main__":
    main()
