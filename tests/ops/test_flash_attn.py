"""Kernel tests that also run on CPU (Triton interpreter, fp16, tiny shapes) and, unchanged, on a GPU.

Every check compares with the dense oracle of flash_oracle.py under flash-attn's rule (ours vs fp32 at most
2x / 3x PyTorch's own same-dtype error). The interpreter is slow, so shapes stay at L <= 65, D <= 64
(two cases go to D 80 and 111) and B * H <= 4, and each case exercises one thing the kernels must get right:
a boundary, an alignment, a mask. The wide grid is in test_flash_attn_gpu.py.
"""

import dataclasses
import functools
import os
import re
import subprocess
import sys

import pytest

import hf_flash.ops.function
import torch
from flash_oracle import (
    Case,
    assert_matches_oracle,
    attention_oracle,
    cu_seqlens,
    dense_keep_mask,
    make_inputs,
    oracle_for,
    varlen_inputs,
    varlen_keep_masks,
    varlen_oracle,
    visible_mask,
)

import hf_flash
from hf_flash import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from hf_flash.ops import kernels_unavailable_reason

ON_CPU = not torch.cuda.is_available()

DENSE_CASES = [
    Case(1, 1, 1, 1, 1, 16),  # a single query and key
    Case(1, 1, 37, 2, 1, 32),  # decoding step, MQA
    Case(1, 37, 1, 2, 2, 32, causal=True),  # Lq > Lk causal: every row but the last sees no key
    Case(2, 17, 33, 2, 1, 40, causal=True),  # Lq < Lk causal: the diagonal is shifted right by 16
    Case(1, 33, 17, 4, 2, 59, causal=True),  # Lq > Lk causal, GQA, odd head dim
    Case(1, 64, 64, 2, 2, 64),  # exact block multiples
    Case(1, 63, 65, 2, 2, 64, causal=True),  # one past / one short of a block
    Case(2, 64, 64, 4, 2, 32, causal=True),  # block-aligned causal: the backward masks the diagonal in its main loop
    Case(2, 31, 31, 2, 2, 80),  # head dim that is not a power of two, padded inside the kernel
    Case(1, 45, 45, 1, 1, 111, causal=True),
    Case(1, 9, 13, 1, 1, 1),  # head dim 1
    Case(1, 21, 19, 2, 2, 8),
    Case(1, 40, 40, 2, 1, 32, window=(8, 0)),  # sliding window, causal-like on the right
    Case(1, 24, 50, 2, 2, 32, window=(7, 2)),  # window with Lq < Lk
    Case(1, 30, 10, 2, 2, 32, window=(3, 1)),  # window with Lq > Lk: the first 19 rows see no key
    Case(1, 48, 48, 2, 2, 16, causal=True, window=(10, -1)),  # causal + left window
    Case(1, 29, 47, 2, 2, 24, softcap=2.0),  # a cap close to the scores' size, so tanh matters
    Case(1, 47, 29, 4, 1, 32, causal=True, softcap=30.0),
    Case(1, 50, 50, 2, 2, 32, window=(5, 5), softcap=3.0),
]


def force_dq_path(monkeypatch, deterministic):
    """deterministic=False uses atomic dQ only above a head-dim threshold; lower it to 1 so the small CPU
    shapes run that path too."""
    if not deterministic:
        monkeypatch.setattr(hf_flash.ops.function, "ATOMIC_DQ_MIN_HEAD_DIM", 1)


# deterministic=True takes another dQ path (no atomics), so every case runs both ways
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c.id)
def test_output_and_grads(case, deterministic, device, monkeypatch):
    force_dq_path(monkeypatch, deterministic)
    case = dataclasses.replace(case, deterministic=deterministic)
    q, k, v, dout = make_inputs(case, device)
    ours = functools.partial(flash_attn_func, **case.kwargs)
    assert_matches_oracle(ours, oracle_for(case), (q, k, v), dout)


def edge_case(residue):
    """Shift the diagonal (Lk - Lq) and the window edges through every residue mod 16, so that each mask
    edge falls at every offset inside a key / query block of 16, 32, 64 or 128, whatever the tiles are."""
    left, right = (3 * residue + 5) % 23, residue % 5
    window = (left, right) if residue % 3 else (-1, -1)
    return Case(
        1, 37, 37 + residue - 8, 2, 1, 16, causal=residue % 2 == 0, window=window, deterministic=residue % 4 < 2
    )


@pytest.mark.parametrize("case", [edge_case(r) for r in range(16)], ids=lambda c: c.id)
def test_mask_edges(case, device):
    q, k, v, dout = make_inputs(case, device, seed=5)
    assert_matches_oracle(functools.partial(flash_attn_func, **case.kwargs), oracle_for(case), (q, k, v), dout)


def test_softmax_scale(device):
    case = Case(1, 19, 23, 2, 1, 32, causal=True)
    q, k, v, dout = make_inputs(case, device, seed=1)
    ours = functools.partial(flash_attn_func, softmax_scale=0.37, causal=True)
    assert_matches_oracle(ours, oracle_for(case, softmax_scale=0.37), (q, k, v), dout)


@pytest.mark.parametrize(
    "case", [Case(1, 37, 1, 2, 2, 32, causal=True), Case(1, 30, 10, 2, 2, 32, window=(3, 1))], ids=lambda c: c.id
)
def test_rows_without_keys_are_zero(case, device):
    """Rows that see no key must give exactly 0 and finite gradients (the -inf - -inf guard)."""
    q, k, v, dout = make_inputs(case, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = flash_attn_func(q, k, v, **case.kwargs)
    out.backward(dout)
    empty_rows = ~visible_mask(case.seqlen_q, case.seqlen_k, case.causal, case.window, device).any(-1)
    assert empty_rows.any(), "the case should have rows without keys"
    assert (out[:, empty_rows] == 0).all(), "rows without a visible key must be exactly 0"
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf"
    assert (q.grad[:, empty_rows] == 0).all(), "dq of rows without keys must be 0"


VARLEN_CASES = [
    # (lengths_q, lengths_k, nheads, nheads_k, headdim, kwargs)
    ([5, 17, 1], [5, 17, 1], 2, 2, 32, {}),
    ([5, 17, 1], [5, 17, 1], 2, 2, 32, {"causal": True}),
    ([3, 0, 20, 9], [7, 4, 0, 30], 2, 1, 40, {"causal": True}),  # empty q sequence, empty k sequence
    ([12, 33], [30, 20], 4, 2, 59, {"window_size": (4, 4)}),
    ([25, 7, 16], [9, 40, 16], 2, 2, 24, {"causal": True, "softcap": 2.0}),
    ([0, 0, 11], [0, 6, 11], 2, 2, 16, {}),  # leading empty sequences
]


def varlen_id(params):
    lengths_q, lengths_k, nheads, nheads_k, headdim, kwargs = params
    flags = "".join(f"-{k}{v}" for k, v in kwargs.items())
    return f"q{','.join(map(str, lengths_q))}-k{','.join(map(str, lengths_k))}-H{nheads}/{nheads_k}-D{headdim}{flags}"


def oracle_kwargs(kwargs):
    """flash_attn_* keyword arguments -> attention_oracle's."""
    return {
        "causal": kwargs.get("causal", False),
        "window": kwargs.get("window_size", (-1, -1)),
        "softcap": kwargs.get("softcap", 0.0),
        "softmax_scale": kwargs.get("softmax_scale"),
    }


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("params", VARLEN_CASES, ids=varlen_id)
def test_varlen(params, deterministic, device, monkeypatch):
    force_dq_path(monkeypatch, deterministic)
    lengths_q, lengths_k, nheads, nheads_k, headdim, kwargs = params
    kwargs = dict(kwargs, deterministic=deterministic)
    q, k, v, dout, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, nheads, nheads_k, headdim, device)

    def ours(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), **kwargs)

    def oracle(q, k, v):
        return varlen_oracle(q, k, v, cu_q, cu_k, **oracle_kwargs(kwargs))[0]

    out, _ = assert_matches_oracle(ours, oracle, (q, k, v), dout)
    for b, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        if lk == 0 and lq > 0:
            assert (out[cu_q[b] : cu_q[b + 1]] == 0).all(), f"sequence {b} has no keys: its output must be 0"


def test_noncontiguous_fused_qkv(device):
    """q, k, v as views of one fused projection [B, L, (H + 2 Hk) * D], and the [B, H, L, D]
    layout Transformers hands over, transposed: both work through strides."""
    batch, seqlen, nheads, nheads_k, headdim = 2, 27, 2, 1, 32
    gen = torch.Generator(device=device).manual_seed(3)
    fused = torch.randn(batch, seqlen, (nheads + 2 * nheads_k) * headdim, generator=gen, device=device).half()
    dout = torch.randn(batch, seqlen, nheads, headdim, generator=gen, device=device).half()

    def split(fused):
        q, k, v = fused.split([nheads * headdim, nheads_k * headdim, nheads_k * headdim], dim=-1)
        return (
            q.unflatten(-1, (nheads, headdim)),
            k.unflatten(-1, (nheads_k, headdim)),
            v.unflatten(-1, (nheads_k, headdim)),
        )

    assert not split(fused)[0].is_contiguous()
    oracle = oracle_for(Case(batch, seqlen, seqlen, nheads, nheads_k, headdim, causal=True))
    assert_matches_oracle(
        lambda f: flash_attn_func(*split(f), causal=True),
        lambda f: oracle(*split(f)),
        (fused,),
        dout,
        grad_names=("dfused",),
    )

    # [B, H, L, D] tensors transposed to [B, L, H, D]: stride 1 on D, but heads outer to positions
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in split(fused))
    assert not q.is_contiguous()
    assert_matches_oracle(functools.partial(flash_attn_func, causal=True), oracle, (q, k, v), dout)


def test_noncontiguous_varlen(device):
    lengths, nheads, headdim = [6, 19], 2, 16
    gen = torch.Generator(device=device).manual_seed(4)
    qkv = torch.randn(sum(lengths), 3, nheads, headdim, generator=gen, device=device).half()
    dout = torch.randn(sum(lengths), nheads, headdim, generator=gen, device=device).half()
    cu = cu_seqlens(lengths, device)

    def ours(qkv):
        return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max(lengths), max(lengths))

    def oracle(qkv):
        return varlen_oracle(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu)[0]

    assert_matches_oracle(ours, oracle, (qkv,), dout, grad_names=("dqkv",))


@pytest.mark.parametrize(
    "case",
    [Case(1, 21, 37, 4, 2, 32, causal=True, softcap=3.0), Case(2, 37, 21, 2, 2, 16, window=(4, 2))],
    ids=lambda c: c.id,
)
def test_lse(case, device):
    q, k, v, _ = make_inputs(case, device)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, **case.kwargs)
    assert probs is None
    assert lse.shape == (case.batch, case.nheads, case.seqlen_q) and lse.dtype == torch.float32
    _, ref_lse = attention_oracle(
        q.float(), k.float(), v.float(), causal=case.causal, window=case.window, softcap=case.softcap
    )
    has_key = visible_mask(case.seqlen_q, case.seqlen_k, case.causal, case.window, device).any(-1)
    torch.testing.assert_close(lse[..., has_key], ref_lse[..., has_key], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, **case.kwargs), atol=0, rtol=0)


def test_lse_varlen(device):
    lengths_q, lengths_k = [4, 0, 13], [9, 5, 13]
    q, k, v, _, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, 2, 1, 32, device)
    _out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 13, 13, causal=True, return_attn_probs=True)
    assert lse.shape == (2, sum(lengths_q)) and lse.dtype == torch.float32
    _, ref_lse = varlen_oracle(q.float(), k.float(), v.float(), cu_q, cu_k, causal=True)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)


def grads_of(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, dout)


def test_deterministic_bitwise(device):
    case = Case(2, 50, 50, 4, 1, 32, causal=True, deterministic=True)
    q, k, v, dout = make_inputs(case, device)
    ours = functools.partial(flash_attn_func, **case.kwargs)
    _, first = assert_matches_oracle(ours, oracle_for(case), (q, k, v), dout)
    second = grads_of(ours, (q, k, v), dout)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.parametrize("head_dim", [128, 129])
def test_deterministic_default_follows_the_head_dim(head_dim, device, monkeypatch):
    """deterministic=False takes atomic dQ only from ATOMIC_DQ_MIN_HEAD_DIM on, as the docstring says."""
    from hf_flash.ops import function

    doc = " ".join(flash_attn_func.__doc__.split("deterministic:")[1].split())
    assert f"below head dim {function.ATOMIC_DQ_MIN_HEAD_DIM}" in doc and f"from {function.ATOMIC_DQ_MIN_HEAD_DIM} on" in doc
    chosen = []
    monkeypatch.setattr(function, "flash_bwd", lambda *args: chosen.append(args[-1]))
    q = torch.randn(1, 3, 1, head_dim, device=device).half().requires_grad_()
    flash_attn_func(q, q, q).float().sum().backward()
    assert chosen == [head_dim < function.ATOMIC_DQ_MIN_HEAD_DIM], "the last argument of flash_bwd: deterministic"


def test_deterministic_varlen_bitwise(device):
    q, k, v, dout, cu_q, cu_k = varlen_inputs([9, 30], [30, 9], 2, 1, 32, device)
    ours = functools.partial(
        flash_attn_varlen_func,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=30,
        max_seqlen_k=30,
        deterministic=True,
    )
    first, second = grads_of(ours, (q, k, v), dout), grads_of(ours, (q, k, v), dout)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


# ---- dropout: reproducible from the torch RNG state; the mask is read back through the kernel itself ----


DROPOUT_CASES = [
    Case(1, 33, 45, 4, 2, 32, causal=True, dropout_p=0.17),
    Case(2, 24, 24, 2, 1, 64, dropout_p=0.5),
    Case(1, 48, 48, 2, 1, 32, causal=True, dropout_p=0.2),  # block-aligned causal (diagonal in the main loop)
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_dropout_against_recovered_mask(case, device):
    """Forward and backward must use one mask: the one the forward shows through one-hot values."""
    q, k, v, dout = make_inputs(case, device)
    keep, _ = dense_keep_mask(flash_attn_func, case, k, seed=1234)

    def ours(q, k, v):
        torch.manual_seed(1234)
        return flash_attn_func(q, k, v, **case.kwargs)

    assert_matches_oracle(ours, oracle_for(case, keep=keep, dropout_p=case.dropout_p), (q, k, v), dout)


def test_dropout_mask_statistics(device):
    case = Case(2, 48, 64, 2, 2, 64, dropout_p=0.3)
    k = make_inputs(case, device)[1]
    keep, weights = dense_keep_mask(flash_attn_func, case, k, seed=7)
    n = keep.numel()  # non-causal, no window: every entry is visible
    dropped = 1 - keep.sum().item() / n
    sigma = (case.dropout_p * (1 - case.dropout_p) / n) ** 0.5
    assert abs(dropped - case.dropout_p) < 5 * sigma, f"dropped fraction {dropped:.4f}, expected {case.dropout_p}"
    # q = 0 gives every key weight 1 / Lk, so a kept entry is 1 / (Lk (1 - p)) up to fp16 rounding
    expected = 1 / (case.seqlen_k * (1 - case.dropout_p))
    torch.testing.assert_close(weights[keep], torch.full_like(weights[keep], expected), rtol=2e-3, atol=0)
    # masks of different heads, batches and rows must not repeat each other
    assert not torch.equal(keep[0, 0], keep[0, 1]), "heads share one dropout mask"
    assert not torch.equal(keep[0], keep[1]), "batches share one dropout mask"
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]), "rows share one dropout mask"
    other, _ = dense_keep_mask(flash_attn_func, case, k, seed=8)
    assert not torch.equal(keep, other), "a different seed must give a different mask"


def test_dropout_reproducible(device):
    case = Case(1, 40, 40, 2, 1, 32, causal=True, dropout_p=0.25)
    q, k, v, dout = make_inputs(case, device)

    def run(seed):
        torch.manual_seed(seed)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = flash_attn_func(*leaves, **case.kwargs)
        return (out, *torch.autograd.grad(out, leaves, dout))

    first, again, other = run(5), run(5), run(6)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), f"{name} differs between two runs from the same seed"
    assert not torch.equal(first[0], other[0]), "a different seed gave the same output"
    no_dropout = flash_attn_func(q, k, v, causal=True)
    assert not torch.equal(first[0], no_dropout), "dropout_p > 0 had no effect"


def test_dropout_varlen(device):
    lengths_q, lengths_k, nheads, headdim, p = [7, 0, 20], [15, 3, 20], 2, 32, 0.2
    q, k, v, dout, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, nheads, nheads, headdim, device)
    kw = {
        "cu_seqlens_q": cu_q,
        "cu_seqlens_k": cu_k,
        "max_seqlen_q": 20,
        "max_seqlen_k": 20,
        "causal": True,
        "dropout_p": p,
    }

    def ours(q, k, v):
        torch.manual_seed(99)
        return flash_attn_varlen_func(q, k, v, **kw)

    keep = varlen_keep_masks(flash_attn_varlen_func, q, k, lengths_q, lengths_k, seed=99, causal=True, dropout_p=p)

    def oracle(q, k, v):
        return varlen_oracle(q, k, v, cu_q, cu_k, keep=keep, causal=True, dropout_p=p)[0]

    assert_matches_oracle(ours, oracle, (q, k, v), dout)


# ---- packed variants: same results as the unpacked call ----


def test_qkvpacked(device):
    case = Case(1, 33, 33, 2, 2, 32, causal=True)
    q, k, v, dout = make_inputs(case, device)
    qkv = torch.stack([q, k, v], dim=2)
    oracle = oracle_for(case)
    assert_matches_oracle(
        lambda qkv: flash_attn_qkvpacked_func(qkv, causal=True),
        lambda qkv: oracle(*qkv.unbind(2)),
        (qkv,),
        dout,
        grad_names=("dqkv",),
    )


def test_kvpacked_gqa(device):
    case = Case(2, 20, 41, 4, 2, 32, window=(6, 3))
    q, k, v, dout = make_inputs(case, device)
    oracle = oracle_for(case)
    assert_matches_oracle(
        lambda q, kv: flash_attn_kvpacked_func(q, kv, window_size=(6, 3)),
        lambda q, kv: oracle(q, *kv.unbind(2)),
        (q, torch.stack([k, v], dim=2)),
        dout,
        grad_names=("dq", "dkv"),
    )


def test_varlen_qkvpacked(device):
    lengths = [13, 1, 30]
    q, k, v, dout, cu, _ = varlen_inputs(lengths, lengths, 2, 2, 16, device)
    assert_matches_oracle(
        lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, cu, 30, causal=True),
        lambda qkv: varlen_oracle(*qkv.unbind(1), cu, cu, causal=True)[0],
        (torch.stack([q, k, v], dim=1),),
        dout,
        grad_names=("dqkv",),
    )


def test_varlen_kvpacked(device):
    lengths_q, lengths_k = [5, 22], [18, 9]
    q, k, v, dout, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, 4, 1, 32, device)
    assert_matches_oracle(
        lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 22, 18, causal=True),
        lambda q, kv: varlen_oracle(q, *kv.unbind(1), cu_q, cu_k, causal=True)[0],
        (q, torch.stack([k, v], dim=1)),
        dout,
        grad_names=("dq", "dkv"),
    )


def test_torch_compile_fullgraph(device):
    """The custom ops trace without graph breaks; on CPU aot_eager checks the fake kernels without codegen."""
    torch._dynamo.reset()
    case = Case(1, 19, 19, 2, 1, 32, causal=True)
    q, k, v, _dout = make_inputs(case, device)

    def layer(q, k, v):
        return flash_attn_func(q * 1.5, k, v, causal=True).sum(dim=-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if ON_CPU else "inductor")
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = compiled(*leaves)
    ref = layer(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_grads = grads_of(layer, (q, k, v), torch.ones_like(out))
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=f"compiled {name} differs from eager")


# ---- the reference module agrees with this file's oracle ----


@pytest.mark.parametrize("case", [DENSE_CASES[4], DENSE_CASES[13], DENSE_CASES[16]], ids=lambda c: c.id)
def test_reference_module(case, device):
    from hf_flash.ops.reference import attention_ref

    q, k, v, _ = make_inputs(case, device)
    ours = attention_ref(q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap)
    expected = attention_oracle(
        q.float(), k.float(), v.float(), causal=case.causal, window=case.window, softcap=case.softcap
    )[0].to(q.dtype)
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=2e-3)


# ---- bad input: a clear error that names the argument ----


def _bad_inputs(device):
    def t(*shape, dtype=torch.float16, dev=device):
        return torch.randn(*shape, device=dev).to(dtype)

    q, kv = t(1, 8, 2, 32), t(1, 8, 2, 32)
    cu, total = cu_seqlens([3, 5], device), t(8, 2, 32)
    varlen = functools.partial(flash_attn_varlen_func, max_seqlen_q=5, max_seqlen_k=5)
    return {
        "q-fp32": (lambda: flash_attn_func(t(1, 8, 2, 32, dtype=torch.float32), kv, kv), r"\bq\b", r"16"),
        "q-int": (lambda: flash_attn_func(q.to(torch.int32), kv.to(torch.int32), kv.to(torch.int32)), r"\bq\b", ""),
        "k-dtype-mismatch": (lambda: flash_attn_func(q, kv.bfloat16(), kv), r"\bk\b", ""),
        "q-3d": (lambda: flash_attn_func(t(8, 2, 32), kv, kv), r"\bq\b", ""),
        "batch-mismatch": (lambda: flash_attn_func(q, t(2, 8, 2, 32), t(2, 8, 2, 32)), r"\bk\b|batch", ""),
        "headdim-mismatch": (lambda: flash_attn_func(q, t(1, 8, 2, 16), t(1, 8, 2, 16)), r"\bk\b|head.?dim", ""),
        "v-shape": (lambda: flash_attn_func(q, kv, t(1, 7, 2, 32)), r"\bv\b", ""),
        "nheads-not-multiple": (lambda: flash_attn_func(t(1, 8, 3, 32), kv, kv), r"head", ""),
        "headdim-over-256": (
            lambda: flash_attn_func(t(1, 8, 2, 264), t(1, 8, 2, 264), t(1, 8, 2, 264)),
            r"head.?dim|\bD\b",
            r"256",
        ),
        "k-other-device": (lambda: flash_attn_func(q, kv.to("meta"), kv), r"device", ""),
        "cu_seqlens-int64": (lambda: varlen(total, total, total, cu.long(), cu), r"cu_seqlens_q", r"int32"),
        "cu_seqlens-decreasing": (
            lambda: varlen(total, total, total, cu, cu.flip(0).contiguous()),
            r"cu_seqlens_k",
            "",
        ),
        "cu_seqlens-lengths-differ": (
            lambda: varlen(total, total, total, cu_seqlens([3, 4, 1], device), cu),
            r"cu_seqlens",
            "",
        ),
        "cu_seqlens-past-total": (
            lambda: varlen(total, total, total, cu_seqlens([3, 9], device), cu),
            r"cu_seqlens_q",
            "",
        ),
        "cu_seqlens-2d": (lambda: varlen(total, total, total, cu[None], cu), r"cu_seqlens_q", ""),
        "alibi": (lambda: flash_attn_func(q, kv, kv, alibi_slopes=torch.ones(2, device=device)), r"alibi_slopes", ""),
        "alibi-varlen": (
            lambda: varlen(total, total, total, cu, cu, alibi_slopes=torch.ones(2, device=device)),
            r"alibi_slopes",
            "",
        ),
    }


BAD_INPUT_IDS = list(_bad_inputs("cpu"))


@pytest.mark.parametrize("name", BAD_INPUT_IDS)
def test_bad_input(name, device):
    call, names_argument, accepted = _bad_inputs(device)[name]
    expected = NotImplementedError if name.startswith("alibi") else (ValueError, TypeError)
    with pytest.raises(expected) as info:
        call()
    message = str(info.value)
    assert re.search(names_argument, message), f"message does not name the argument: {message!r}"
    assert re.search(accepted, message), f"message does not say what is accepted: {message!r}"


def test_kernels_unavailable_reason(device):
    assert kernels_unavailable_reason(torch.device(device), torch.float16) is None
    assert isinstance(kernels_unavailable_reason(torch.device(device), torch.float32), str)


def test_cpu_tensors_without_interpreter():
    """In a process without TRITON_INTERPRET and without a GPU, CPU tensors get a reason and a clear error."""
    program = (
        "import torch, hf_flash\n"
        "from hf_flash.ops import kernels_unavailable_reason\n"
        "print('REASON', kernels_unavailable_reason(torch.device('cpu'), torch.float16))\n"
        "q = torch.randn(1, 4, 1, 16).half()\n"
        "try:\n"
        "    hf_flash.flash_attn_func(q, q, q)\n"
        "except (ValueError, TypeError, RuntimeError) as e:\n"
        "    print('ERROR', type(e).__name__, e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, "-c", program],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.abspath(hf_flash.__path__[0])),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reason_line = next(line for line in result.stdout.splitlines() if line.startswith("REASON"))
    assert reason_line != "REASON None", "CPU without interpreter must report a reason"
    assert "ERROR ValueError" in result.stdout or "ERROR TypeError" in result.stdout, result.stdout


def test_cu_seqlens_read_once_per_tensor(device, monkeypatch):
    """Reading cu_seqlens syncs the device: a tensor that passed is not read again by later calls (every
    layer of a model gets the same one), but an in-place change is, and bad values still raise."""
    cu, packed = cu_seqlens([3, 5], device), torch.randn(8, 2, 32, device=device).half()
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self is cu) or tolist(self))

    def call(c):
        return flash_attn_varlen_func(packed, packed, packed, c, c, 5, 5)

    first = call(cu)
    assert sum(reads) == 1, "cu_seqlens_q and cu_seqlens_k are one tensor: one read"
    torch.testing.assert_close(call(cu), first)
    assert sum(reads) == 1, "the same unmodified tensor was read again"
    cu[1] = 7  # in place: lengths 7 and 1, longer than max_seqlen = 5
    with pytest.raises(ValueError, match="max_seqlen_q"):
        call(cu)
    assert sum(reads) == 2


def test_equal_cu_seqlens_are_known_equal_without_a_read(device, monkeypatch):
    """Two cu_seqlens tensors that the input checks read as equal (Transformers' DataCollatorWithFlattening hands
    cu_seq_lens_q and cu_seq_lens_k over as two tensors) are known to be the same sequences with no further
    read; not once one is written to, nor when their values differ or were never read."""
    from hf_flash.ops import checks

    packed = torch.randn(8, 2, 32, device=device).half()
    cu_q, cu_k, other = cu_seqlens([3, 5], device), cu_seqlens([3, 5], device), cu_seqlens([5, 3], device)
    assert checks.same_boundaries(cu_q, cu_q) and not checks.same_boundaries(cu_q, cu_k), "not read yet"
    flash_attn_varlen_func(packed, packed, packed, cu_q, cu_k, 5, 5)
    flash_attn_varlen_func(packed, packed, packed, cu_q, other, 5, 5)
    reads = []
    monkeypatch.setattr(checks, "_read", lambda t: reads.append(t) or t.tolist())
    assert checks.same_boundaries(cu_q, cu_k) and checks.same_boundaries(cu_k, cu_q)
    assert not checks.same_boundaries(cu_q, other), "other lengths"
    cu_k[1] = 3  # in place, even to the same value: no longer known
    assert not checks.same_boundaries(cu_q, cu_k)
    assert not reads, "knowing costs no read"


def test_autograd_only_where_a_gradient_is_wanted(device, monkeypatch):
    """Inference calls (no input requires grad, or grad mode off) skip the autograd Function, whose
    bookkeeping is host time that short calls (generation) feel; training calls still build the graph."""
    from hf_flash.ops import function

    q, k, v = (torch.randn(1, 17, 2, 32, device=device).half() for _ in range(3))
    expected = flash_attn_func(q, k, v, causal=True)
    real_apply = function._EagerAttention.apply
    applied = []
    monkeypatch.setattr(function._EagerAttention, "apply", lambda *a: applied.append(1) or real_apply(*a))
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True), expected, atol=0, rtol=0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        out = flash_attn_func(*leaves, causal=True)
    assert not applied and out.grad_fn is None
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out = flash_attn_func(q, leaves[1], v, causal=True)  # one input wants a gradient: the graph is built
    assert applied == [1] and out.grad_fn is not None
    out.float().sum().backward()
    assert leaves[1].grad is not None and leaves[1].grad.shape == k.shape


def test_varlen_under_inference_mode(device):
    """Tensors made under ``torch.inference_mode`` have no version counter, so the read-once cache of
    cu_seqlens cannot key on it: they are checked on every call (bad values still raise)."""
    lengths = [3, 5]
    with torch.inference_mode():
        cu = cu_seqlens(lengths, device)
        packed = torch.randn(8, 2, 32, device=device).half()
        first = flash_attn_varlen_func(packed, packed, packed, cu, cu, 5, 5, causal=True)
        torch.testing.assert_close(flash_attn_varlen_func(packed, packed, packed, cu, cu, 5, 5, causal=True), first)
        with pytest.raises(ValueError, match="max_seqlen_q"):
            flash_attn_varlen_func(packed, packed, packed, cu, cu, 4, 4)
    expected = flash_attn_varlen_func(packed.clone(), packed.clone(), packed.clone(), cu.clone(), cu.clone(), 5, 5,
                                      causal=True)
    torch.testing.assert_close(first, expected, atol=0, rtol=0)


def test_vouched_cu_seqlens_are_not_read(device, monkeypatch):
    """cu_seqlens that hf_flash built itself (the integration's padding plan) are recorded as valid and
    never read back, also under inference_mode, where anyone else's are read on every call."""
    from hf_flash.ops import checks

    reads = []
    monkeypatch.setattr(checks, "_read", lambda t: reads.append(t) or t.tolist())
    with torch.inference_mode():
        packed = torch.randn(8, 2, 32, device=device).half()
        theirs, ours = cu_seqlens([3, 5], device), cu_seqlens([3, 5], device)
        checks.vouch_for_cu_seqlens(ours, 8, 5)
        for _ in range(2):
            out_ours = flash_attn_varlen_func(packed, packed, packed, ours, ours, 5, 5, causal=True)
            out_theirs = flash_attn_varlen_func(packed, packed, packed, theirs, theirs, 5, 5, causal=True)
        assert all(t is theirs for t in reads) and len(reads) == 4, "q and k of two calls: four reads of theirs"
        torch.testing.assert_close(out_ours, out_theirs, atol=0, rtol=0)
        # the vouch holds for the numbers it was given only: another total or max_seqlen is checked
        with pytest.raises(ValueError, match="max_seqlen_q"):
            flash_attn_varlen_func(packed, packed, packed, ours, ours, 4, 4)
    assert reads[-1] is ours
