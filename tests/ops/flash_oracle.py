"""Test oracle and case helpers shared by the CPU and GPU kernel tests.

Written from the API contract, not from hf_flash's code, so that the tests catch mistakes in the kernels
*and* in ``hf_flash.ops.reference``. Everything here is plain dense PyTorch: an [Lq, Lk] visibility mask,
softmax, matmul. Gradients come from autograd on that dense graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from conftest import assert_close_rel

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    """One attention problem; ``id`` reads like ``B2-Lq113-Lk255-H8/2-D80-causal-bf16``."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    headdim: int
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    dropout_p: float = 0.0
    deterministic: bool = False
    dtype: torch.dtype = torch.float16
    sinks: bool = False  # the case passes attention sinks (an input of their own: see make_sinks)

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}", f"Lq{self.seqlen_q}", f"Lk{self.seqlen_k}", f"H{self.nheads}/{self.nheads_k}"]
        parts.append(f"D{self.headdim}")
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]},{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p:g}")
        if self.deterministic:
            parts.append("det")
        if self.sinks:
            parts.append("sinks")
        parts.append(DTYPE_NAMES[self.dtype])
        return "-".join(parts)

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of flash_attn_func that this case sets."""
        return {
            "causal": self.causal,
            "window_size": self.window,
            "softcap": self.softcap,
            "dropout_p": self.dropout_p,
            "deterministic": self.deterministic,
        }


def make_inputs(case: Case, device, seed: int = 0):
    """q [B, Lq, H, D], k and v [B, Lk, Hk, D], dout [B, Lq, H, D] in the case's dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)

    q = randn(case.batch, case.seqlen_q, case.nheads, case.headdim)
    k = randn(case.batch, case.seqlen_k, case.nheads_k, case.headdim)
    v = randn(case.batch, case.seqlen_k, case.nheads_k, case.headdim)
    dout = randn(case.batch, case.seqlen_q, case.nheads, case.headdim)
    return q, k, v, dout


def make_sinks(nheads, device, seed: int = 0):
    """fp32 [H] attention-sink logits around the size of a row's log-sum-exp over a few dozen keys
    (~log L), so that the sink takes a sizeable share of the softmax without swamping it."""
    gen = torch.Generator(device=device).manual_seed(seed + 1000)
    return torch.randn(nheads, generator=gen, device=device) * 1.5 + 2.0


def visible_mask(seqlen_q, seqlen_k, causal=False, window=(-1, -1), device=None):
    """[Lq, Lk] bool: may query i attend key j? Causal and window are aligned bottom-right:
    query i sits at key position i + Lk - Lq."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def attention_oracle(q, k, v, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, keep=None, dropout_p=0.0,
                     sinks=None):
    """Dense attention in the dtype of the inputs. Returns (out [B, Lq, H, D], lse [B, H, Lq]).

    keep: optional [B, H, Lq, Lk] bool dropout mask (True = kept); kept weights are scaled by 1/(1-p).
    Rows that see no key get out = 0: their softmax is taken over all keys (so that autograd stays
    finite) and then multiplied by 0.
    sinks: optional [H] attention-sink logits, as Transformers' eager attention applies them (gpt-oss): a
    last score column, cast to the scores' dtype, in the softmax, dropped before the product with V. A row
    that sees no key then has the sink alone: weight 1 on nothing, out = 0, lse = the sink.
    """
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible_mask(q.shape[1], k.shape[1], causal, window, q.device)
    if sinks is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
        column = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
        lse = torch.logsumexp(scores.float(), dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        has_key = visible.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~(visible | ~has_key), float("-inf"))
        lse = torch.logsumexp(scores.float(), dim=-1)
        probs = torch.softmax(scores, dim=-1) * has_key
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out, lse


def varlen_oracle(q, k, v, cu_seqlens_q, cu_seqlens_k, keep=None, **kwargs):
    """attention_oracle on each sequence of packed q [total_q, H, D], k/v [total_k, Hk, D].
    keep: optional list of per-sequence [1, H, Lq_i, Lk_i] masks. Returns (out, lse [H, total_q])."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        sq, sk = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        out, lse = attention_oracle(
            q[None, sq], k[None, sk], v[None, sk], keep=None if keep is None else keep[b], **kwargs
        )
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def out_and_grads(fn, inputs, dout, upcast=False):
    """Run fn(*leaves) -> out and backprop dout. With upcast the leaves are fp32 copies."""
    leaves = [(x.detach().float() if upcast else x.detach().clone()).requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out, grads


def assert_matches_oracle(ours_fn, oracle_fn, inputs, dout, grad_names=("dq", "dk", "dv")):
    """flash-attn's rule on the output (2x) and every gradient (3x): compare ours with an fp32 oracle,
    against the error that PyTorch itself makes in the inputs' dtype."""
    out, grads = out_and_grads(ours_fn, inputs, dout)
    assert out.dtype == inputs[0].dtype, f"output dtype {out.dtype} != input dtype {inputs[0].dtype}"
    ref_out, ref_grads = out_and_grads(oracle_fn, inputs, dout, upcast=True)
    pt_out, pt_grads = out_and_grads(oracle_fn, inputs, dout)
    assert out.shape == ref_out.shape, f"output shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    assert_close_rel("out", out, ref_out, pt_out, 2)
    for name, grad, ref, pt in zip(grad_names, grads, ref_grads, pt_grads):
        assert_close_rel(name, grad, ref, pt, 3, eps=_zero_gradient_floor(ref, pt, dout))
    return out, grads


def _zero_gradient_floor(ref, pt, dout):
    """Where PyTorch's own error is exactly 0 the relative rule has no scale: with one visible key,
    softmax's gradient cancels algebraically in PyTorch (P = 1, dS = dP - dP), while any FlashAttention
    computes delta = rowsum(dO * O) from the output rounded to fp16/bf16 and keeps a rounding residue
    (larger with dropout, whose 1/(1-p) makes O inexact). The floor is then one unit in the last place
    of the dtype at the scale of the upstream gradient; otherwise the usual 1e-5."""
    if (pt.float() - ref.float()).abs().max().item() > 0:
        return 1e-5
    ulp = torch.finfo(pt.dtype).eps
    return max(1e-5, ulp * dout.float().abs().max().item())


def cu_seqlens(lengths, device):
    """int32 [len(lengths) + 1] prefix sums, as flash_attn_varlen_func wants them."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def recover_keep_mask(forward, key_pos, total_q, nheads, headdim, max_seqlen_k, nheads_k, dtype, device):
    """Read the kernel's dropout mask back through its own output.

    forward(v) must run the kernel with dropout under a fixed RNG state and q = 0, so that every visible
    key gets the same weight 1 / n_visible. With v one-hot (key j -> column j - c * D) the output column t
    of query i is P[i, c * D + t] * keep / (1 - p), nonzero exactly where the key was kept. This assumes
    only what any counter-based RNG gives: the mask depends on the RNG state and on positions, not on
    the values of q and v.

    key_pos: [total_k] position of each packed key inside its sequence.
    Returns (keep [total_q, H, max_seqlen_k] bool, weights [total_q, H, max_seqlen_k] fp32).
    """
    keep = torch.zeros(total_q, nheads, max_seqlen_k, dtype=torch.bool, device=device)
    weights = torch.zeros(total_q, nheads, max_seqlen_k, dtype=torch.float32, device=device)
    for start in range(0, max_seqlen_k, headdim):
        v = torch.zeros(key_pos.numel(), nheads_k, headdim, dtype=dtype, device=device)
        rows = ((key_pos >= start) & (key_pos < start + headdim)).nonzero().squeeze(-1)
        v[rows, :, key_pos[rows] - start] = 1
        out = forward(v).reshape(total_q, nheads, headdim).float()
        width = min(headdim, max_seqlen_k - start)
        keep[:, :, start : start + width] = out[:, :, :width] != 0
        weights[:, :, start : start + width] = out[:, :, :width]
    return keep, weights


def oracle_for(case: Case, **extra):
    """attention_oracle with the case's masking options, returning only the output."""
    return functools.partial(
        lambda q, k, v, **kw: attention_oracle(q, k, v, **kw)[0],
        causal=case.causal,
        window=case.window,
        softcap=case.softcap,
        **extra,
    )


def varlen_inputs(lengths_q, lengths_k, nheads, nheads_k, headdim, device, dtype=torch.float16, seed=0):
    """Packed q [total_q, H, D], k, v [total_k, Hk, D], dout like q, and int32 cu_seqlens_q / cu_seqlens_k."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q = randn(sum(lengths_q), nheads, headdim)
    k, v = randn(sum(lengths_k), nheads_k, headdim), randn(sum(lengths_k), nheads_k, headdim)
    dout = randn(sum(lengths_q), nheads, headdim)
    return q, k, v, dout, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)


def dense_keep_mask(attn_fn, case: Case, k, seed):
    """[B, H, Lq, Lk] keep mask and kept weights of attn_fn(q, k, v, **case.kwargs) under manual_seed(seed)."""
    q0 = torch.zeros(case.batch, case.seqlen_q, case.nheads, case.headdim, dtype=case.dtype, device=k.device)

    def forward(v):
        torch.manual_seed(seed)
        return attn_fn(q0, k, v.unflatten(0, (case.batch, case.seqlen_k)), **case.kwargs)

    key_pos = torch.arange(case.seqlen_k, device=k.device).repeat(case.batch)
    keep, weights = recover_keep_mask(
        forward,
        key_pos,
        case.batch * case.seqlen_q,
        case.nheads,
        case.headdim,
        case.seqlen_k,
        case.nheads_k,
        case.dtype,
        k.device,
    )

    def to_bhqk(x):
        return x.unflatten(0, (case.batch, case.seqlen_q)).transpose(1, 2)

    return to_bhqk(keep), to_bhqk(weights)


def varlen_keep_masks(attn_fn, q, k, lengths_q, lengths_k, seed, **kwargs):
    """Per-sequence [1, H, Lq_b, Lk_b] keep masks of attn_fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)."""
    cu_q, cu_k = cu_seqlens(lengths_q, q.device), cu_seqlens(lengths_k, q.device)
    max_q, max_k = max(lengths_q), max(lengths_k)
    q0 = torch.zeros_like(q)

    def forward(v):
        torch.manual_seed(seed)
        return attn_fn(q0, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    key_pos = torch.cat([torch.arange(n, device=q.device) for n in lengths_k])
    keep, _ = recover_keep_mask(
        forward, key_pos, q.shape[0], q.shape[1], q.shape[2], max_k, k.shape[1], q.dtype, q.device
    )
    starts = cu_q.tolist()
    return [keep[starts[b] : starts[b + 1], :, :n].transpose(0, 1)[None] for b, n in enumerate(lengths_k)]


def assert_packed_self_attention_matches(lengths, head_dim, causal, seed):
    """``flash_attn_varlen_func`` on the GPU over packed sequences of ``lengths`` (8 heads, 2 K/V heads, bf16, one
    cu_seqlens for Q and K/V, as the Transformers integration passes it) against the fp32 oracle, forward and
    backward."""
    from hf_flash import flash_attn_varlen_func

    q, k, v, dout, cu, _ = varlen_inputs(lengths, lengths, 8, 2, head_dim, "cuda", torch.bfloat16, seed=seed)

    def ours(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)

    def oracle(q, k, v):
        return varlen_oracle(q, k, v, cu, cu, causal=causal)[0]

    assert_matches_oracle(ours, oracle, (q, k, v), dout)
