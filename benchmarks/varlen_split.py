"""Where does the varlen backward lose against the dense one? GPU time of each kernel, per layout.

    python benchmarks/varlen_split.py                # D128, H16, bf16, causal and not
    python benchmarks/varlen_split.py --head-dim 64 --heads 32 --kv-heads 8   # Llama-3.2-1B's attention

For the same 16k tokens it times one forward + backward in three layouts: a dense batch (B = 4, L = 4k),
the same four 4k sequences packed as varlen, and the benchmark's mixed-length varlen batches
(``scripts/bench_attention.py``'s ``mixed_lengths``, longest 2048 and 8192). Kernel times come from the
PyTorch profiler (CUDA activity, averaged over the passes), and the TFLOP/s use the benchmark's count
(4 * sum(L^2) * H * D per forward, halved when causal; the backward 2.5 times that). A varlen row much
slower than the dense one with equal lengths points at the varlen code path; equal lengths as fast as
dense but the mix slow points at the lengths (tail of the grid, masked blocks).
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from hf_flash import flash_attn_func, flash_attn_varlen_func

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from bench_attention import TOKENS_PER_BATCH, mixed_lengths  # noqa: E402


def kernel_times(step, passes: int) -> dict[str, float]:
    """Mean GPU microseconds per pass of each kernel that ``step`` launches."""
    step()  # compile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.key.startswith(("_fwd", "_bwd")):
            times[event.key] = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / passes
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="GQA: K/V heads (0: as many as query heads)")
    p.add_argument("--passes", type=int, default=10)
    a = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    layouts = [("dense B4 L4096", None), ("varlen 4 x 4096", [4096] * 4)]
    layouts += [(f"varlen mix <= {longest}", mixed_lengths(TOKENS_PER_BATCH, longest)) for longest in (2048, 8192)]
    print(torch.cuda.get_device_name(), "torch", torch.__version__,
          f"| heads {a.heads}/{a.kv_heads or a.heads}, D{a.head_dim}, bf16")
    for causal in (False, True):
        for name, lengths in layouts:
            H, D, Hk = a.heads, a.head_dim, a.kv_heads or a.heads
            rows = (4, 4096) if lengths is None else (sum(lengths),)  # [B, L] dense, [total] packed
            q, do = make(*rows, H, D), make(*rows, H, D)
            k, v = make(*rows, Hk, D), make(*rows, Hk, D)
            if lengths is None:
                squares = 4 * 4096**2
                call = lambda q, k, v: flash_attn_func(q, k, v, causal=causal)  # noqa: E731
            else:
                cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
                squares = sum(n * n for n in lengths)
                call = lambda q, k, v: flash_attn_varlen_func(  # noqa: E731
                    q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            times = kernel_times(lambda: call(q, k, v).backward(do), a.passes)
            fwd_flops = 4 * squares * H * D / (2 if causal else 1)
            fwd = sum(t for n, t in times.items() if n.startswith("_fwd"))
            bwd = sum(t for n, t in times.items() if n.startswith("_bwd"))
            parts = ", ".join(f"{n} {t:.0f}" for n, t in sorted(times.items()))
            print(f"causal={causal} {name} ({len(lengths or [0] * 4)} seqs, max {max(lengths or [4096])}): "
                  f"fwd {fwd_flops / fwd / 1e6:.0f} TFLOP/s, bwd {2.5 * fwd_flops / bwd / 1e6:.0f} TFLOP/s | us: {parts}",
                  flush=True)


if __name__ == "__main__":
    main()
