#!/usr/bin/env python
"""What the first attention call of a process costs, apart from compiling (run it twice: the second run
finds Triton's disk cache warm).

    python benchmarks/first_call.py          # Llama-3.2-1B's attention: 32 query / 8 key-value heads, D64

Times, in one fresh process: the first varlen forward + backward of a packed row (kernels loaded from the
disk cache or compiled), the same again with other document lengths (what every later step pays), and, for
scale, the first and second bf16 matmul forward + backward of the same number of tokens (cuBLAS's own
start-up). A first training step pays the first column for every kernel it uses; the difference between
the first two rows is hf_flash's share of it.
"""

from __future__ import annotations

import time

import torch

from hf_flash import flash_attn_varlen_func


def _packed(lengths, heads, kv_heads, head_dim, device):
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, kv_heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))  # fmt: skip
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    device = "cuda"
    torch.zeros(1, device=device)  # the CUDA context, outside every timing
    generator = torch.Generator().manual_seed(0)
    for label, seed in (("first", 0), ("second (other lengths)", 1)):
        generator.manual_seed(seed)
        lengths = (torch.distributions.LogNormal(6.4, 1.0).sample((40,)).clamp(16, 8192).long()).tolist()
        q, k, v, cu, max_len = _packed(lengths, 32, 8, 64, device)

        def attention():
            out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
            out.sum().backward()

        print(f"hf_flash varlen fwd+bwd, {label} call: {_timed(attention) * 1e3:8.1f} ms  ({sum(lengths)} tokens)")
    x = torch.randn(16384, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, 8192, device=device, dtype=torch.bfloat16, requires_grad=True)
    for label in ("first", "second"):
        print(f"matmul fwd+bwd, {label} call:                   {_timed(lambda: (x @ w).sum().backward()) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
