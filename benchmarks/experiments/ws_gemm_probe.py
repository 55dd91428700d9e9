"""The smallest test of Triton's Hopper warp specialization: a matmul whose K loop is specialized.

    python benchmarks/experiments/ws_gemm_probe.py 128 128 64 3 ws    # BLOCK_M BLOCK_N BLOCK_K stages ws|no

C = A @ B^T (1024^3, bf16, TMA tensor descriptors, 4 warps). Prints whether the TTGIR was specialized
and the error against torch. Triton 3.6 on an H200 (2026-11-29): 64-row tiles (one consumer warp group)
run and are right; 128-row tiles (two consumer groups) end in a CUDA error at the first synchronize,
with 2 or 3 stages. Run it first when a new Triton arrives, before any warp-specialized attention.
"""

import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _gemm(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr):
    """A_desc [M, K] in [BLOCK_M, BLOCK_K] tiles, B_desc [N, K] in [BLOCK_N, BLOCK_K] tiles; C fp32 [M, N]."""
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, warp_specialize=WS):
        acc = tl.dot(A.load([m0, k]), tl.trans(B.load([n0, k])), acc)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(C + offs_m[:, None] * (tl.num_programs(1) * BLOCK_N) + offs_n[None, :], acc)


def main():
    block_m, block_n, block_k, stages = (int(x) for x in sys.argv[1:5])
    specialize = sys.argv[5] == "ws"
    size = 1024
    # as in the run recorded above (a kernel that needs global scratch memory gets it from torch)
    triton.set_allocator(lambda nbytes, align, stream: torch.empty(nbytes, dtype=torch.int8, device="cuda"))
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(size, size, device="cuda", dtype=torch.float32)
    kernel = _gemm[(size // block_m, size // block_n)](
        TensorDescriptor.from_tensor(a, [block_m, block_k]), TensorDescriptor.from_tensor(b, [block_n, block_k]),
        c, size, block_m, block_n, block_k, specialize, num_warps=4, num_stages=stages,
    )
    print("specialized:", "ttg.warp_specialize" in kernel.asm["ttgir"], flush=True)
    torch.cuda.synchronize()
    print("max error:", (c - a.float() @ b.float().T).abs().max().item())


if __name__ == "__main__":
    main()
