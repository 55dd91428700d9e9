"""Peak memory and time of one causal-LM loss (forward + backward) over ``[tokens, hidden]`` hidden states,
for the ways of computing it that hf_flash/training/loss.py chose between:

- plain: the full logits, upcast to fp32, ``F.cross_entropy`` (what Transformers' ForCausalLMLoss does);
- recompute: chunks of ``torch.utils.checkpoint`` (non-reentrant) around head -> float -> cross_entropy(sum):
  nothing of size vocab is kept, backward recomputes each chunk's logits (a third head matmul per token);
- chunked: hf_flash's loss (the gradient made in the forward, chunk by chunk; two head matmuls per token);
- liger: Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA, or TRITON_INTERPRET=1).

On a GPU: ``torch.cuda.max_memory_allocated`` above the inputs, in one process. On the CPU: each variant in
its own process, the growth of its peak resident memory (glibc told to map every allocation of 64 KiB or
more on its own, so that freed tensors leave the resident set).

    python benchmarks/loss_memory.py                                   # CPU: 8192 tokens, hidden 256, vocab 32000
    python benchmarks/loss_memory.py --tokens 32768 --hidden 2048 --vocab 128256 --dtype bf16   # a GPU, Llama 3.2 1B
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
IMPLS = ("plain", "recompute", "chunked", "liger")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _recompute(hidden, head, targets, chunk):
    def piece(rows, target):
        return F.cross_entropy(head(rows).float(), target, reduction="sum")

    pieces = [torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False)
              for h, t in zip(hidden.split(chunk), targets.split(chunk))]  # fmt: skip
    return torch.stack(pieces).sum() / targets.numel()


def loss_fn(impl: str, chunk: int):
    from hf_flash.training.loss import linear_cross_entropy

    def fn(hidden, head, targets):
        if impl == "plain":
            return F.cross_entropy(head(hidden).float(), targets)
        if impl == "recompute":
            return _recompute(hidden, head, targets, chunk)
        # linear_cross_entropy shifts labels: hand it shift_labels to score the same targets
        return linear_cross_entropy(hidden[None], head, shift_labels=targets[None], chunk_tokens=chunk, impl=impl)

    return fn


def inputs(args, device):
    gen = torch.Generator(device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    return hidden, head, targets


def measure(args, impl: str, device: str) -> tuple[float, float]:
    """(peak GiB above the inputs, seconds) of one forward + backward."""
    hidden, head, targets = inputs(args, device)
    fn = loss_fn(impl, args.chunk)
    if device == "cuda":
        fn(hidden, head, targets).backward()  # warm-up (Triton compiles, cuBLAS picks)
        hidden.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    fn(hidden, head, targets).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return peak / 2**30, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)  # the CPU driver's child process
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(*measure(args, args.one, device))
        return 0
    print(f"{device}, {args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, chunk {args.chunk}")
    print(f"full logits: {args.tokens * args.vocab * 4 / 2**30:.2f} GiB in fp32")
    for impl in args.impls.split(","):
        if impl == "liger" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            print(f"{impl:>9}: skipped (CUDA, or TRITON_INTERPRET=1)")
            continue
        if device == "cuda":
            peak, seconds = measure(args, impl, device)
        else:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--one", impl], env=env,
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            peak, seconds = map(float, out.split()[-2:])
        print(f"{impl:>9}: peak {peak:6.2f} GiB above the inputs, {seconds * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
