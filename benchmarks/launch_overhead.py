#!/usr/bin/env python
"""Host time per call against GPU time per call, for short attention problems where the host can be the limit.

    python benchmarks/launch_overhead.py                 # B16 L1024 H16 D128 causal, bf16

For each way of calling the forward (the launcher alone with and without TMA descriptors, the public
``flash_attn_func``, and forward + backward through autograd) it prints the GPU time per call (CUDA
events over back-to-back calls, ``triton.testing.do_bench``) and the host time per call (enqueueing 50
calls without waiting for the GPU). When the host time is the larger, the GPU idles between kernels and
TFLOP/s measured at that size are a measure of Python, not of the kernel.

    python benchmarks/launch_overhead.py --sync-debug    # also: which way waits for the GPU, and where

A host time close to the GPU time can also mean a hidden device sync (the host waits for the queue to
drain): ``--sync-debug`` runs every way once under ``torch.cuda.set_sync_debug_mode("warn")``, which
prints each synchronizing call with its stack.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import math
import pstats
import time

import torch
import triton

from hf_flash import flash_attn_func
from hf_flash.ops.config import forward_config
from hf_flash.ops.forward import flash_fwd
from hf_flash.ops.function import _bwd_impl


def host_us(fn, calls: int = 50) -> float:
    """Microseconds of host time per call, enqueued back to back (the GPU queue does not fill in 50)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--sync-debug", action="store_true", help="report device syncs inside each way")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N host functions with the most own time (cProfile) of each way")
    a = parser.parse_args()
    causal = not a.no_causal
    shape = (a.batch, a.seqlen, a.heads, a.head_dim)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = torch.empty_like(q), torch.empty(a.batch, a.heads, a.seqlen, device="cuda")
    config = forward_config(a.head_dim, q.device, a.seqlen)
    args = (None, None, a.seqlen, a.seqlen, 1 / math.sqrt(a.head_dim), (-1, 0 if causal else -1), 0.0, 0.0, 0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd_bwd():
        flash_attn_func(*leaves, causal=causal).backward(dout)

    # the backward launches alone, in this thread (autograd runs a CUDA backward on its own thread, out
    # of cProfile's sight)
    saved = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    bwd_args = (dout, q, k, v, saved[0], saved[1], None, None, a.seqlen, a.seqlen, 1 / math.sqrt(a.head_dim),
                -1, 0 if causal else -1, 0.0, 0.0, torch.zeros(1, dtype=torch.int64), True)

    ways = {
        f"flash_fwd, {config}": lambda: flash_fwd(q, k, v, out, lse, *args, config),
        "flash_fwd, same tiles without TMA": lambda: flash_fwd(
            q, k, v, out, lse, *args, dataclasses.replace(config, tma=False)),
        "flash_attn_func (no grad)": lambda: flash_attn_func(q, k, v, causal=causal),
        "flash_attn_func (inputs require grad)": lambda: flash_attn_func(*leaves, causal=causal),
        "forward + backward": fwd_bwd,
        "backward launches alone (_bwd_impl)": lambda: _bwd_impl(*bwd_args),
    }
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "shape", shape,
          "causal" if causal else "full")
    for name, fn in ways.items():
        gpu = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
        print(f"{name:60s} GPU {gpu:8.1f} us/call   host {host_us(fn):8.1f} us/call")
    if a.sync_debug:
        import warnings

        for name, fn in ways.items():
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            print(f"\n== {name}: {len(caught)} synchronizing call(s)")
            for w in caught:
                print(f"  {w.filename}:{w.lineno}: {w.message}")
    if a.profile:
        for name, fn in ways.items():
            print(f"\n== {name}: top {a.profile} by own host time over 50 calls")
            profile = cProfile.Profile()
            profile.runcall(lambda: [fn() for _ in range(50)])
            torch.cuda.synchronize()
            pstats.Stats(profile).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
