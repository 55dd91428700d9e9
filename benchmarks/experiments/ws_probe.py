"""Does a warp-specialized attention call finish on this GPU, and where does it stop if not?

    PYTHONPATH=<copy with warp-specialized.patch applied> python benchmarks/experiments/ws_probe.py 256 64 causal
    HF_FLASH_WS_TILES=fwd=64x64s2 ... ws_probe.py 256 64 full fwd    # the forward alone, other tiles

Runs one small forward (and backward, unless a fifth argument is given) with the switch on, printing the
host time (compile + launch) and the time to synchronize separately, so a compile failure and a kernel
that never finishes look different; every PROBE_DUMP seconds (default 45) the Python stack is printed,
which shows where a hung call waits. On the device, wrap it in ``timeout``. Triton 3.6 on an H200: the
forward at 128-row query tiles never finishes (stack: ``torch.cuda.synchronize``), 64-row tiles do.
"""

import faulthandler
import os
import sys
import time

import torch

faulthandler.dump_traceback_later(int(os.environ.get("PROBE_DUMP", "45")), repeat=True)
os.environ.setdefault("HF_FLASH_WARP_SPECIALIZE", "1")
from hf_flash import flash_attn_func  # noqa: E402
from hf_flash.ops import warp_specialized as ws  # noqa: E402  (present only with the patch)


def timed(label, launch):
    start = time.time()
    result = launch()
    print(f"{label}: host {time.time() - start:.1f}s, compile failures {ws._FAILED or 'none'}", flush=True)
    torch.cuda.synchronize()
    print(f"{label}: finished after {time.time() - start:.1f}s", flush=True)
    return result


def main():
    seqlen, head_dim, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "causal"
    q, k, v = (torch.randn(1, seqlen, 2, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = timed("forward", lambda: flash_attn_func(q, k, v, causal=causal))
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=causal).transpose(1, 2)
    print("forward max error against fp32:", (out.float() - ref).abs().max().item(), flush=True)
    if len(sys.argv) <= 4:
        timed("backward", lambda: out.sum().backward())


if __name__ == "__main__":
    main()
