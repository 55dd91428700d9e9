"""Registers, spills and shared memory of each compiled kernel, with the launchers' GPU time.

    python benchmarks/kernel_stats.py                      # D 64/128, causal and not, L = 4k, bf16
    python benchmarks/kernel_stats.py --head-dims 128 --seqlen 16384

Times the forward launcher and the whole backward (delta + dK/dV + dQ) with ``triton.testing.do_bench``
on the chip's table tiles (setup as in the benchmark: 16k tokens per batch, hidden 2048), then lists what
Triton compiled for them: a kernel at the 255-register cap that spills is the first suspect of a slow one.
"""

import argparse

import torch
import triton

from hf_flash.ops import backward, forward
from hf_flash.ops.backward import flash_bwd
from hf_flash.ops.config import backward_config, forward_config
from hf_flash.ops.forward import flash_fwd


def compiled_kernels(jit_fn):
    """The CompiledKernel objects in a JITFunction's cache (all devices, all specialisations)."""
    for entry in getattr(jit_fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        yield from cache.values()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlen", type=int, default=4096)
    a = p.parse_args()
    from triton.testing import do_bench

    for head_dim in (int(d) for d in a.head_dims.split(",")):
        for causal in (True, False):
            batch, heads = max(1, 16384 // a.seqlen), 2048 // head_dim
            q, k, v, do = (torch.randn(batch, a.seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                           for _ in range(4))
            out, lse = torch.empty_like(q), torch.empty(batch, heads, a.seqlen, device="cuda")
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            window = (-1, 0 if causal else -1)
            scale = head_dim**-0.5
            cfg = forward_config(head_dim, q.device, a.seqlen)
            cfg_dkdv, cfg_dq = backward_config(head_dim, q.device)

            def fwd():
                flash_fwd(q, k, v, out, lse, None, None, a.seqlen, a.seqlen, scale, window, 0.0, 0.0, 0, cfg)

            def bwd():
                flash_bwd(do, q, k, v, out, lse, dq, dk, dv, None, None, a.seqlen, a.seqlen, scale, window, 0.0,
                          0.0, 0, cfg_dkdv, cfg_dq, True)

            flops = 4 * batch * heads * a.seqlen**2 * head_dim / (2 if causal else 1)
            fwd()
            t_fwd = do_bench(fwd, warmup=10, rep=100)
            t_bwd = do_bench(bwd, warmup=10, rep=100)
            print(f"D{head_dim} causal={causal} L{a.seqlen}: fwd {flops / t_fwd / 1e9:.0f} TFLOP/s "
                  f"({t_fwd * 1e3:.0f} us), bwd {2.5 * flops / t_bwd / 1e9:.0f} TFLOP/s ({t_bwd * 1e3:.0f} us)")
    for jit_fn in (forward._fwd_kernel, backward._bwd_delta, backward._bwd_dkdv, backward._bwd_dq):
        for kernel in compiled_kernels(jit_fn):
            getattr(kernel, "_init_handles", lambda: None)()
            print(f"  {kernel.name}: regs {kernel.n_regs}, spills {kernel.n_spills}, "
                  f"shared {kernel.metadata.shared} B, warps {kernel.metadata.num_warps}, "
                  f"stages {kernel.metadata.num_stages}")


if __name__ == "__main__":
    main()
