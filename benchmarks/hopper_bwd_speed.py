#!/usr/bin/env python
"""The Hopper backward (Gluon, ``hf_flash/ops/hopper_bwd.py``) against the portable backward, per length, on an sm90
GPU.

    python benchmarks/hopper_bwd_speed.py                                  # L 1k-32k, causal and not
    python benchmarks/hopper_bwd_speed.py --kv-heads 8 --causal causal --seqlens 8192,32768
    python benchmarks/hopper_bwd_speed.py --head-dim 64   # with benchmarks/experiments/hopper-bwd-d64.patch applied

Both paths run on the same tensors (head dim 128 unless ``--head-dim``, 16k tokens per batch, hidden 2048, bf16) whatever
``hopper_bwd.MIN_SEQLEN`` says, so the table shows where the Hopper kernel starts to pay: the portable ``flash_bwd``
(dQ kernel, then dK/dV) against what ``function._bwd_impl`` runs on the Hopper path (delta, the zeroed fp32 dQ
buffer, the kernel, dQ's cast), each whole. They alternate over ``--rounds`` rounds; the line prints the median
TFLOP/s of each (the backward counted as 2.5x the forward's FLOPs, as the README's tables) and the median ratio
with its range, and the largest difference of each gradient from the portable one, relative to its largest
magnitude.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import triton

from hf_flash.ops import hopper_bwd
from hf_flash.ops.backward import flash_bwd
from hf_flash.ops.config import backward_config, forward_config
from hf_flash.ops.forward import flash_fwd
from hf_flash.ops.function import _new_lse


def time_case(causal: bool, seqlen: int, rounds: int, kv_heads: int, head_dim: int,
              other_order: bool = False, heads: int = 0) -> str:
    """One line: the portable backward against ``hopper_bwd.flash_bwd_hopper`` (which launches its own delta), same
    tensors; ``other_order``: also the Hopper backward with its programs in the other order (``keys_outer``
    flipped), alternating with the others."""
    from hf_flash.ops import _hopper_bwd_kernel  # Gluon: imported once main() has checked it is there

    batch, heads = max(1, 16384 // seqlen), heads or 2048 // head_dim
    q, do = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(batch, seqlen, kv_heads or heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    out, lse = torch.empty_like(q), _new_lse(q, False, batch)
    scale, window = 1 / math.sqrt(head_dim), (-1, 0 if causal else -1)
    flash_fwd(q, k, v, out, lse, None, None, seqlen, seqlen, scale, window, 0.0, 0.0, 0,
              forward_config(head_dim, q.device, seqlen))
    name = "hopper"
    grads = {n: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) for n in ("portable", name)}
    configs = backward_config(head_dim, q.device)

    def portable():
        flash_bwd(do, q, k, v, out, lse, *grads["portable"], None, None, seqlen, seqlen, scale, window, 0.0, 0.0, 0,
                  *configs, True)

    def hopper():
        hopper_bwd.flash_bwd_hopper(do, q, k, v, out, lse, *grads[name], scale, causal)

    def flipped():
        # launch_args() looks keys_outer() up in its module at each call: a stand-in answers the other order
        kernel = _hopper_bwd_kernel
        default, other = kernel.keys_outer, not kernel.keys_outer(q, k, causal)
        kernel.keys_outer = lambda *args, **kwargs: other
        try:
            hopper()
        finally:
            kernel.keys_outer = default

    runs = {"portable": portable, name: hopper}
    if other_order:
        runs["other"] = flipped
    for fn in runs.values():
        fn()
    errors = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
              for a, b in zip(grads[name], grads["portable"])]
    flops = 2.5 * 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    speeds = {n: [] for n in runs}
    for _ in range(rounds):
        for n, fn in runs.items():
            speeds[n].append(flops / triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-9)
    ratios = sorted(h / p for h, p in zip(speeds[name], speeds["portable"]))
    shape = f"D{head_dim} {'causal ' if causal else ''}B{batch} L={seqlen} H{heads}/{kv_heads or heads}"
    if other_order:
        order = "keys outer" if _hopper_bwd_kernel.keys_outer(q, k, causal) else "keys inner"
        flip = sorted(o / h for o, h in zip(speeds["other"], speeds[name]))
        shape += (f" ({order}; the other order {statistics.median(speeds['other']):.0f} TFLOP/s, "
                  f"{statistics.median(flip):.2f}x)")
    return (f"{shape}: portable {statistics.median(speeds['portable']):.0f}, {name} "
            f"{statistics.median(speeds[name]):.0f} TFLOP/s: {statistics.median(ratios):.2f}x "
            f"({ratios[0]:.2f}-{ratios[-1]:.2f}); max |d| / max: dq {errors[0]:.1e}, dk {errors[1]:.1e}, "
            f"dv {errors[2]:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kv-heads", type=int, default=0, help="GQA: K/V heads (0: as many as query heads)")
    p.add_argument("--heads", type=int, default=0,
                   help="query heads (0: hidden 2048, 2048 / D; README's GQA rows: --heads 32 --kv-heads 8)")
    p.add_argument("--causal", default="both", choices=["both", "causal", "plain"])
    p.add_argument("--head-dim", type=int, default=128,
                   help="a head dim the kernel compiles for (hidden 2048: 2048 / D heads)")
    p.add_argument("--other-order", action="store_true",
                   help="also time the Hopper backward with keys_outer() flipped (causal calls: key blocks outer "
                        "or inner), alternating in the same rounds")
    a = p.parse_args()
    if hopper_bwd.unavailable_reason() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit(hopper_bwd.unavailable_reason() or "the Hopper backward needs an sm90 GPU")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, flush=True)
    for seqlen in map(int, a.seqlens.split(",")):
        for causal in {"both": (False, True), "causal": (True,), "plain": (False,)}[a.causal]:
            print(time_case(causal, seqlen, a.rounds, a.kv_heads, a.head_dim, a.other_order, a.heads), flush=True)


if __name__ == "__main__":
    main()
