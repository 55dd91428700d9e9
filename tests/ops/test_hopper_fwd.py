"""The Hopper forward (``hf_flash/ops/hopper_fwd.py``, Gluon): which calls it takes, that it compiles for sm90
with this Triton (no GPU needed), and on an sm90 GPU that it matches the fp32 oracle, backward included (the
backward reads its LSE).

On the GPU the kernel only takes ``L`` from its tile's ``min_seqlen`` (2048 or 3072); the tests lower that bound
so that small shapes run it, and check that it ran."""

from __future__ import annotations

import functools

import pytest
import torch
from flash_oracle import Case, assert_matches_oracle, make_inputs, oracle_for

from hf_flash.ops import hopper_fwd

L = hopper_fwd.TILES[128, True].min_seqlen


def _dense(batch=2, seqlen=L, heads=4, kv_heads=2, head_dim=128, dtype=torch.bfloat16, device="cpu"):
    q = torch.empty(batch, seqlen, heads, head_dim, dtype=dtype, device=device)
    k, v = (torch.empty(batch, seqlen, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


def _fits(q, k, v, cu_seqlens=None, window=(-1, 0), softcap=0.0, dropout_p=0.0, sinks=None):
    return hopper_fwd.fits(q, k, v, cu_seqlens, window, softcap, dropout_p, sinks)


def _packed(lengths, heads=4, kv_heads=2, head_dim=128, dtype=torch.bfloat16):
    """(q, k, v, (cu_seqlens, cu_seqlens)) of a varlen self-attention call."""
    total = sum(lengths)
    q = torch.empty(total, heads, head_dim, dtype=dtype)
    k, v = (torch.empty(total, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, (cu, cu)


def test_fits_the_measured_calls_only():
    q, k, v = _dense()
    assert _fits(q, k, v) and _fits(q, k, v, window=(-1, -1))
    assert _fits(*_dense(dtype=torch.float16))
    # Transformers' [B, H, L, D] tensors seen as [B, L, H, D]: head-major descriptors
    hm = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert _fits(*hm)
    assert not _fits(q, k, v, window=(8, 0)) and not _fits(q, k, v, window=(-1, 4))
    assert not _fits(q, k, v, softcap=30.0) and not _fits(q, k, v, dropout_p=0.1)
    assert not _fits(q, k, v, sinks=torch.zeros(4))
    d64 = hopper_fwd.TILES[64, True].min_seqlen
    assert _fits(*_dense(head_dim=64, seqlen=d64)) and not _fits(*_dense(head_dim=64, seqlen=d64 - 64))
    assert not _fits(*_dense(head_dim=96)) and not _fits(*_dense(head_dim=256))
    assert not _fits(*_dense(dtype=torch.float32))
    assert not _fits(*_dense(seqlen=L - 64))
    assert _fits(*_dense(seqlen=L + 64)), "a last tile of one 64-row group"
    assert _fits(*_dense(seqlen=L + 32)) and _fits(*_dense(seqlen=L + 1)), "any L: TMA zero-fills past it"
    q2, k2, v2 = _dense(seqlen=2 * L)
    assert not _fits(q, k2, v2), "Lq != Lk"
    assert not _fits(q, k, hm[2]), "K and V in different layouts"
    assert not _fits(q[..., ::2, :], k, v), "heads neither side by side nor whole rows apart"


def test_fits_varlen_self_attention_of_long_enough_sequences():
    """Packed batches: one cu_seqlens for Q and K/V (no sync to compare two), a mean length from the tile's bound,
    any lengths."""
    lengths = [L + 77, L - 300, L + 1000]  # mean above L, none a multiple of a tile
    assert _fits(*_packed(lengths)) and _fits(*_packed(lengths), window=(-1, -1))
    d64 = hopper_fwd.TILES[64, True].min_seqlen
    assert _fits(*_packed([d64 + 5, d64 - 5], head_dim=64))
    assert not _fits(*_packed([d64 - 5, d64 - 5], head_dim=64))
    q, k, v, (cu, _) = _packed(lengths)
    assert not _fits(q, k, v, (cu, cu.clone())), "Q's and K/V's sequences not known to be the same"
    assert not _fits(q, k, v, (cu.long(), cu.long()))
    assert not _fits(*_packed([L // 4] * 4)), "short sequences keep the portable forward"
    assert not _fits(*_packed(lengths), window=(8, 0)) and not _fits(*_packed(lengths), softcap=30.0)
    assert not _fits(*_packed(lengths), dropout_p=0.1) and not _fits(*_packed(lengths), sinks=torch.zeros(4))
    assert not _fits(*_packed(lengths, dtype=torch.float32)) and not _fits(*_packed(lengths, head_dim=96))
    assert not _fits(q[:, ::2], k, v, (cu, cu)), "heads not side by side"


def test_takes_only_cuda_tensors_and_can_be_turned_off(fake_gpu, monkeypatch):
    q, k, v = _dense()
    args = (None, (-1, 0), 0.0, 0.0, None)
    fake_gpu((9, 0), name="NVIDIA H100")
    assert _fits(q, k, v) and not hopper_fwd.takes(q, k, v, *args), "CPU tensors run the interpreter's kernels"
    monkeypatch.setenv(hopper_fwd.ENV, "0")
    assert not hopper_fwd.enabled()
    monkeypatch.setenv(hopper_fwd.ENV, "1")
    assert hopper_fwd.enabled()


def test_only_a_real_sm90_gpu_runs_it(fake_gpu, monkeypatch):
    from hf_flash.ops import config

    device = fake_gpu((9, 0), name="NVIDIA H100")
    assert hopper_fwd.on_sm90(device)
    config.force_arch("sm80")  # an older table forced onto the H100
    assert not hopper_fwd.on_sm90(device)
    device = fake_gpu((8, 0), name="NVIDIA A100")
    config.force_arch("sm90")  # sm90's tiles forced onto an A100: still no wgmma there
    assert not hopper_fwd.on_sm90(device)


def test_compiles_for_sm90_without_spills():
    """The kernel compiles for sm90 with this Triton (CI's is not the device's) for every tile of the table,
    within the launch's registers a thread (the consumers then raise theirs: ``setmaxnreg``), without spills, in
    the 227 KB of shared memory a program may have: causal or not, bf16 and fp16 (in fresh processes, as
    test_chips compiles)."""
    from test_chips import _cross_compile_unavailable, hopper_fwd_cases, run_workers

    reason = hopper_fwd.unavailable_reason() or _cross_compile_unavailable()
    if reason:
        pytest.skip(reason)
    for r in run_workers(hopper_fwd_cases(hopper_fwd.TILES), processes=2, timeout=600):
        c = r["constexprs"]
        name = f"D{r['head_dim']} causal={c['CAUSAL']} groups={c['GROUPS']} {r['dtype']}"
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["regs"] is not None and r["regs"] <= r["maxnreg"], f"{name}: {r['regs']} registers"
        assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} bytes spilled"
        assert r["shared"] <= 227 * 1024, f"{name}: {r['shared']} B of shared memory"


def test_head_group_makes_one_wave():
    """The tiles of as many (batch, head) pairs as fill the SMs once are numbered together, at least one pair."""
    d128, d64 = hopper_fwd.TILES[128, True], hopper_fwd.TILES[64, True]
    assert hopper_fwd.head_group(2048, d128, 132) == 8  # 16 tiles of 128 rows a head
    assert hopper_fwd.head_group(4096, d64, 132) == 6  # 22 tiles of 192 rows, the last one of 64
    assert hopper_fwd.head_group(16384, d128, 132) == 1 and hopper_fwd.head_group(32768, d64, 132) == 1


def test_launch_names_every_kernel_argument():
    """The launch passes the kernel's arguments by keyword (CPU tensors: the descriptors are host-side data)."""
    if hopper_fwd.unavailable_reason():
        pytest.skip(hopper_fwd.unavailable_reason())
    from hf_flash.ops import _hopper_fwd_kernel as K

    n = L + 37  # not a multiple of any tile
    q, k, v = (torch.zeros(t.shape, dtype=t.dtype) for t in _dense(seqlen=n))
    q, k, v = q, k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    out, lse = torch.empty_like(q), torch.empty(q.shape[0], q.shape[2], q.shape[1])
    tile = hopper_fwd.TILES[128, True]
    args = K.launch_args(q=q, k=k, v=v, out=out, lse=lse, qk_scale=1.0, causal=True, tile=tile, head_group=4)
    options = {"num_warps", "maxnreg"}
    assert set(args) - options == set(K._fwd_hopper.arg_names)
    # every tensor as [B, H, L, D] in boxes of one (batch, head), whatever its layout: K/V head-major, Q not
    for name, t, rows in (("q_desc", q, tile.split_m), ("k_desc", k, tile.block_n), ("o_desc", out, tile.split_m)):
        desc = args[name]
        assert list(desc.shape) == [2, t.shape[2], n, 128], name
        assert list(desc.strides) == [t.stride(0), t.stride(2), t.stride(1), 1], name
        assert list(desc.block_shape) == [1, 1, rows, 128], name
        # the cached layout is the one Gluon derives for the box
        assert desc.layout == K.gl.NVMMASharedLayout.get_default_for([1, 1, rows, 128], K.gl.bfloat16), name
    assert args["n_groups"] == 2 and args["n_bh"] == 8 and args["head_group"] == 4 and args["seqlen"] == n
    fp16 = K.box_descriptor(q.half(), 64)
    assert fp16.layout == K.gl.NVMMASharedLayout.get_default_for([1, 1, 64, 128], K.gl.float16)


def test_varlen_launch_reads_the_packed_batch():
    """Varlen: the packed tensors as batch 1, one program per tile of the longest sequence, the LSE ``[H, total]``."""
    if hopper_fwd.unavailable_reason():
        pytest.skip(hopper_fwd.unavailable_reason())
    from hf_flash.ops import _hopper_fwd_kernel as K
    from hf_flash.ops.function import _new_lse

    lengths = [300, 129, 700]
    q, k, v, (cu, _) = _packed(lengths)
    lse = _new_lse(q, True, len(lengths))
    q4, k4, v4 = (t.unsqueeze(0) for t in (q, k, v))
    out = torch.empty_like(q4)
    tile = hopper_fwd.TILES[128, True]
    args = K.launch_args(q=q4, k=k4, v=v4, out=out, lse=lse, qk_scale=1.0, causal=True, tile=tile, head_group=2,
                         cu_seqlens=cu, max_seqlen=max(lengths))
    assert set(args) - {"num_warps", "maxnreg"} == set(K._fwd_hopper.arg_names)
    assert args["VARLEN"] and args["cu_seqlens"] is cu and args["seqlen"] == 700 and args["n_bh"] == 3 * 4
    assert list(args["q_desc"].shape) == [1, 4, sum(lengths), 128]
    assert args["stride_lb"] == 0 and args["stride_lh"] == lse.stride(0)
    assert args["o_stride"] == 4 * 128 and args["o_stride_h"] == 128
    assert tile.per_head(args["seqlen"]) * args["n_bh"] == 6 * 12  # 700 rows in 128-row tiles, 12 (seq, head)


# -- on an sm90 GPU ---------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(2, 256, 256, 4, 2, 128, causal=True, dtype=torch.bfloat16),
    Case(1, 384, 384, 4, 4, 128, dtype=torch.bfloat16),
    Case(2, 512, 512, 8, 1, 128, causal=True, dtype=torch.float16),
    Case(3, 128, 128, 2, 2, 128, dtype=torch.float16),
    # L not a multiple of the 128-row tile: the last tile's second group has no rows
    Case(2, 320, 320, 4, 2, 128, causal=True, dtype=torch.bfloat16),
    Case(1, 320, 320, 4, 4, 128, dtype=torch.float16),
    # D64: 192-row tiles (3 groups); 448 ends in a tile of one group, 384 in whole tiles; causal, the tiles end at
    # L (_hopper_fwd_kernel._lead): 256's first tile has one group at work, 320's (D128) one of two
    Case(2, 256, 256, 4, 2, 64, causal=True, dtype=torch.bfloat16),
    Case(1, 448, 448, 8, 1, 64, dtype=torch.bfloat16),
    Case(2, 384, 384, 4, 4, 64, causal=True, dtype=torch.float16),
    # any L: a group's rows and the last key block end past it (TMA zero-fills; the keys past L are masked)
    Case(2, 200, 200, 4, 2, 128, dtype=torch.bfloat16),
    Case(1, 333, 333, 4, 4, 128, causal=True, dtype=torch.float16),
    Case(3, 129, 129, 8, 2, 128, causal=True, dtype=torch.bfloat16),
    Case(2, 300, 300, 4, 2, 64, dtype=torch.bfloat16),
    Case(1, 450, 450, 8, 8, 64, causal=True, dtype=torch.float16),
    Case(2, 131, 131, 2, 1, 64, causal=True, dtype=torch.bfloat16),
]


def count_launches(monkeypatch, module, name: str, shape_arg: int) -> list:
    """Skips off sm90 or without Gluon; else replaces ``module.name`` (a Hopper launcher) with one that records the
    shape of its positional argument ``shape_arg`` on every call, and returns that list."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm90 GPU (H100/H200)")
    if module.unavailable_reason():
        pytest.skip(module.unavailable_reason())
    calls = []
    launch = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[shape_arg].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture
def hopper_calls(monkeypatch):
    """Lowers the tiles' length bounds to 128 and counts the kernel's launches; skips off sm90."""
    calls = count_launches(monkeypatch, hopper_fwd, "flash_fwd_hopper", 0)
    monkeypatch.setattr(hopper_fwd, "TILES", {key: t._replace(min_seqlen=128) for key, t in hopper_fwd.TILES.items()})
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("head_major", [False, True], ids=["blhd", "bhld"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_matches_oracle_on_sm90(case, head_major, hopper_calls):
    matches_oracle(case, head_major, seed=11)
    assert hopper_calls, "the Hopper forward did not run"


def matches_oracle(case: Case, head_major: bool, seed: int) -> None:
    """``flash_attn_func`` on the GPU against the fp32 oracle, forward and backward; ``head_major``: the inputs as
    Transformers hands them over, ``[B, H, L, D]`` storage seen as ``[B, L, H, D]``."""
    from hf_flash import flash_attn_func

    q, k, v, dout = make_inputs(case, "cuda", seed=seed)
    if head_major:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    ours = functools.partial(flash_attn_func, **case.kwargs)
    assert_matches_oracle(ours, oracle_for(case), (q, k, v), dout)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_varlen_matches_oracle_on_sm90(causal, head_dim, hopper_calls):
    """Packed sequences (one cu_seqlens for Q and K/V, as the Transformers integration passes it): lengths that
    end inside a group of 64 rows and a key block, one shorter than a group, one of whole tiles; the next
    sequence's rows past each end must stay out of the scores and the stores."""
    from flash_oracle import assert_packed_self_attention_matches

    assert_packed_self_attention_matches([300, 77, 384, 641], head_dim, causal, seed=29)
    assert hopper_calls, "the Hopper forward did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_lse_matches_the_portable_forward(head_dim, hopper_calls, monkeypatch):
    """Every packed row's O and LSE as the portable varlen forward's (which the backward reads), none left
    unwritten."""
    from flash_oracle import varlen_inputs

    from hf_flash import flash_attn_varlen_func

    lengths = [200, 513, 64, 450]
    q, k, v, _, cu, _ = varlen_inputs(lengths, lengths, 8, 2, head_dim, "cuda", torch.bfloat16, seed=31)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 513, 513, causal=True, return_attn_probs=True)
    assert hopper_calls
    monkeypatch.setenv(hopper_fwd.ENV, "0")
    base, base_lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 513, 513, causal=True, return_attn_probs=True)
    assert len(hopper_calls) == 1, f"{hopper_fwd.ENV}=0 must turn the kernel off"
    torch.testing.assert_close(lse, base_lse, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.float(), base.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lse_and_output_match_the_portable_forward(head_dim, hopper_calls, monkeypatch):
    """Same O (within rounding) and the same LSE, which the backward relies on, as the portable kernel."""
    from hf_flash import flash_attn_func

    case = Case(2, 1024, 1024, 8, 2, head_dim, causal=True, dtype=torch.bfloat16)
    q, k, v, _ = make_inputs(case, "cuda", seed=12)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert hopper_calls
    monkeypatch.setenv(hopper_fwd.ENV, "0")
    base, base_lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert len(hopper_calls) == 1, f"{hopper_fwd.ENV}=0 must turn the kernel off"
    torch.testing.assert_close(lse, base_lse, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.float(), base.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_tile_order_computes_the_same(head_dim, hopper_calls):
    """Any number of (batch, head) pairs per group of tiles, a last group smaller than the others included,
    gives the same bits: each tile's arithmetic does not depend on the order."""
    q, k, v, _ = make_inputs(Case(3, 384, 384, 4, 2, head_dim, causal=True, dtype=torch.bfloat16), "cuda", seed=13)
    out, lse = torch.empty_like(q), torch.empty(3, 4, 384, device="cuda")
    results = []
    for group in (None, 1, 5, 12):  # 12 pairs: the one-wave default; 5: groups of 5, 5 and 2
        hopper_fwd.flash_fwd_hopper(q, k, v, out, lse, 0.125, True, group=group)
        results.append((out.clone(), lse.clone()))
    for o, s in results[1:]:
        assert torch.equal(o, results[0][0]) and torch.equal(s, results[0][1])


@pytest.mark.gpu
def test_other_calls_take_the_portable_forward(hopper_calls):
    from hf_flash import flash_attn_func

    for case in (Case(1, 100, 100, 2, 2, 128), Case(1, 96, 96, 2, 2, 64), Case(1, 256, 256, 2, 2, 96),
                 Case(1, 256, 384, 2, 2, 128)):
        q, k, v, _ = make_inputs(case, "cuda")
        flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=False)
    q, k, v, _ = make_inputs(Case(1, 256, 256, 2, 2, 128, dtype=torch.bfloat16), "cuda")
    flash_attn_func(q, k, v, causal=True, window_size=(64, 0))
    flash_attn_func(q, k, v, softcap=20.0)
    assert not hopper_calls, hopper_calls
