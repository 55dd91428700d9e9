#!/usr/bin/env python
"""Attention speed with K/V in the KV cache's layout against the projections' layout.

    python benchmarks/kv_layout.py                        # GQA 32/8 D64 and MHA D128, causal, L = 4k, bf16
    python benchmarks/kv_layout.py --seqlen 16384 --head-dims 128

Transformers hands the attention function K/V as ``[B, H, L, D]``. Without a cache they are transposed
views of the projections' ``[B, L, H, D]`` output: the heads of one token sit side by side, the layout
that the tensor descriptors (TMA) read. With a cache (generation's prefill, or training with
``use_cache=True`` and no gradient checkpointing) they come from ``DynamicCache`` as contiguous
``[B, H, L, D]`` tensors, each (batch, head) on its own rows. This times ``flash_attn_func`` (forward, and
forward + backward) on the same values in both layouts and prints how the kernels read each one.
"""

from __future__ import annotations

import argparse

import torch
import triton

from hf_flash import flash_attn_func
from hf_flash.ops import common


def read_path(t) -> str:
    """How the kernels read ``t`` on this GPU: a TMA layout, or pointer loads."""
    if not common.tma_device_ok(t):
        return "pointers (no TMA on this GPU)"
    found = common.tma_layout(t, False)
    if found is None:
        return "pointers"
    return "TMA, head-major rows" if found.head_major else "TMA, heads side by side"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="64,128", help="64 runs GQA 32/8 (Llama-3.2-1B), others MHA")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (batch = tokens // seqlen)")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    batch = max(1, a.tokens // a.seqlen)
    for head_dim in (int(d) for d in a.head_dims.split(",")):
        heads = 2048 // head_dim
        heads_k = 8 if head_dim == 64 else heads
        q = torch.randn(batch, a.seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn_like(q)
        k_rows, v_rows = (torch.randn(batch, a.seqlen, heads_k, head_dim, device="cuda", dtype=torch.bfloat16)
                          for _ in range(2))
        layouts = {
            "[B, L, H, D] (projections)": (k_rows, v_rows),
            "[B, H, L, D] (KV cache)": tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k_rows, v_rows)),
        }
        flops = 4 * batch * heads * a.seqlen**2 * head_dim / 2  # causal
        print(f"\nD{head_dim} heads {heads}/{heads_k} B{batch} L{a.seqlen} causal")
        for name, (k, v) in layouts.items():
            leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (q, k, v)]

            def fwd():
                return flash_attn_func(*leaves, causal=True)

            def fwd_bwd():
                fwd().backward(dout)

            fwd_ms = triton.testing.do_bench(fwd, warmup=10, rep=100, return_mode="median")
            both_ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=100, return_mode="median",
                                              grad_to_none=leaves)
            print(f"  {name:28s} fwd {flops / fwd_ms / 1e9:5.0f} TFLOP/s   fwd+bwd {3.5 * flops / both_ms / 1e9:5.0f}"
                  f" TFLOP/s   K/V read through {read_path(leaves[1])}")


if __name__ == "__main__":
    main()
