"""The Hopper backward (``hf_flash/ops/hopper_bwd.py``, Gluon, dQ from the dK/dV program): which calls
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


def _fits(q, k, v, do, lse, cu_seqlens=None, window=(-1, 0), softcap=0.0, dropout_p=0.0, sinks=None,
          deterministic=False):
    return hopper_bwd.fits(q, k, v, do, lse, cu_seqlens, window, softcap, dropout_p, sinks, deterministic)


def test_fits_the_measured_calls_only():
    call = _call()
    assert _fits(*call) and _fits(*call, window=(-1, -1))
    assert _fits(*_call(dtype=torch.float16)) and _fits(*_call(kv_heads=4)) and _fits(*_call(kv_heads=1))
    # Transformers' [B, H, L, D] tensors seen as [B, L, H, D]: head-major descriptors
    q, k, v, do, lse = call
    hm = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert _fits(*hm, do, lse)
    assert not _fits(*call, deterministic=True), "atomics: only where reproducibility was not asked for"
    assert not _fits(*call, window=(8, 0)) and not _fits(*call, window=(-1, 4))
    assert not _fits(*call, softcap=30.0) and not _fits(*call, dropout_p=0.1)
    assert not _fits(*call, sinks=torch.zeros(4))
    assert _fits(*_call(head_dim=64, seqlen=L64)) and not _fits(*_call(head_dim=64, seqlen=L64 - 128))
    assert not _fits(*_call(head_dim=96)) and not _fits(*_call(head_dim=256))
    assert not _fits(*_call(dtype=torch.float32))
    assert _fits(*_call(seqlen=L + 77)) and _fits(*_call(seqlen=L + 1)), "any L: TMA zero-fills past it"
    assert not _fits(*_call(seqlen=L - 128))
    q2, k2, v2, *_ = _call(seqlen=2 * L)
    assert not _fits(q, k2, v2, do, lse), "Lq != Lk"
    assert not _fits(q, k, hm[2], do, lse), "K and V in different layouts"
    odd = torch.empty(lse.shape[0], lse.shape[1], L + 2)[..., :L]
    assert not _fits(q, k, v, do, odd), "LSE rows not 16 bytes apart"


def _packed(lengths, heads=4, kv_heads=2, head_dim=128, dtype=torch.bfloat16):
    """(q, k, v, do, lse, (cu_seqlens, cu_seqlens)) of a varlen self-attention call, the LSE ``[H, total]`` padded
    as ``function._new_lse`` makes it."""
    from hf_flash.ops.function import _new_lse

    total = sum(lengths)
    q = torch.empty(total, heads, head_dim, dtype=dtype)
    k, v = (torch.empty(total, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, torch.empty_like(q), _new_lse(q, True, len(lengths)), (cu, cu)


def test_fits_varlen_self_attention_of_long_enough_sequences():
    """Packed batches: one cu_seqlens for Q and K/V, or two the input checks read as equal (no sync to compare
    them), a mean length from the bound."""
    from hf_flash.ops import checks

    lengths = [L + 77, L - 300, L + 1000]  # mean above L
    assert _fits(*_packed(lengths)) and _fits(*_packed(lengths), window=(-1, -1))
    assert _fits(*_packed([L64 + 5, L64 - 5], head_dim=64))
    q, k, v, do, lse, (cu, _) = _packed(lengths)
    other = cu.clone()
    assert not _fits(q, k, v, do, lse, (cu, other)), "Q's and K/V's sequences not known to be the same"
    for name, t in (("cu_seqlens_q", cu), ("cu_seqlens_k", other)):
        checks.check_cu_seqlens(name, t, q.shape[0], max(lengths), "max_seqlen", q.device)
    assert _fits(q, k, v, do, lse, (cu, other)), "two tensors that the input checks read as equal"
    assert not _fits(q, k, v, do, lse, (cu.long(), cu.long()))
    assert not _fits(*_packed([L // 4] * 4)), "short sequences keep the portable backward"
    assert not _fits(*_packed(lengths), deterministic=True) and not _fits(*_packed(lengths), window=(8, 0))
    assert not _fits(*_packed(lengths), softcap=30.0) and not _fits(*_packed(lengths), sinks=torch.zeros(4))
    assert not _fits(*_packed(lengths, dtype=torch.float32))


def test_takes_only_cuda_tensors_and_can_be_turned_off(fake_gpu, monkeypatch):
    call = _call()
    fake_gpu((9, 0), name="NVIDIA H100")
    args = (None, (-1, 0), 0.0, 0.0, None, False)
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

    n = L + 77  # a length past a whole key block
    q, k, v, do, lse = _call(seqlen=n)
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    dk = torch.empty(k.shape, dtype=k.dtype)  # heads side by side where K is head-major
    dq_acc = K.dq_buffer(q)
    args = K.launch_args(q=q, k=k, v=v, do=do, dk=dk, dv=torch.empty_like(dk), lse=lse,
                         delta=torch.empty_strided(lse.shape, lse.stride()), dq_acc=dq_acc, softmax_scale=0.125,
                         causal=True, stages=2)
    assert set(args) - {"num_warps", "maxnreg"} == set(K._bwd_hopper.arg_names)
    # every tensor as [B, H, L, D] in boxes of one (batch, head), whatever its layout: K head-major, Q and dK not
    for name, t in (("q_desc", q), ("k_desc", k), ("dk_desc", dk)):
        desc = args[name]
        assert list(desc.shape) == [2, t.shape[2], n, 128], name
        assert list(desc.strides) == [t.stride(0), t.stride(2), t.stride(1), 1], name
        assert list(desc.block_shape) == [1, 1, 64, 128], name
    assert list(args["lse_desc"].shape) == [2, 4, n] and list(args["lse_desc"].block_shape) == [1, 1, 64]
    # the dQ buffer: L rounded up to 128 rows (the D64 loader's atomics), its descriptor the first L of them
    assert dq_acc.shape == (2, -(-n // 128) * 128, 4, 128)
    assert args["dq_rows_b"] == dq_acc.shape[1] and args["dq_stride"] == 4 * 128
    assert list(args["dq_desc"].shape) == [2, 4, n, 128] and list(args["dq_desc"].block_shape) == [1, 1, 64, 32]
    assert args["dq_desc"].base.data_ptr() == args["dq_ptr"].data_ptr()
    # the cached layouts (``_hopper_fwd_kernel.box_layout``) are the ones Gluon derives: fp32 dQ boxes, bf16 tiles
    gl = K.gl
    assert args["dq_desc"].layout == gl.NVMMASharedLayout.get_default_for([1, 1, 64, 32], gl.float32)
    assert args["q_desc"].layout == gl.NVMMASharedLayout.get_default_for([1, 1, 64, 128], gl.bfloat16)
    assert args["dq_desc"].layout != args["q_desc"].layout
    assert args["n_groups"] == 2 and args["seqlen"] == n
    assert args["KEYS_OUTER"]  # causal, 2 (batch, kv head) pairs


def test_varlen_launch_reads_the_packed_batch_and_per_sequence_stats():
    """Varlen: the packed tensors as batch 1, the LSE and delta per sequence, +inf / 0 past each end."""
    if hopper_bwd.unavailable_reason():
        pytest.skip(hopper_bwd.unavailable_reason())
    from hf_flash.ops import _hopper_bwd_kernel as K

    lengths = [300, 129, 700]
    q, k, v, do, lse, (cu, _) = _packed(lengths)
    lse.copy_(torch.randn(lse.shape))
    delta = torch.randn(lse.shape)
    lse_p, delta_p = K.padded_stats(lse, delta, cu, max(lengths))
    assert lse_p.shape == (3, 4, 768) and delta_p.shape == lse_p.shape  # the longest rounded up to 128
    for b, (start, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        assert torch.equal(lse_p[b, :, :n], lse[:, start:start + n]) and torch.isinf(lse_p[b, :, n:]).all()
        assert torch.equal(delta_p[b, :, :n], delta[:, start:start + n]) and not delta_p[b, :, n:].any()
    q4, k4, v4, do4 = (t.unsqueeze(0) for t in (q, k, v, do))
    dk, dv = torch.empty_like(k4), torch.empty_like(v4)
    dq_acc = K.dq_buffer(q4, varlen=True)
    assert dq_acc.shape == (1, sum(lengths) + 128, 4, 128)  # the last sequence's last step stays inside
    args = K.launch_args(q=q4, k=k4, v=v4, do=do4, dk=dk, dv=dv, lse=lse_p, delta=delta_p, dq_acc=dq_acc,
                         softmax_scale=0.125, causal=True, stages=2, cu_seqlens=cu, max_seqlen=max(lengths))
    assert set(args) - {"num_warps", "maxnreg"} == set(K._bwd_hopper.arg_names)
    assert args["VARLEN"] and args["cu_seqlens"] is cu and args["seqlen"] == 700
    assert list(args["q_desc"].shape) == [1, 4, sum(lengths), 128]
    assert list(args["lse_desc"].shape) == [3, 4, 768]
    assert args["KEYS_OUTER"]  # 3 sequences x 2 kv heads
    assert args["dkv_stride"] == 2 * 128 and args["dkv_stride_h"] == 128


def test_keys_outer_only_for_causal_calls_with_few_heads_where_measured_ahead():
    """The longest key blocks first where that was measured faster: causal, at most 32 (batch, kv head) pairs, L
    (varlen: the longest sequence) up to 12k at D64 and 8k at D128, and at D128 only with 2 query heads a kv
    head."""
    if hopper_bwd.unavailable_reason():
        pytest.skip(hopper_bwd.unavailable_reason())
    from hf_flash.ops._hopper_bwd_kernel import KEYS_OUTER_MAX_HEADS, KEYS_OUTER_MAX_SEQLEN, keys_outer

    def qk(batch, kv_heads, seqlen=128, group=4, head_dim=64):
        return (torch.empty(batch, seqlen, group * kv_heads, head_dim),
                torch.empty(batch, seqlen, kv_heads, head_dim))

    assert KEYS_OUTER_MAX_HEADS == 32 and KEYS_OUTER_MAX_SEQLEN == {64: 12288, 128: 8192}
    assert keys_outer(*qk(1, 8), True) and keys_outer(*qk(4, 8), True) and keys_outer(*qk(1, 32), True)
    assert not keys_outer(*qk(1, 8), False) and not keys_outer(*qk(2, 32), True) and not keys_outer(*qk(33, 1), True)
    assert keys_outer(*qk(1, 8, 12288), True) and not keys_outer(*qk(1, 8, 12289), True)
    assert not keys_outer(*qk(1, 8), True, batch=1, seqlen=16384), "varlen: the longest sequence decides"
    # D128: GQA with 2 query heads a kv head, up to 8k; MHA and 4 heads a kv head keep key blocks inner
    assert keys_outer(*qk(2, 8, 8192, group=2, head_dim=128), True)
    assert not keys_outer(*qk(2, 8, 8193, group=2, head_dim=128), True)
    assert not keys_outer(*qk(2, 8, 4096, group=4, head_dim=128), True)
    assert not keys_outer(*qk(2, 16, 4096, group=1, head_dim=128), True)


# -- on an sm90 GPU ---------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(2, 256, 256, 4, 2, 128, causal=True, dtype=torch.bfloat16),
    Case(1, 384, 384, 4, 4, 128, dtype=torch.bfloat16),
    Case(2, 512, 512, 8, 1, 128, causal=True, dtype=torch.float16),
    Case(3, 128, 128, 2, 2, 128, dtype=torch.float16),
    Case(1, 640, 640, 8, 1, 128, dtype=torch.bfloat16),
    Case(2, 384, 384, 4, 4, 128, causal=True, dtype=torch.float16),
    Case(1, 128, 128, 4, 2, 128, causal=True, dtype=torch.float16),
    # causal with more than 32 (batch, kv head) pairs: key blocks inner (so do D128's causal cases without 2 query
    # heads a kv head; the other causal cases run key blocks outer)
    Case(9, 256, 256, 8, 4, 128, causal=True, dtype=torch.bfloat16),
    # D64: 128-query steps (a causal head's first step holds the diagonal), row halves of dQ
    Case(2, 256, 256, 4, 2, 64, causal=True, dtype=torch.bfloat16),
    Case(1, 384, 384, 4, 4, 64, dtype=torch.float16),
    Case(2, 512, 512, 8, 1, 64, causal=True, dtype=torch.bfloat16),
    Case(1, 128, 128, 4, 2, 64, causal=True, dtype=torch.float16),
    Case(5, 384, 384, 8, 8, 64, causal=True, dtype=torch.float16),
    Case(3, 640, 640, 2, 2, 64, dtype=torch.bfloat16),
    # any L: the last key block and the last step end past it (TMA zero-fills the rows past L and drops them from
    # the stores); non-causal, the last key block masks its keys past L
    Case(2, 200, 200, 4, 2, 128, dtype=torch.bfloat16),
    Case(2, 333, 333, 4, 2, 128, causal=True, dtype=torch.bfloat16),
    Case(1, 129, 129, 4, 4, 128, dtype=torch.float16),
    Case(3, 700, 700, 8, 2, 128, causal=True, dtype=torch.float16),
    Case(2, 300, 300, 4, 2, 64, causal=True, dtype=torch.bfloat16),
    Case(1, 450, 450, 8, 8, 64, dtype=torch.bfloat16),
    Case(2, 129, 129, 2, 1, 64, dtype=torch.float16),
    Case(9, 190, 190, 8, 4, 64, causal=True, dtype=torch.float16),
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
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_varlen_matches_oracle_on_sm90(causal, head_dim, hopper_bwd_calls):
    """Packed sequences (one cu_seqlens for Q and K/V, as the Transformers integration passes it): lengths that
    end inside a key block and a step, one shorter than a key block, one of whole blocks."""
    from flash_oracle import assert_packed_self_attention_matches

    assert_packed_self_attention_matches([300, 77, 512, 641], head_dim, causal, seed=23)
    assert hopper_bwd_calls, "the Hopper backward did not run"


@pytest.mark.gpu
def test_other_calls_take_the_portable_backward(hopper_bwd_calls):
    from hf_flash import flash_attn_func

    for case in (Case(1, 100, 100, 2, 2, 128), Case(1, 256, 256, 2, 2, 96), Case(1, 256, 384, 2, 2, 128),
                 Case(1, 256, 256, 2, 2, 80)):
        q, k, v, dout = make_inputs(case, "cuda")
        q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
        flash_attn_func(q, k, v, causal=False).backward(dout.bfloat16())
    q, k, v, dout = make_inputs(Case(1, 256, 256, 2, 2, 128, dtype=torch.bfloat16), "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    flash_attn_func(q, k, v, causal=True, window_size=(64, 0)).backward(dout)
    flash_attn_func(q, k, v, softcap=20.0).backward(dout)
    assert not hopper_bwd_calls, hopper_bwd_calls
