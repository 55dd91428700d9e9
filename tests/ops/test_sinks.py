"""Attention sinks (gpt-oss's ``s_aux``, ``sinks=`` of flash_attn_func): one logit per query head that joins
every row's softmax with no value. Checked against the oracle of flash_oracle.py, which appends the sink as a
last score column as Transformers' eager attention does, under flash-attn's rule (output 2x, gradients 3x
PyTorch's own same-dtype error), the sink's gradient included.

CPU cases run under Triton's interpreter in fp16 (tiny odd shapes); the bf16 cases at the end are marked
``gpu``. The fallback (PyTorch math, since SDPA has no sinks) and the routing rule are checked here too.
"""

import dataclasses
import functools
import re

import pytest
import torch
from flash_oracle import (
    Case,
    assert_matches_oracle,
    attention_oracle,
    cu_seqlens,
    make_inputs,
    make_sinks,
    varlen_inputs,
    varlen_oracle,
    visible_mask,
)
from test_flash_attn import force_dq_path, varlen_id

import hf_flash
from hf_flash import flash_attn_func, flash_attn_varlen_func

ON_CPU = not torch.cuda.is_available()
GRADS = ("dq", "dk", "dv", "dsinks")


def sink_oracle(case: Case, **extra):
    """(q, k, v, sinks) -> the oracle's output, with the case's masking options."""
    def oracle(q, k, v, sinks):
        return attention_oracle(q, k, v, causal=case.causal, window=case.window, softcap=case.softcap,
                                sinks=sinks, **extra)[0]

    return oracle


def check_case(case: Case, device, seed=0):
    q, k, v, dout = make_inputs(case, device, seed=seed)
    sinks = make_sinks(case.nheads, device, seed)

    def ours(q, k, v, sinks):
        return flash_attn_func(q, k, v, sinks=sinks, **case.kwargs)

    return assert_matches_oracle(ours, sink_oracle(case), (q, k, v, sinks), dout, grad_names=GRADS)


SINK_CASES = [
    Case(1, 23, 23, 2, 2, 32, sinks=True),
    Case(2, 17, 33, 4, 2, 40, causal=True, sinks=True),  # Lq < Lk causal (bottom-right), GQA
    Case(1, 33, 17, 2, 1, 32, causal=True, sinks=True),  # Lq > Lk causal: the first 16 rows see no key
    Case(1, 1, 37, 4, 1, 32, causal=True, sinks=True),  # decoding step over a KV cache, MQA
    Case(1, 40, 40, 4, 1, 32, causal=True, window=(8, 0), sinks=True),  # gpt-oss's sliding layers, GQA
    Case(1, 30, 10, 2, 2, 16, window=(3, 1), sinks=True),  # window with Lq > Lk: rows without keys
    Case(1, 29, 47, 2, 2, 24, softcap=2.0, sinks=True),  # the sink is compared with the capped scores
    Case(2, 64, 64, 4, 2, 32, causal=True, sinks=True),  # block-aligned causal: diagonal in the main loop
    Case(1, 21, 19, 2, 2, 59, sinks=True),  # odd head dim
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: c.id)
def test_sinks_output_and_grads(case, deterministic, device, monkeypatch):
    force_dq_path(monkeypatch, deterministic)
    check_case(dataclasses.replace(case, deterministic=deterministic), device)


def test_sinks_with_softmax_scale_and_dropout_off(device):
    """The sink is a raw logit: a softmax_scale other than 1/sqrt(D) scales the scores, not the sink."""
    case = Case(1, 19, 23, 2, 1, 32, causal=True, sinks=True)
    q, k, v, dout = make_inputs(case, device, seed=1)
    sinks = make_sinks(case.nheads, device, 1)
    ours = functools.partial(flash_attn_func, softmax_scale=0.37, causal=True)
    assert_matches_oracle(lambda q, k, v, s: ours(q, k, v, sinks=s), sink_oracle(case, softmax_scale=0.37),
                          (q, k, v, sinks), dout, grad_names=GRADS)


SINK_VARLEN_CASES = [
    # (lengths_q, lengths_k, nheads, nheads_k, headdim, kwargs)
    ([5, 17, 1], [5, 17, 1], 2, 2, 32, {"causal": True}),  # packed sequences
    ([3, 0, 20, 9], [7, 4, 0, 30], 2, 1, 40, {"causal": True}),  # empty q / k sequences: rows with only the sink
    ([12, 33], [30, 20], 4, 2, 59, {"window_size": (4, 4)}),
    ([1, 1, 1], [9, 30, 2], 4, 1, 32, {"causal": True}),  # one decoding step per sequence (padded KV cache)
    ([25, 7, 16], [9, 40, 16], 2, 2, 24, {"causal": True, "softcap": 2.0}),
]


def _oracle_kwargs(kwargs):
    return {"causal": kwargs.get("causal", False), "window": kwargs.get("window_size", (-1, -1)),
            "softcap": kwargs.get("softcap", 0.0)}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("params", SINK_VARLEN_CASES, ids=varlen_id)
def test_sinks_varlen(params, deterministic, device, monkeypatch, dtype=torch.float16):
    force_dq_path(monkeypatch, deterministic)
    lengths_q, lengths_k, nheads, nheads_k, headdim, kwargs = params
    q, k, v, dout, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, nheads, nheads_k, headdim, device, dtype)
    sinks = make_sinks(nheads, device)

    def ours(q, k, v, sinks):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), sinks=sinks,
                                      deterministic=deterministic, **kwargs)

    def oracle(q, k, v, sinks):
        return varlen_oracle(q, k, v, cu_q, cu_k, sinks=sinks, **_oracle_kwargs(kwargs))[0]

    out, _ = assert_matches_oracle(ours, oracle, (q, k, v, sinks), dout, grad_names=GRADS)
    for b, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        if lk == 0 and lq > 0:
            assert (out[cu_q[b] : cu_q[b + 1]] == 0).all(), f"sequence {b} has no keys: its output must be 0"


@pytest.mark.parametrize(
    "case",
    [Case(1, 37, 5, 2, 2, 32, causal=True, sinks=True), Case(1, 30, 10, 2, 2, 32, window=(3, 1), sinks=True)],
    ids=lambda c: c.id,
)
def test_sinks_rows_without_keys(case, device):
    """A row that sees no key has the sink alone: out exactly 0, lse = the sink (finite), finite gradients,
    and no contribution to the sink's gradient (its delta = rowsum(dO * 0) is 0)."""
    q, k, v, dout = make_inputs(case, device)
    sinks = make_sinks(case.nheads, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, lse, _ = flash_attn_func(*leaves[:3], sinks=leaves[3], return_attn_probs=True, **case.kwargs)
    grads = torch.autograd.grad(out, leaves, dout)
    empty = ~visible_mask(case.seqlen_q, case.seqlen_k, case.causal, case.window, device).any(-1)
    assert empty.any(), "the case should have rows without keys"
    assert (out[:, empty] == 0).all(), "rows without a visible key must be exactly 0"
    torch.testing.assert_close(lse[:, :, empty], sinks[None, :, None].expand(1, -1, int(empty.sum())),
                               atol=1e-6, rtol=1e-6)
    for name, t in zip(("out", *GRADS), (out, *grads)):
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf"
    assert (grads[0][:, empty] == 0).all(), "dq of rows without keys must be 0"


def test_sink_of_minus_inf_is_no_sink(device):
    """sinks = -inf (exp = 0) reproduces attention without sinks, including +inf LSE on rows without keys."""
    case = Case(1, 37, 5, 2, 2, 32, causal=True)
    q, k, v, _ = make_inputs(case, device)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    minus_inf = torch.full((case.nheads,), float("-inf"), device=device)
    out_s, lse_s, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, sinks=minus_inf)
    torch.testing.assert_close(out_s, out, atol=0, rtol=0)
    torch.testing.assert_close(lse_s, lse, atol=0, rtol=0)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_sinks_lse(varlen, device):
    """The returned LSE includes the sink: logsumexp over the visible scores and the sink."""
    lengths_q, lengths_k = [4, 0, 13], [9, 5, 13]
    q, k, v, _, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, 2, 1, 32, device)
    sinks = make_sinks(2, device)
    if varlen:
        _, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 13, 13, causal=True, sinks=sinks,
                                           return_attn_probs=True)
        _, ref = varlen_oracle(q.float(), k.float(), v.float(), cu_q, cu_k, causal=True, sinks=sinks)
    else:
        qd, kd, vd = (t[None, -13:] for t in (q, k, v))
        _, lse, _ = flash_attn_func(qd, kd, vd, causal=True, sinks=sinks, return_attn_probs=True)
        _, ref = attention_oracle(qd.float(), kd.float(), vd.float(), causal=True, sinks=sinks)
    torch.testing.assert_close(lse, ref, atol=2e-3, rtol=1e-3)


def test_sinks_deterministic_bitwise(device):
    case = Case(2, 50, 50, 4, 1, 32, causal=True, deterministic=True, sinks=True)
    _, first = check_case(case, device)
    q, k, v, dout = make_inputs(case, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, make_sinks(case.nheads, device))]
    second = torch.autograd.grad(flash_attn_func(*leaves[:3], sinks=leaves[3], **case.kwargs), leaves, dout)
    for name, a, b in zip(GRADS, first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


def test_sinks_dtype_and_requires_grad(device):
    """Sinks of any float dtype are computed in fp32 and get a gradient of their own dtype; a sink that is
    the only input requiring grad still builds the graph; one that does not gets no gradient."""
    case = Case(1, 17, 17, 2, 2, 32, causal=True)
    q, k, v, dout = make_inputs(case, device)
    sinks32 = make_sinks(2, device)
    expected = flash_attn_func(q, k, v, causal=True, sinks=sinks32)
    sinks16 = sinks32.bfloat16().requires_grad_()
    out = flash_attn_func(q, k, v, causal=True, sinks=sinks16)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True, sinks=sinks16.detach().float()),
                               atol=0, rtol=0)
    (grad,) = torch.autograd.grad(out, sinks16, dout)
    assert grad.dtype == torch.bfloat16 and grad.shape == (2,) and torch.isfinite(grad).all()
    assert not torch.equal(expected, flash_attn_func(q, k, v, causal=True)), "sinks had no effect"
    leaf_q = q.clone().requires_grad_()
    out = flash_attn_func(leaf_q, k, v, causal=True, sinks=sinks32)
    out.backward(dout)
    assert leaf_q.grad is not None and sinks32.grad is None


def test_sinks_packed_variants(device):
    """The kv/qkv-packed variants pass sinks through: same output as the unpacked calls."""
    lengths = [13, 1, 20]
    q, k, v, _, cu, _ = varlen_inputs(lengths, lengths, 2, 2, 16, device)
    sinks = make_sinks(2, device)
    same = functools.partial(torch.testing.assert_close, atol=0, rtol=0)
    expected = flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, causal=True, sinks=sinks)
    qkv, kv = torch.stack([q, k, v], dim=1), torch.stack([k, v], dim=1)
    same(hf_flash.flash_attn_varlen_qkvpacked_func(qkv, cu, 20, causal=True, sinks=sinks), expected)
    same(hf_flash.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 20, 20, causal=True, sinks=sinks), expected)
    qd, kd, vd = (t[None, -20:] for t in (q, k, v))
    dense = flash_attn_func(qd, kd, vd, sinks=sinks)
    same(hf_flash.flash_attn_qkvpacked_func(torch.stack([qd, kd, vd], dim=2), sinks=sinks), dense)
    same(hf_flash.flash_attn_kvpacked_func(qd, torch.stack([kd, vd], dim=2), sinks=sinks), dense)


def test_sinks_torch_compile_fullgraph(device):
    """The custom ops take sinks and their fake backward returns the sink gradient's shape."""
    torch._dynamo.reset()
    case = Case(1, 19, 19, 2, 1, 32, causal=True)
    q, k, v, _ = make_inputs(case, device)
    sinks = make_sinks(2, device)

    def layer(q, k, v, sinks):
        return flash_attn_func(q * 1.5, k, v, causal=True, sinks=sinks.bfloat16()).sum(dim=-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if ON_CPU else "inductor")
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, sinks)]
    out = compiled(*leaves)
    eager_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, sinks)]
    ref = layer(*eager_leaves)
    # inductor fuses q * 1.5 and the sum in fp32 where eager rounds each step to the input dtype: the two differ
    # by rounding (seen on an H100 in fp16: 0.0049 on sums of magnitude ~4, one to two ulps), so the bound is
    # a few ulps of each tensor's magnitude, in the narrowest dtype the value went through. The fp32 sinks'
    # gradient comes back through the layer's bf16 cast: eager rounds it to bf16 there, inductor drops that
    # rounding (H100: -6.8219 / -10.3997 compiled against bf16's -6.8125 / -10.375)
    def close(a, b, msg=None, dtype=None):
        tol = 4 * torch.finfo(dtype or b.dtype).eps * float(b.abs().max())
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=msg)

    close(out, ref)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, eager_leaves, torch.ones_like(ref))
    for name, a, b in zip(GRADS, grads, ref_grads):
        close(a, b, msg=f"compiled {name} differs from eager", dtype=torch.bfloat16 if name == "dsinks" else None)


def _bad_sinks(device):
    q = torch.randn(1, 8, 4, 32, device=device).half()
    total, cu = torch.randn(8, 4, 32, device=device).half(), cu_seqlens([3, 5], device)
    return {
        "sinks-shape": (lambda: flash_attn_func(q, q, q, sinks=torch.zeros(2, device=device)), r"\[4\]"),
        "sinks-per-kv-head-2d": (lambda: flash_attn_func(q, q, q, sinks=torch.zeros(1, 4, device=device)), r"\[4\]"),
        "sinks-int": (lambda: flash_attn_func(q, q, q, sinks=torch.zeros(4, dtype=torch.int64, device=device)),
                      r"floating"),
        "sinks-list": (lambda: flash_attn_func(q, q, q, sinks=[0.0] * 4), r"Tensor"),
        "sinks-device": (lambda: flash_attn_func(q, q, q, sinks=torch.zeros(4, device="meta")), r"device|meta"),
        "sinks-varlen-shape": (
            lambda: flash_attn_varlen_func(total, total, total, cu, cu, 5, 5, sinks=torch.zeros(3, device=device)),
            r"\[4\]",
        ),
    }


@pytest.mark.parametrize("name", list(_bad_sinks("cpu")))
def test_bad_sinks(name, device):
    call, accepted = _bad_sinks(device)[name]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert "sinks" in message and re.search(accepted, message), message
    assert "\n" not in message, "one line"


# ---- the plain-PyTorch paths: reference module and fallback (where the kernels cannot run) ----


def test_reference_module_sinks(device):
    from hf_flash.ops.reference import attention_ref, attention_tiled

    case = Case(1, 33, 17, 4, 2, 24, causal=True, sinks=True)  # with rows that see no key
    q, k, v, _ = make_inputs(case, device)
    sinks = make_sinks(4, device)
    expected, expected_lse = attention_oracle(q.float(), k.float(), v.float(), causal=True, sinks=sinks)
    out, lse = attention_ref(q, k, v, causal=True, sinks=sinks, return_lse=True)
    torch.testing.assert_close(out, expected.to(q.dtype), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
    out, lse = attention_tiled(q, k, v, causal=True, sinks=sinks, block_m=16, block_n=16)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fallback_computes_sinks(varlen, device):
    """fallback.py (CPU without the interpreter, fp32, ...) cannot use SDPA for sinks: it forms the scores
    with the sink column; output and every gradient, the sink's included, match the oracle in fp32."""
    from hf_flash import fallback

    lengths_q, lengths_k = [7, 1, 12], [7, 9, 4]  # the last sequence has rows without keys
    q, k, v, dout, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k, 4, 2, 16, device, dtype=torch.float32)
    sinks = make_sinks(4, device)
    kwargs = {"causal": True, "window_size": (5, -1), "softcap": 0.0}
    if varlen:
        def ours(q, k, v, s):
            return fallback.sdpa_flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 9, sinks=s, **kwargs)

        def oracle(q, k, v, s):
            return varlen_oracle(q, k, v, cu_q, cu_k, causal=True, window=(5, -1), sinks=s)[0]
    else:
        q, k, v, dout = q[None, -12:], k[None, -4:], v[None, -4:], dout[None, -12:]

        def ours(q, k, v, s):
            return fallback.sdpa_flash_attn_func(q, k, v, sinks=s, **kwargs)

        def oracle(q, k, v, s):
            return attention_oracle(q, k, v, causal=True, window=(5, -1), sinks=s)[0]

    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, ref = ours(*leaves), oracle(*ref_leaves)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(GRADS, torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, ref_leaves, dout)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_fallback_sinks_with_softcap(device):
    from hf_flash import fallback

    case = Case(1, 13, 21, 2, 1, 16, softcap=2.0, sinks=True)
    q, k, v, _ = (t.float() for t in make_inputs(case, device))
    sinks = make_sinks(2, device)
    out = fallback.sdpa_flash_attn_func(q, k, v, softcap=2.0, sinks=sinks)
    torch.testing.assert_close(out, attention_oracle(q, k, v, softcap=2.0, sinks=sinks)[0], atol=1e-5, rtol=1e-5)


def test_dispatch_never_routes_sinks_to_sdpa():
    """On a chip whose Transformers calls may go to SDPA (T4), a call with sinks stays on the kernels in
    every mode: SDPA has no sink term."""
    from hf_flash import dispatch
    from hf_flash.ops import config

    plain = dispatch.Call(torch.float16, 64, 64, 128, 128, causal=True)
    assert dispatch.choose(config.SM75, plain, "auto")[0] == dispatch.SDPA
    for mode in ("auto", "sdpa"):
        path, why = dispatch.choose(config.SM75, dataclasses.replace(plain, sinks=True), mode)
        assert path == dispatch.KERNELS and "sinks" in why


# ---- bf16 on a GPU (the interpreter's bf16 tl.dot is wrong) ----

GPU_SINK_CASES = [
    Case(2, 512, 512, 8, 1, 64, causal=True, window=(127, 0), dtype=torch.bfloat16, sinks=True),  # gpt-oss sliding
    Case(2, 333, 333, 8, 1, 64, causal=True, dtype=torch.bfloat16, sinks=True),  # gpt-oss full layers
    Case(1, 1, 1000, 8, 2, 64, causal=True, dtype=torch.bfloat16, sinks=True),  # decoding over a KV cache
    Case(2, 300, 700, 6, 2, 128, causal=True, dtype=torch.bfloat16, sinks=True),  # Lq < Lk
    Case(1, 700, 300, 6, 6, 96, causal=True, dtype=torch.bfloat16, sinks=True),  # Lq > Lk: rows without keys
    Case(2, 255, 257, 4, 2, 256, window=(33, 17), dtype=torch.bfloat16, sinks=True),
    Case(1, 1024, 1024, 4, 4, 128, softcap=30.0, dtype=torch.bfloat16, sinks=True),
    Case(1, 2048, 2048, 4, 2, 64, causal=True, dtype=torch.bfloat16, sinks=True),  # block-aligned causal
]


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("case", GPU_SINK_CASES, ids=lambda c: c.id)
def test_sinks_bf16_gpu(case, deterministic, device, monkeypatch):
    force_dq_path(monkeypatch, deterministic)
    check_case(dataclasses.replace(case, deterministic=deterministic), device)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize(
    "params",
    [
        ([300, 0, 1000, 17], [300, 40, 0, 17], 8, 1, 64, {"causal": True, "window_size": (127, 0)}),
        ([1, 1, 1, 1], [100, 513, 7, 2048], 8, 2, 64, {"causal": True}),
        ([129, 511], [1000, 511], 4, 2, 256, {"causal": True}),
    ],
    ids=varlen_id,
)
def test_sinks_varlen_bf16_gpu(params, deterministic, device, monkeypatch):
    test_sinks_varlen(params, deterministic, device, monkeypatch, dtype=torch.bfloat16)
