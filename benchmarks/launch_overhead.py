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

    python benchmarks/launch_overhead.py --trace         # where the GPU idles inside a timed call

``--trace`` replays ``do_bench``'s loop (L2 clear, start event, call, end event) under ``torch.profiler``
and splits each timed call into the kernels' own time and the GPU's idle time between them: the idle
part is what a timed call pays for the host (or for a sync) and a kernel's own timing does not.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import math
import pstats
import statistics
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


def _is_l2_clear(name: str) -> bool:
    # do_bench clears L2 by zeroing an int8 buffer of ~256 MB: the one int8 fill in these calls
    return "Fill" in name and ("signed char" in name or "int8" in name)


def trace_gaps(fn, grad_to_none=(), iters: int = 20) -> str:
    """Median over ``iters`` do_bench-style timed calls of ``fn``: the span from the end of the L2 clear to
    the end of the call's last kernel, the kernels' own time inside it and the idle time, then each kernel
    with the idle time before it. ``grad_to_none``: leaves whose ``.grad`` is cleared before each call, as
    do_bench does. The profiler adds some host time of its own, so the idle time is an upper bound.
    Returns the lines to print."""
    from torch.profiler import ProfilerActivity, profile

    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for leaf in grad_to_none:
                leaf.grad = None
            cache.zero_()
            fn()
        torch.cuda.synchronize()
    return gap_lines(sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                            if e.device_type == torch.autograd.DeviceType.CUDA))


def gap_lines(kernels) -> str:
    """:func:`trace_gaps`' report from the trace's kernels, ``(start us, end us, name)`` in start order."""
    calls, current = [], None
    for start, end, name in kernels:
        if _is_l2_clear(name):
            current = {"t": end, "kernels": []}
            calls.append(current)
        elif current is not None:
            current["kernels"].append((start, end, name))
    calls = [c for c in calls if c["kernels"]]
    if not calls:
        return "  (no L2-clear kernel found in the trace: cannot split it into calls)"

    median = statistics.median
    rows, spans, busy, idle = [], [], [], []
    for call in calls:
        t, own, gaps = call["t"], 0.0, []
        for start, end, name in call["kernels"]:
            gaps.append((max(0.0, start - t), end - start, name))
            own += end - start
            t = max(t, end)
        spans.append(t - call["t"])
        busy.append(own)
        idle.append(spans[-1] - own)
        rows.append(gaps)
    lines = [f"  timed span {median(spans):8.1f} us: kernels {median(busy):8.1f} us, idle "
             f"{median(idle):8.1f} us   (medians of {len(calls)} calls)"]
    if all(len(r) == len(rows[0]) for r in rows):
        for i, (_, _, name) in enumerate(rows[0]):
            lines.append(f"    idle before {median([r[i][0] for r in rows]):7.1f} us, kernel "
                         f"{median([r[i][1] for r in rows]):7.1f} us  {name[:70]}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--sync-debug", action="store_true", help="report device syncs inside each way")
    parser.add_argument("--trace", action="store_true",
                        help="split each way's timed call into kernel time and GPU idle time (torch.profiler)")
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
                -1, 0 if causal else -1, 0.0, 0.0, torch.zeros(1, dtype=torch.int64), True, None)

    graph_out = flash_attn_func(*leaves, causal=causal)  # one saved graph, replayed as the bench times it

    ways = {
        f"flash_fwd, {config}": lambda: flash_fwd(q, k, v, out, lse, *args, config),
        "flash_fwd, same tiles without TMA": lambda: flash_fwd(
            q, k, v, out, lse, *args, dataclasses.replace(config, tma=False)),
        "flash_attn_func (no grad)": lambda: flash_attn_func(q, k, v, causal=causal),
        "flash_attn_func (inputs require grad)": lambda: flash_attn_func(*leaves, causal=causal),
        "forward + backward": fwd_bwd,
        "backward through autograd (the bench's bwd)": lambda: graph_out.backward(dout, retain_graph=True),
        "backward launches alone (_bwd_impl)": lambda: _bwd_impl(*bwd_args),
    }
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "shape", shape,
          "causal" if causal else "full")
    for name, fn in ways.items():
        gpu = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
        print(f"{name:60s} GPU {gpu:8.1f} us/call   host {host_us(fn):8.1f} us/call")
    if a.trace:
        for name, fn in ways.items():
            print(f"\n== {name}: inside do_bench's timed call")
            print(trace_gaps(fn, leaves))
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
