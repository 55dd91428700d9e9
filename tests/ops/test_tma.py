"""The tensor-descriptor (TMA) path of the tile loads, against the fp32 oracle and against the pointer path.

On a Hopper GPU the sm90 table turns TMA on wherever the tensors allow it (``common.tma_layout``). On
the CPU, Triton's interpreter runs host-side descriptors too, so these tests force the path there
(``force_tma``) and check the part that is ours: the coordinates (flattened batch row, head column)
and the zeroing of rows that belong to the next sequence, which TMA itself never masks.
"""

from __future__ import annotations

import dataclasses
import functools

import hf_flash.ops.backward
import hf_flash.ops.common
import hf_flash.ops.config
import hf_flash.ops.forward
import pytest
import torch
from conftest import assert_close_rel
from flash_oracle import (
    Case,
    assert_matches_oracle,
    make_inputs,
    oracle_for,
    out_and_grads,
    varlen_inputs,
    varlen_oracle,
)

from hf_flash import flash_attn_func, flash_attn_varlen_func
from hf_flash.ops.common import TmaLayout, tma_layout, tma_layout_ok


@pytest.fixture
def force_tma(monkeypatch):
    """Every kernel config asks for TMA and the device counts as TMA-capable (the interpreter on CPU); the
    layout rules still apply. Returns a function that turns it back off, for pointer-path baselines."""
    pick = hf_flash.ops.config._pick

    def with_tma(kernel, head_dim, device, max_seqlen_q=None, varlen=False):
        return dataclasses.replace(pick(kernel, head_dim, device, max_seqlen_q, varlen), tma=True)

    monkeypatch.setattr(hf_flash.ops.config, "_pick", with_tma)
    monkeypatch.setattr(hf_flash.ops.common, "tma_device_ok", lambda t: True)

    def off():
        monkeypatch.setattr(hf_flash.ops.config, "_pick", pick)

    return off


TMA_CASES = [
    Case(2, 37, 37, 2, 2, 32, causal=True),  # a second batch element right after a partial block
    Case(3, 23, 41, 4, 2, 16),  # Lq < Lk, GQA: the kv head's column
    Case(2, 41, 23, 2, 1, 32, causal=True, deterministic=True),  # Lq > Lk, MQA, separate dQ kernel
    Case(2, 40, 40, 2, 2, 16, window=(6, 3), softcap=5.0),
]


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: c.id)
def test_tma_dense(case, device, force_tma):
    q, k, v, dout = make_inputs(case, device, seed=3)
    ours = functools.partial(flash_attn_func, **case.kwargs)
    assert_matches_oracle(ours, oracle_for(case), (q, k, v), dout)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_tma_varlen_neighbours(deterministic, device, force_tma, monkeypatch):
    """Packed sequences: a tile that runs past its sequence reads the next one's rows through TMA; they
    must count as absent, even where they hold NaN (0 * NaN is NaN: a masked score alone does not stop it).
    The NaN rows are the keys of a sequence without queries, so no result depends on them."""
    if not deterministic:  # the atomic dQ path, at a head dim the small CPU shapes reach
        monkeypatch.setattr(hf_flash.ops.function, "ATOMIC_DQ_MIN_HEAD_DIM", 1)
    lengths_q, lengths_k = [19, 0, 26, 5], [21, 3, 26, 9]
    q, k, v, dout, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, 4, 2, 32, device, seed=4)
    k[21:24], v[21:24] = float("nan"), float("nan")  # the empty-query sequence's keys, after the first's

    def ours(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True,
                                      deterministic=deterministic)

    def oracle(q, k, v):
        return varlen_oracle(q, k, v, cu_q, cu_k, causal=True)[0]

    assert_matches_oracle(ours, oracle, (q, k, v), dout)


@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
def test_varlen_query_neighbours(use_tma, device, force_tma):
    """The dK/dV kernel's query tiles: a tile that runs past its sequence reads the next one's query and
    dO rows, which must count as absent even where they hold NaN (they would reach dK and dV through
    ``0 * NaN``). The NaN rows are the queries of a sequence without keys, so no result depends on them;
    they follow a sequence whose last query block is partial and on the causal diagonal."""
    if not use_tma:
        force_tma()
    lengths_q, lengths_k = [19, 26, 3, 5], [21, 26, 0, 9]
    q, k, v, dout, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, 2, 1, 32, device, seed=5)
    q[45:48], dout[45:48] = float("nan"), float("nan")  # the key-less sequence, after the 26-token one

    def ours(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True)

    def oracle(q, k, v):
        return varlen_oracle(q, k, v, cu_q, cu_k, causal=True)[0]

    keep = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    keep[45:48] = False
    out, grads = out_and_grads(ours, (q, k, v), dout)
    ref_out, ref_grads = out_and_grads(oracle, (q, k, v), dout, upcast=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        a, b = (a[keep], b[keep]) if name in ("out", "dq") else (a, b)
        assert torch.isfinite(a).all(), f"{name}: the NaN rows of the next sequence leaked in"
        torch.testing.assert_close(a.float(), b, atol=5e-3, rtol=0, msg=f"{name} differs from the oracle")


def test_tma_matches_pointer_path(device, force_tma):
    """The two ways of loading a tile compute the same products in the same order."""
    case = Case(2, 45, 45, 2, 1, 32, causal=True, deterministic=True)
    q, k, v, dout = make_inputs(case, device, seed=6)
    results = []
    for use in (True, False):
        if not use:
            force_tma()
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attn_func(*x, causal=True, deterministic=True)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in x])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0, msg=f"{name}: TMA and pointer paths differ")


def _head_major(t, spare=0):
    """``t`` ``[B, L, H, D]`` stored as ``[B, H, L + spare, D]`` (the KV cache's layout; the spare capacity
    holds NaN) and viewed back as ``[B, L, H, D]``. Returns (the view, the storage tensor)."""
    b, length, h, d = t.shape
    store = torch.full((b, h, length + spare, d), float("nan"), dtype=t.dtype, device=t.device)
    store[:, :, :length] = t.transpose(1, 2)
    return store[:, :, :length].transpose(1, 2), store


@pytest.mark.parametrize("which", ["kv", "q_do"])
def test_tma_head_major(which, device, force_tma, monkeypatch):
    """K/V as the KV cache keeps them (``[B, H, L, D]`` storage with spare capacity past L), or Q and dO in
    that layout: read through head-major descriptors (``common.TmaLayout``), each (batch, head) on its own
    rows. A tile past L reads the spare rows (NaN here) or the next head's, which must count as absent."""
    case = Case(2, 37, 45, 4, 2, 32, causal=True)  # GQA, Lq < Lk, partial blocks
    q, k, v, dout = make_inputs(case, device, seed=7)
    chosen = []  # (kernel's operands, TMA on, head-major) of every launch

    def spy(module, name):
        real = getattr(module, "tma_pair")

        def record(a, b, *args):
            pair = real(a, b, *args)
            chosen.append((name, pair.use, pair.head_major))
            return pair

        monkeypatch.setattr(module, "tma_pair", record)

    spy(hf_flash.ops.forward, "kv")
    spy(hf_flash.ops.backward, "bwd")
    inputs = [q, k, v, dout]
    moved = (1, 2) if which == "kv" else (0, 3)
    views, stores = list(inputs), {}
    for i in moved:
        views[i], stores[i] = _head_major(inputs[i], spare=5)
    leaves = [stores[i] if i in stores else views[i] for i in range(3)]
    leaves = [t.detach().requires_grad_() for t in leaves]
    qkv = [leaves[i][:, :, : inputs[i].shape[1]].transpose(1, 2) if i in stores else leaves[i] for i in range(3)]
    out = flash_attn_func(*qkv, causal=True, deterministic=True)
    out.backward(views[3])
    grads = [leaves[i].grad[:, :, : inputs[i].shape[1]].transpose(1, 2) if i in stores else leaves[i].grad
             for i in range(3)]
    # the backward launches dQ (K/V descriptors) before dK/dV (Q/dO descriptors): dQ stores delta
    expected = [("kv", True, which == "kv"), ("bwd", True, which == "kv"), ("bwd", True, which == "q_do")]
    assert chosen == expected, f"descriptor layouts {chosen}, expected {expected}"
    oracle = oracle_for(case)
    ref_out, ref_grads = out_and_grads(oracle, (q, k, v), dout, upcast=True)
    pt_out, pt_grads = out_and_grads(oracle, (q, k, v), dout)
    assert_close_rel("out", out, ref_out, pt_out, 2)
    for name, grad, ref, pt in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_rel(name, grad, ref, pt, 3)


@pytest.mark.parametrize("head_dim, expected", [(32, True), (24, False)], ids=["D32", "D24"])
def test_stats_descriptors_only_beside_q_do(head_dim, expected, device, force_tma, monkeypatch):
    """The dK/dV kernel reads LSE and delta through descriptors only where it reads Q and dO through them: with
    pointer loads of Q/dO (a head dim that is not a power of two) Triton 3.6's ptxas crashes on the non-causal
    kernel at D40/80/96 (sm90), so the launcher must not combine the two."""
    chosen = []
    real = hf_flash.ops.backward.stats_pair

    def record(*args):
        kwargs = real(*args)
        chosen.append(kwargs["STATS_TMA"])
        return kwargs

    monkeypatch.setattr(hf_flash.ops.backward, "stats_pair", record)
    case = Case(2, 24, 24, 2, 2, head_dim, deterministic=True)
    q, k, v, dout = make_inputs(case, device, seed=5)
    ours = functools.partial(flash_attn_func, **case.kwargs)
    assert_matches_oracle(ours, oracle_for(case), (q, k, v), dout)
    assert chosen == [expected], f"STATS_TMA {chosen} at D{head_dim}, expected [{expected}]"


@pytest.mark.parametrize(
    "shape, view, varlen, expected",
    [
        ((2, 8, 4, 64), None, False, TmaLayout()),
        ((2, 8, 4, 80), None, False, None),  # a 128-wide tile would read the next head's columns
        ((2, 8, 4, 8), None, False, None),  # below 16 bytes of bf16... and below tl.dot's minimum
        ((2, 8, 12, 64), "qkv", False, TmaLayout()),  # q of a fused [B, L, 3 * H, D] projection: rows 3HD apart
        ((2, 8, 4, 64), "bhld", False, TmaLayout(True, 4 * 8, 8)),  # [B, H, L, D] transposed: head-major rows
        ((2, 8, 4, 64), "bhld_spare", False, TmaLayout(True, 4 * 11, 11)),  # a cache with capacity 11
        ((2, 8, 4, 80), "bhld", False, None),
        ((2, 8, 4, 64), "batch_gap", False, None),  # batches not evenly spaced, tokens not D apart
        ((17, 4, 64), None, True, TmaLayout()),
        ((17, 4, 64), "bhld", True, None),  # head-major varlen ([H, total, D] transposed): not supported
        ((2, 8, 4, 64), "misaligned", False, None),
    ],
)
def test_tma_layout_rules(shape, view, varlen, expected):
    t = torch.zeros(shape, dtype=torch.float16)
    if view == "qkv":
        t = t[:, :, : shape[2] // 3]
    elif view == "bhld" and varlen:
        t = torch.zeros(shape[1], shape[0], shape[2], dtype=torch.float16).transpose(0, 1)
    elif view in ("bhld", "bhld_spare"):
        spare = 3 if view == "bhld_spare" else 0
        t = torch.zeros(shape[0], shape[2], shape[1] + spare, shape[3], dtype=torch.float16)
        t = t[:, :, : shape[1]].transpose(1, 2)
    elif view == "batch_gap":
        t = torch.zeros(shape[0], shape[1] + 1, *shape[2:], dtype=torch.float16)[:, : shape[1]]
    elif view == "misaligned":
        t = torch.zeros(t.numel() + 1, dtype=torch.float16)[1:].view(shape)
    assert tma_layout(t, varlen) == expected
    assert tma_layout_ok(t, varlen) is (expected == TmaLayout())  # the heads-side-by-side rule alone
