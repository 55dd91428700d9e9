"""Does this checkout's hf_flash (e.g. an experiment's copy on PYTHONPATH) still compute attention right on
the GPU? flash-attn's rule at a few benchmark-like shapes: the output's error against an fp32 reference
at most 2x, the gradients' at most 3x, PyTorch's own error in bf16. Prints one line per case and exits 1
on a failure, so a timing run of a wrong variant is flagged before its numbers are read.

    PYTHONPATH=<variant root> python benchmarks/experiments/agree.py
"""

import sys

import torch
import torch.nn.functional as F

from hf_flash import flash_attn_func


def attention(q, k, v, causal):
    """PyTorch's math attention on [B, L, H, D] tensors (GQA by repeating K/V heads)."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


def run(fn, inputs, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]


def main():
    failed = False
    # the last case is not a multiple of any block: the kernels' boundary masks
    for head_dim, heads_k, causal, seqlen in [(64, 16, True, 1024), (128, 16, False, 1024), (128, 4, True, 2048),
                                              (64, 4, False, 2048), (128, 8, True, 1000)]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, dout = (torch.randn(2, seqlen, 16, head_dim, device="cuda", generator=gen) for _ in range(2))
        k, v = (torch.randn(2, seqlen, heads_k, head_dim, device="cuda", generator=gen) for _ in range(2))
        ours = run(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), (q, k, v), dout, torch.bfloat16)
        ref = run(lambda q, k, v: attention(q, k, v, causal), (q, k, v), dout, torch.float32)
        pt = run(lambda q, k, v: attention(q, k, v, causal), (q, k, v), dout, torch.bfloat16)
        ratios = []
        for name, a, r, p, bound in zip(("out", "dq", "dk", "dv"), ours, ref, pt, (2, 3, 3, 3)):
            ratio = (a.float() - r).abs().max().item() / max((p.float() - r).abs().max().item(), 1e-6)
            ratios.append(f"{name} {ratio:.2f}")
            failed |= not ratio <= bound
        print(f"D{head_dim} H16/{heads_k} causal={causal} L={seqlen}: error / PyTorch bf16 error: {', '.join(ratios)}")
    print("FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
