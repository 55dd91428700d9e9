"""hf_flash as a drop-in for the flash-attn package: same function names, layouts and arguments.

    python examples/02_flash_attn_dropin.py

Code written for flash-attn changes one import line. Checked here against a plain PyTorch
attention computed in fp32, on a GPU or (slowly, small shapes) in Triton's interpreter on CPU.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before hf_flash is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# from flash_attn import flash_attn_func, flash_attn_varlen_func     <- before
from hf_flash import flash_attn_func, flash_attn_varlen_func  # noqa: E402  <- after


def reference(q, k, v, causal, dtype=torch.float32):
    """softmax(q kᵀ / √d) v in ``dtype``, keys/values repeated for grouped-query attention."""
    q, k, v = (t.detach().to(dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float16)
torch.manual_seed(0)
# flash-attn's layout: [batch, seqlen, heads, head_dim]; 8 query heads share 2 key/value heads (GQA).
q = torch.randn(2, 40, 8, 64, device=device, dtype=dtype, requires_grad=True)
k = torch.randn(2, 40, 2, 64, device=device, dtype=dtype, requires_grad=True)
v = torch.randn(2, 40, 2, 64, device=device, dtype=dtype, requires_grad=True)

out = flash_attn_func(q, k, v, causal=True)
out.sum().backward()  # the backward kernels run too
exact = reference(q, k, v, causal=True)
err = (out.float() - exact).abs().max().item()
# Judged like flash-attn's tests: at most twice the error of PyTorch's own attention in the same dtype.
torch_err = (reference(q, k, v, causal=True, dtype=dtype).float() - exact).abs().max().item()
print(f"flash_attn_func: out {tuple(out.shape)} {out.dtype}, max error vs fp32 {err:.1e} (PyTorch {dtype}: "
      f"{torch_err:.1e}), dq {tuple(q.grad.shape)}")  # fmt: skip
assert err <= 2 * torch_err + 1e-3

# Variable-length batch: sequences of 13 and 27 tokens packed into one [total, heads, dim] tensor.
lengths = [13, 27]
cu_seqlens = torch.tensor([0, 13, 40], device=device, dtype=torch.int32)
out = flash_attn_varlen_func(q[0].detach(), k[0].detach(), v[0].detach(), cu_seqlens, cu_seqlens,
                             max(lengths), max(lengths), causal=True)  # fmt: skip
pieces = torch.split(torch.arange(40), lengths)
expected = torch.cat([reference(q[:1, i], k[:1, i], v[:1, i], causal=True)[0] for i in pieces])
err = (out.float() - expected).abs().max().item()
print(f"flash_attn_varlen_func: out {tuple(out.shape)}, max error vs fp32 {err:.1e}")
assert err <= 2 * torch_err + 1e-3
