"""The Hopper backward (``hf_flash/ops/hopper_bwd.py``, Gluon, dQ from the dK/dV program with atomics): which calls
it takes, that it compiles for sm90 with this Triton (no GPU needed), and on an sm90 GPU that its gradients match
the fp32 oracle and the portable backward's.

On the GPU the kernel only takes ``L`` from ``MIN_SEQLEN``; the tests lower that bound so that small shapes run
it, and check that it ran."""

from __future__ import annotations

import pytest
import torch
from flash_oracle import Case, make_inputs

from hf_flash.ops import hopper_bwd

L = hopper_bwd.MIN_SEQLEN[(128, True)]
L64 = hopper_bwd.MIN_SEQLEN[(64, True)]


def _call(batch=2, seqlen=L, heads=4, kv_heads=2, head_dim=128, dtype=torch.bfloat16):
    """(q, k, v, do, lse) of a dense call, the LSE padded as ``function._new_lse`` makes it."""
    from hf_flash.ops.function import _new_lse

    q = torch.empty(batch, seqlen, heads, head_dim, dtype=dtype)
    k, v = (torch.empty(batch, seqlen, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    return q, k, v, torch.empty_like(q), _new_lse(q, False, batch)


def _fits(q, k, v, do, lse, varlen=False, window=(-1, 0), softcap=0.0, dropout_p=0.0, sinks=None,
          deterministic=False):
    return hopper_bwd.fits(q, k, v, do, lse, varlen, window, softcap, dropout_p, sinks, deterministic)


def test_fits_the_measured_calls_only():
    call = _call()
    assert _fits(*call) and _fits(*call, window=(-1, -1))
    assert _fits(*_call(dtype=torch.float16)) and _fits(*_call(kv_heads=4)) and _fits(*_call(kv_heads=1))
    # Transformers' [B, H, L, D] tensors seen as [B, L, H, D]: head-major descriptors
    q, k, v, do, lse = call
    hm = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert _fits(*hm, do, lse)
    assert not _fits(*call, deterministic=True), "atomics: only where reproducibility was not asked for"
    assert not _fits(*call, varlen=True)
    assert not _fits(*call, window=(8, 0)) and not _fits(*call, window=(-1, 4))
    assert not _fits(*call, softcap=30.0) and not _fits(*call, dropout_p=0.1)
    assert not _fits(*call, sinks=torch.zeros(4))
    assert _fits(*_call(head_dim=64, seqlen=L64)) and not _fits(*_call(head_dim=64, seqlen=L64 - 128))
    assert not _fits(*_call(head_dim=96)) and not _fits(*_call(head_dim=256))
    assert not _fits(*_call(dtype=torch.float32))
    assert not _fits(*_call(seqlen=L + 64)), "L a multiple of the program's 128 keys"
    assert not _fits(*_call(seqlen=L - 128))
    q2, k2, v2, *_ = _call(seqlen=2 * L)
    assert not _fits(q, k2, v2, do, lse), "Lq != Lk"
    assert not _fits(q, k, hm[2], do, lse), "K and V in different layouts"
    odd = torch.empty(lse.shape[0], lse.shape[1], L + 2)[..., :L]
    assert not _fits(q, k, v, do, odd), "LSE rows not 16 bytes apart"


def test_takes_only_cuda_tensors_and_can_be_turned_off(fake_gpu, monkeypatch):
    call = _call()
    fake_gpu((9, 0), name="NVIDIA H100")
    args = (False, (-1, 0), 0.0, 0.0, None, False)
    assert _fits(*call) and not hopper_bwd.takes(*call, *args), "CPU tensors run the interpreter's kernels"
    monkeypatch.setenv(hopper_bwd.ENV, "0")
    assert not hopper_bwd.enabled()
    monkeypatch.setenv(hopper_bwd.ENV, "1")
    assert hopper_bwd.enabled()
    monkeypatch.delenv(hopper_bwd.ENV)
    assert hopper_bwd.enabled() == (hopper_bwd.DEFAULT == "1")


def test_compiles_for_sm90():
    """The kernel compiles for sm90 with this Triton (CI's is not the device's), D64 and D128, causal or not, bf16
    and fp16, within the launch's registers a thread and the 227 KB of shared memory a program may have. Spills are
    reported, not held to zero: Triton 3.6 (the device's) compiles the consumers' loops without, 3.9 spills a
    few registers in the D128 causal loops (benchmarks/loop_spills.py reads them per loop)."""
    from test_chips import _cross_compile_unavailable, hopper_bwd_cases, run_workers

    reason = hopper_bwd.unavailable_reason() or _cross_compile_unavailable()
    if reason:
        pytest.skip(reason)
    for r in run_workers(hopper_bwd_cases(), processes=2, timeout=600):
        c = r["constexprs"]
        name = f"D{r['head_dim']} causal={c['CAUSAL']} {r['dtype']}"
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["regs"] is not None and r["regs"] <= r["maxnreg"], f"{name}: {r['regs']} registers"
        assert r["spill_bytes"] is not None and r["spill_bytes"] <= 1024, f"{name}: {r['spill_bytes']} B spilled"
        assert r["shared"] <= 227 * 1024, f"{name}: {r['shared']} B of shared memory"


def test_launch_names_every_kernel_argument():
    """The launch passes the kernel's arguments by keyword (CPU tensors: the descriptors are host-side data)."""
    if hopper_bwd.unavailable_reason():
        pytest.skip(hopper_bwd.unavailable_reason())
    from hf_flash.ops import _hopper_bwd_kernel as K
    from hf_flash.ops.common import tma_layout
    from hf_flash.ops.hopper_fwd import descriptor_rows

    q, k, v, do, lse = _call()
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    dk = torch.empty(k.shape, dtype=k.dtype)  # heads side by side where K is head-major
    layouts = tuple(tma_layout(t, False) for t in (q, do, k, dk))
    args = K.launch_args(q=q, k=k, v=v, do=do, dk=dk, dv=torch.empty_like(dk), lse=lse,
                         delta=torch.empty_like(lse), dq_acc=torch.zeros(q.shape), layouts=layouts,
                         rows=tuple(descriptor_rows(lay, t) for lay, t in zip(layouts, (q, do, k, dk))),
                         softmax_scale=0.125, causal=True, stages=2)
    assert set(args) - {"num_warps", "maxnreg"} == set(K._bwd_hopper.arg_names)
    # K/V head-major: row = b * rows_b + hk * rows_h, column 0; Q heads side by side: row = b * L, column h * D
    assert (args["kv_rows_b"], args["kv_rows_h"], args["kv_col_h"]) == (2 * L, L, 0)
    assert (args["q_rows_b"], args["q_rows_h"], args["q_col_h"]) == (L, 0, 128)
    assert (args["dkv_rows_b"], args["dkv_rows_h"], args["dkv_col_h"]) == (L, 0, 128)
    assert args["n_groups"] == 2 and args["stat_stride"] == lse.stride(1) and args["dq_stride"] == 4 * 128
    # the same fp32 buffer as [B * L, H * D] in [64, 32] boxes, for D128's TMA reduction
    assert list(args["dq_desc"].shape) == [2 * L, 4 * 128] and list(args["dq_desc"].block_shape) == [64, 32]
    assert args["dq_desc"].base.data_ptr() == args["dq_ptr"].data_ptr()
    assert args["KEYS_OUTER"]  # causal, 2 (batch, kv head) pairs


def test_keys_outer_only_for_causal_calls_with_few_heads():
    """The longest key blocks first where that was measured faster: causal, at most 32 (batch, kv head) pairs."""
    if hopper_bwd.unavailable_reason():
        pytest.skip(hopper_bwd.unavailable_reason())
    from hf_flash.ops._hopper_bwd_kernel import KEYS_OUTER_MAX_HEADS, keys_outer

    def qk(batch, kv_heads):
        return torch.empty(batch, 128, 4 * kv_heads, 64), torch.empty(batch, 128, kv_heads, 64)

    assert KEYS_OUTER_MAX_HEADS == 32
    assert keys_outer(*qk(1, 8), True) and keys_outer(*qk(4, 8), True) and keys_outer(*qk(1, 32), True)
    assert not keys_outer(*qk(1, 8), False) and not keys_outer(*qk(2, 32), True) and not keys_outer(*qk(33, 1), True)


# -- on an sm90 GPU ---------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(2, 256, 256, 4, 2, 128, causal=True, dtype=torch.bfloat16),
    Case(1, 384, 384, 4, 4, 128, dtype=torch.bfloat16),
    Case(2, 512, 512, 8, 1, 128, causal=True, dtype=torch.float16),
    Case(3, 128, 128, 2, 2, 128, dtype=torch.float16),
    Case(1, 640, 640, 8, 1, 128, dtype=torch.bfloat16),
    Case(2, 384, 384, 4, 4, 128, causal=True, dtype=torch.float16),
    Case(1, 128, 128, 4, 2, 128, causal=True, dtype=torch.float16),
    # causal with more than 32 (batch, kv head) pairs: key blocks inner (the others run key blocks outer)
    Case(9, 256, 256, 8, 4, 128, causal=True, dtype=torch.bfloat16),
    # D64: 128-query steps (a causal head's first step holds the diagonal), row halves of dQ
    Case(2, 256, 256, 4, 2, 64, causal=True, dtype=torch.bfloat16),
    Case(1, 384, 384, 4, 4, 64, dtype=torch.float16),
    Case(2, 512, 512, 8, 1, 64, causal=True, dtype=torch.bfloat16),
    Case(1, 128, 128, 4, 2, 64, causal=True, dtype=torch.float16),
    Case(5, 384, 384, 8, 8, 64, causal=True, dtype=torch.float16),
    Case(3, 640, 640, 2, 2, 64, dtype=torch.bfloat16),
]


@pytest.fixture
def hopper_bwd_calls(monkeypatch):
    """Lowers MIN_SEQLEN to 128, turns the kernel on and counts its launches; skips off sm90."""
    from test_hopper_fwd import count_launches

    calls = count_launches(monkeypatch, hopper_bwd, "flash_bwd_hopper", 1)
    monkeypatch.setattr(hopper_bwd, "MIN_SEQLEN", dict.fromkeys(hopper_bwd.MIN_SEQLEN, 128))
    monkeypatch.setenv(hopper_bwd.ENV, "1")
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("head_major", [False, True], ids=["blhd", "bhld"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_matches_oracle_on_sm90(case, head_major, hopper_bwd_calls):
    from test_hopper_fwd import matches_oracle

    matches_oracle(case, head_major, seed=21)
    assert hopper_bwd_calls, "the Hopper backward did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_gradients_match_the_portable_backward(causal, head_dim, hopper_bwd_calls):
    """The same gradients, within the rounding of a different summation order, as ``deterministic=True`` (the
    portable kernels), which must not take this path."""
    from hf_flash import flash_attn_func

    case = Case(2, 1024, 1024, 8, 2, head_dim, causal=causal, dtype=torch.bfloat16)
    q, k, v, dout = make_inputs(case, "cuda", seed=22)
    grads = {}
    for det in (False, True):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        flash_attn_func(qq, kk, vv, causal=causal, deterministic=det).backward(dout)
        grads[det] = (qq.grad.float(), kk.grad.float(), vv.grad.float())
    assert len(hopper_bwd_calls) == 1, "deterministic=True must keep the portable backward"
    for name, ours, base in zip(("dq", "dk", "dv"), grads[False], grads[True]):
        scale = base.abs().max().item()
        assert (ours - base).abs().max().item() <= 2e-2 * scale, name


@pytest.mark.gpu
def test_other_calls_take_the_portable_backward(hopper_bwd_calls):
    from hf_flash import flash_attn_func

    for case in (Case(1, 192, 192, 2, 2, 128), Case(1, 256, 256, 2, 2, 96), Case(1, 256, 384, 2, 2, 128),
                 Case(1, 256, 256, 2, 2, 80)):
        q, k, v, dout = make_inputs(case, "cuda")
        q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
        flash_attn_func(q, k, v, causal=False).backward(dout.bfloat16())
    q, k, v, dout = make_inputs(Case(1, 256, 256, 2, 2, 128, dtype=torch.bfloat16), "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    flash_attn_func(q, k, v, causal=True, window_size=(64, 0)).backward(dout)
    flash_attn_func(q, k, v, softcap=20.0).backward(dout)
    assert not hopper_bwd_calls, hopper_bwd_calls
