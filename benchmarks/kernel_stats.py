"""Registers, spills and shared memory of each compiled kernel, with the launchers' GPU time.

    python benchmarks/kernel_stats.py                      # D 64/128, causal and not, L = 4k, bf16
    python benchmarks/kernel_stats.py --head-dims 128 --seqlen 16384
    python benchmarks/kernel_stats.py --head-dims 64 --kv-heads 8    # GQA 32/8 (Llama-3.2-1B's attention)
    python benchmarks/kernel_stats.py --seqlen 2048 --kernels fwd   # the forward alone (short-sequence tiles)

Times the forward launcher and the whole backward (delta + dK/dV + dQ) on the chip's table tiles, with
``sweep_tiles.sweep`` (the same setup: 16k tokens per batch, hidden 2048), then lists what Triton compiled
for them: a kernel at the 255-register cap that spills is the first suspect of a slow one.
"""

import argparse
import importlib

import torch
import triton
from sweep_tiles import sweep

from hf_flash.ops.config import backward_config, forward_config

# the modules whose kernels are listed; an experiment's module (benchmarks/experiments/*.patch) when present
KERNEL_MODULES = ("forward", "backward", "warp_specialized")


def jit_functions():
    """Every ``@triton.jit`` function of the kernel modules (helpers have no compiled entries of their own)."""
    seen = set()
    for name in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"hf_flash.ops.{name}")
        except ImportError:
            continue
        for obj in vars(module).values():
            if isinstance(obj, triton.runtime.JITFunction) and id(obj) not in seen:  # helpers are imported twice
                seen.add(id(obj))
                yield obj


def compiled_kernels(jit_fn):
    """The CompiledKernel objects in a JITFunction's cache (all devices, all specialisations)."""
    for entry in getattr(jit_fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        yield from cache.values()


def table_speed(kernel: str, config, head_dim: int, causal: bool, seqlen: int, kv_heads: int = 0) -> str:
    """TFLOP/s of ``sweep``'s ``kernel`` timing ("fwd", or "dkdv": the whole backward) on ``config``'s tile."""
    tile = (config.block_m, config.block_n, config.num_warps, config.num_stages)
    row = sweep(kernel, head_dim, causal, seqlen, torch.bfloat16, [tile], (config.tma,), kv_heads=kv_heads)[0]
    error = f" ({row[3]})" if len(row) > 3 else ""  # sweep's row for a tile that failed: 0 and the error
    return f"{row[0]:.0f} TFLOP/s{error}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--kv-heads", type=int, default=0, help="GQA: K/V heads (0: as many as query heads)")
    p.add_argument("--kernels", default="fwd,bwd", help="what to time: fwd, bwd or both (fwd,bwd)")
    a = p.parse_args()
    kernels = set(a.kernels.split(","))
    device = torch.device("cuda")
    for head_dim in (int(d) for d in a.head_dims.split(",")):
        for causal in (True, False):
            shape = (head_dim, causal, a.seqlen, a.kv_heads)
            speeds = []
            if "fwd" in kernels:
                speeds.append(f"fwd {table_speed('fwd', forward_config(head_dim, device, a.seqlen), *shape)}")
            if "bwd" in kernels:
                speeds.append(f"bwd {table_speed('dkdv', backward_config(head_dim, device)[0], *shape)}")
            gqa = f" {2048 // head_dim}/{a.kv_heads} heads" if a.kv_heads else ""
            print(f"D{head_dim}{gqa} causal={causal} L{a.seqlen}: {', '.join(speeds)}")
    for jit_fn in jit_functions():
        for kernel in compiled_kernels(jit_fn):
            getattr(kernel, "_init_handles", lambda: None)()
            print(f"  {kernel.name}: regs {kernel.n_regs}, spills {kernel.n_spills}, "
                  f"shared {kernel.metadata.shared} B, warps {kernel.metadata.num_warps}, "
                  f"stages {kernel.metadata.num_stages}")


if __name__ == "__main__":
    main()
