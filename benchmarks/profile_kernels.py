"""Run a few forward + backward passes of one attention shape, for a profiler to attach to.

    python benchmarks/profile_kernels.py --head-dim 128 --seqlen 4096 --causal
    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
        -k regex:'_fwd_kernel|_bwd_dkdv|_bwd_dq' --launch-skip 3 --launch-count 3 \
        python benchmarks/profile_kernels.py --head-dim 128 --seqlen 4096 --causal

The first pass compiles the kernels (skip its launches in the profiler: ``--launch-skip``); each pass
launches the forward, then the backward's delta, dK/dV and dQ kernels. Setup as in the benchmark: 16k
tokens per batch and hidden 2048 (so H = 2048 / D), bf16.
"""

import argparse

import torch

from hf_flash import flash_attn_func


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--kv-heads", type=int, default=0, help="GQA: kv heads (0: as many as q heads)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    batch = max(1, 16384 // args.seqlen)
    heads = 2048 // args.head_dim
    kv_heads = args.kv_heads or heads
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make(h):
        return torch.randn(batch, args.seqlen, h, args.head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_()

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    dout = torch.randn_like(q)
    for _ in range(args.passes):
        flash_attn_func(q, k, v, causal=args.causal).backward(dout)
    torch.cuda.synchronize()
    print(f"done: B{batch} L{args.seqlen} H{heads}/{kv_heads} D{args.head_dim} causal={args.causal}")


if __name__ == "__main__":
    main()
