"""The wide GPU grid, a 2**31-element case and the memory check. Every test is marked ``gpu``.

flash-attn's own grid is a full product (dtype x causal x window x softcap x 12 head dims x seqlen pairs x
MHA/GQA/MQA x varlen x deterministic x dropout: hundreds of thousands of cases). Its CUDA kernels are
compiled once; ours are Triton kernels compiled per specialisation (head dim, flags, dtype), a few seconds
each, so a full product would take hours. The grid here keeps every value of every axis and is *pairwise
complete*: any two values of any two axes meet in at least one case (greedy covering design, fixed seed).
Head dims are paired with seqlens through their tile group (<= 64, <= 128, > 128), which is what changes
the block shapes the seqlens meet. Run in parallel shards (run_gpu_tests.sh) to overlap the compiles.
"""

import itertools
import random

import pytest
import torch
from conftest import assert_close_rel
from flash_oracle import (
    Case,
    assert_matches_oracle,
    attention_oracle,
    dense_keep_mask,
    make_inputs,
    oracle_for,
    varlen_inputs,
    varlen_keep_masks,
    varlen_oracle,
)

from hf_flash import flash_attn_func, flash_attn_kvpacked_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func

pytestmark = pytest.mark.gpu

HEAD_DIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
MHA_GQA_MQA = [(6, 6), (6, 2), (6, 1)]  # (nheads, nheads_k)
DROPOUT_SEED = 2024


def tile_group(headdim):
    return "D<=64" if headdim <= 64 else "D<=128" if headdim <= 128 else "D>128"


# head dims meet seqlens through the tile group their block shapes depend on
TILE = {"tile": (lambda case: tile_group(case["headdim"]), {tile_group(d) for d in HEAD_DIMS})}


def covering_cases(axes, required, derived, seed, tries=64):
    """Greedy pairwise covering design.

    axes: name -> list of values (a case picks one of each). derived: name -> (function(case) -> value,
    set of its values), for factors such as the tile group of a head dim. required: pairs of factor names whose every combination
    of values must appear in some case. Each step takes a combination still missing, draws ``tries`` cases
    that contain it and keeps the one that covers the most missing combinations.
    """
    rng = random.Random(seed)

    def value(case, name):
        return derived[name][0](case) if name in derived else case[name]

    def all_values(name):
        return derived[name][1] if name in derived else set(axes[name])

    missing = {(a, b, va, vb) for a, b in required for va in all_values(a) for vb in all_values(b)}

    def draw(fixed):
        while True:  # derived values are met by rejection; a handful of draws suffice for these axes
            case = {name: rng.choice(values) for name, values in axes.items()}
            case.update({name: v for name, v in fixed if name in axes})
            if all(value(case, name) == v for name, v in fixed):
                return case

    def covers(case):
        return {(a, b, value(case, a), value(case, b)) for a, b in required} & missing

    cases = []
    while missing:
        a, b, va, vb = rng.choice(sorted(missing, key=repr))
        best = max((draw([(a, va), (b, vb)]) for _ in range(tries)), key=lambda c: len(covers(c)))
        missing -= covers(best)
        cases.append(best)
    return cases


def required_pairs(axes, tiles_with=("seqlens",)):
    """Every pair of axes, except head dim x the axes in ``tiles_with``, which pair with the tile group."""
    pairs = [(a, b) for a, b in itertools.combinations(axes, 2) if {a, b} not in [{"headdim", t} for t in tiles_with]]
    return pairs + [("tile", t) for t in tiles_with]


def window_for(flag, seqlen_k, rng):
    # flash-attn draws both sides in [0, Lk); here too, from a per-case generator
    return (rng.randrange(max(seqlen_k, 1)), rng.randrange(max(seqlen_k, 1))) if flag else (-1, -1)


def case_from(axes_values, batch, seqlen_q, seqlen_k, rng):
    """The Case of one covering-design row (a dict of axis values)."""
    c = axes_values
    return Case(batch, seqlen_q, seqlen_k, *c["heads"], c["headdim"], causal=c["causal"],
                window=window_for(c["window"], seqlen_k, rng), softcap=c["softcap"], dropout_p=c["dropout"],
                deterministic=c["deterministic"], dtype=c["dtype"])  # fmt: skip


# ---- dense [B, L, H, D] grid ----

DENSE_AXES = {
    "dtype": [torch.float16, torch.bfloat16],
    "headdim": HEAD_DIMS,
    "seqlens": [
        (1, 1),
        (1, 239),
        (239, 1),
        (3, 799),
        (799, 3),
        (97, 97),
        (113, 203),
        (203, 113),
        (128, 217),
        (108, 256),
        (256, 512),
        (512, 256),
        (127, 513),
        (1023, 1024),
        (1024, 1023),
        (1025, 1025),
        (2048, 2048),
    ],
    "heads": MHA_GQA_MQA,
    "causal": [False, True],
    "window": [False, True],
    "softcap": [0.0, 5.0],  # 5 bends scores of size ~3 noticeably, so a wrong tanh derivative shows
    "dropout": [0.0, 0.17],
    "deterministic": [False, True],
    "api": ["func", "kvpacked"],
}


def dense_grid():
    rng = random.Random(1)
    grid = []
    for c in covering_cases(DENSE_AXES, required_pairs(DENSE_AXES), TILE, seed=0):
        case = case_from(c, 2 if max(c["seqlens"]) <= 512 else 1, *c["seqlens"], rng)
        grid.append(pytest.param(case, c["api"], id=case.id + ("-kvpacked" if c["api"] == "kvpacked" else "")))
    return grid


def bitwise_equal_grads(fn, inputs, dout, grads):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    again = torch.autograd.grad(fn(*leaves), leaves, dout)
    for name, a, b in zip(("dq", "dk", "dv"), grads, again):
        assert torch.equal(a, b), f"deterministic=True: {name} differs between two backward runs"


@pytest.mark.parametrize("case,api", dense_grid())
def test_dense_grid(case, api):
    q, k, v, dout = make_inputs(case, "cuda")
    keep = dense_keep_mask(flash_attn_func, case, k, DROPOUT_SEED)[0] if case.dropout_p else None

    def ours(q, k, v):
        torch.manual_seed(DROPOUT_SEED)
        if api == "kvpacked":
            return flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), **case.kwargs)
        return flash_attn_func(q, k, v, **case.kwargs)

    _, grads = assert_matches_oracle(ours, oracle_for(case, keep=keep, dropout_p=case.dropout_p), (q, k, v), dout)
    if case.deterministic:
        bitwise_equal_grads(ours, (q, k, v), dout, grads)


# ---- varlen grid: packed sequences with random padding ----

VARLEN_AXES = {
    **DENSE_AXES,
    "seqlens": [
        (1, 147),
        (113, 203),
        (128, 217),
        (113, 211),
        (108, 256),
        (256, 512),
        (512, 256),
        (1024, 1024),
        (1023, 1024),
        (1024, 1023),
        (2048, 2048),
    ],
    "padding": ["random", "third", "full", "with-empty"],
}


def padded_lengths(max_len, batch, mode, rng):
    """Per-sequence lengths <= max_len, like flash-attn's padding masks: ``random`` trims up to 20 tokens,
    ``third`` keeps at least a third, ``with-empty`` has empty sequences among full and random ones."""
    if mode == "full":
        return [max_len] * batch
    if mode == "random":
        return [rng.randint(max(1, max_len - 20), max_len) for _ in range(batch)]
    if mode == "third":
        return [rng.randint(max_len // 3, max_len) for _ in range(batch)]
    return [0, max_len] + [rng.choice([0, rng.randint(1, max_len)]) for _ in range(batch - 2)]


def varlen_grid():
    rng = random.Random(2)
    grid = []
    for c in covering_cases(VARLEN_AXES, required_pairs(VARLEN_AXES), TILE, seed=0):
        batch = 4 if max(c["seqlens"]) <= 512 else 2
        lengths_q = padded_lengths(c["seqlens"][0], batch, c["padding"], rng)
        lengths_k = padded_lengths(c["seqlens"][1], batch, c["padding"], rng)
        case = case_from(c, batch, max(lengths_q), max(lengths_k), rng)
        name = f"{case.id}-varlen-{c['padding']}" + ("-kvpacked" if c["api"] == "kvpacked" else "")
        grid.append(pytest.param(case, lengths_q, lengths_k, c["api"], id=name))
    return grid


@pytest.mark.parametrize("case,lengths_q,lengths_k,api", varlen_grid())
def test_varlen_grid(case, lengths_q, lengths_k, api):
    q, k, v, dout, cu_q, cu_k = varlen_inputs(
        lengths_q, lengths_k, case.nheads, case.nheads_k, case.headdim, "cuda", case.dtype
    )
    max_q, max_k = max(lengths_q), max(lengths_k)
    keep = None
    if case.dropout_p:
        keep = varlen_keep_masks(flash_attn_varlen_func, q, k, lengths_q, lengths_k, DROPOUT_SEED, **case.kwargs)

    def ours(q, k, v):
        torch.manual_seed(DROPOUT_SEED)
        if api == "kvpacked":
            return flash_attn_varlen_kvpacked_func(
                q, torch.stack([k, v], dim=1), cu_q, cu_k, max_q, max_k, **case.kwargs
            )
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **case.kwargs)

    def oracle(q, k, v):
        return varlen_oracle(
            q,
            k,
            v,
            cu_q,
            cu_k,
            keep=keep,
            causal=case.causal,
            window=case.window,
            softcap=case.softcap,
            dropout_p=case.dropout_p,
        )[0]

    _, grads = assert_matches_oracle(ours, oracle, (q, k, v), dout)
    if case.deterministic:
        bitwise_equal_grads(ours, (q, k, v), dout, grads)


# ---- scale: deterministic backward under contention, 64-bit offsets, memory linear in L ----


def test_deterministic_gqa_repeated():
    """Five backward passes of a GQA case with many blocks per group: bitwise the same every time."""
    case = Case(2, 1537, 1537, 16, 2, 128, causal=True, deterministic=True, dtype=torch.bfloat16)
    q, k, v, dout = make_inputs(case, "cuda")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = flash_attn_func(*leaves, **case.kwargs)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    for _ in range(4):
        again = torch.autograd.grad(out, leaves, dout, retain_graph=True)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs between backward runs"


def test_offsets_past_2_31():
    """q, out, dout and dq of 2 x 32768 x 264 x 128 = 2.2e9 elements: the last batch's rows start past
    2**31, so 32-bit offsets would wrap. Checked where the answer is cheap to know exactly:

    * the last 64 queries of each head (causal, aligned like an Lq = 64, Lk = 32768 problem): out, dq;
    * the last 64 keys: only those 64 queries see them, so their dK, dV come whole from the same slice;
    * the first 64 queries of batch 0 (they see only the first 64 keys), for symmetry.
    """
    batch, seqlen, nheads, nheads_k, headdim, tail = 2, 32768, 264, 8, 128, 64
    assert batch * seqlen * nheads * headdim > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q, dout = randn(batch, seqlen, nheads, headdim), randn(batch, seqlen, nheads, headdim)
    k, v = randn(batch, seqlen, nheads_k, headdim), randn(batch, seqlen, nheads_k, headdim)
    for x in (q, k, v):
        x.requires_grad_()
    out = flash_attn_func(q, k, v, causal=True)
    out.backward(dout)
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf"

    group = nheads // nheads_k
    for b, rows, hk in ((batch - 1, slice(seqlen - tail, seqlen), nheads_k - 1), (0, slice(0, tail), 0)):
        heads = slice(hk * group, (hk + 1) * group)
        keys = slice(0, rows.stop)
        inputs = (
            q[b : b + 1, rows, heads].detach(),
            k[b : b + 1, keys, hk : hk + 1].detach(),
            v[b : b + 1, keys, hk : hk + 1].detach(),
        )
        upstream = dout[b : b + 1, rows, heads]
        refs = []
        for upcast in (True, False):
            leaves = [(x.float() if upcast else x.clone()).requires_grad_() for x in inputs]
            ref_out = attention_oracle(*leaves, causal=True)[0]
            refs.append((ref_out, *torch.autograd.grad(ref_out, leaves, upstream.to(ref_out.dtype))))
        (ref_out, ref_dq, ref_dk, ref_dv), (pt_out, pt_dq, pt_dk, pt_dv) = refs
        where = f"batch {b}, rows {rows.start}..{rows.stop - 1}"
        assert_close_rel(f"out ({where})", out[b : b + 1, rows, heads], ref_out, pt_out, 2)
        assert_close_rel(f"dq ({where})", q.grad[b : b + 1, rows, heads], ref_dq, pt_dq, 3)
        if rows.stop == seqlen:  # keys 0..63 of batch 0 are seen by later rows too: no exact dK/dV there
            last = slice(seqlen - tail, seqlen)
            assert_close_rel(
                f"dk ({where})", k.grad[b : b + 1, last, hk : hk + 1], ref_dk[:, -tail:], pt_dk[:, -tail:], 3
            )
            assert_close_rel(
                f"dv ({where})", v.grad[b : b + 1, last, hk : hk + 1], ref_dv[:, -tail:], pt_dv[:, -tail:], 3
            )


def extra_peak_bytes(seqlen, batch=1, nheads=16, headdim=128):
    """Peak memory above the inputs during forward + backward (grads included), causal bf16."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, seqlen, nheads, headdim)
    q, k, v, dout = (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flash_attn_func(q, k, v, causal=True).backward(dout)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, q.numel() * q.element_size()


def test_memory_linear_in_seqlen():
    """Extra peak memory of forward + backward grows like L (4x over two doublings), not like L**2 (16x), and
    stays within a few copies of q (out, lse, delta, dq, dk, dv; on sm90 the Hopper backward's fp32 dQ buffer
    too). From the Hopper backward's MIN_SEQLEN, so that one backward runs at every length: its fp32 buffer adds
    2 x q (an H200: 4.05 x q at 4k with the portable backward, 6.05 x q at 8k and 16k with the Hopper one)."""
    from hf_flash.ops import hopper_bwd

    extra_peak_bytes(1024)  # compile and warm the allocator outside the measurement
    lengths = tuple(hopper_bwd.MIN_SEQLEN[(128, True)] * n for n in (1, 2, 4))
    measured = {seqlen: extra_peak_bytes(seqlen) for seqlen in lengths}
    summary = ", ".join(f"L={s}: {e / 2**20:.0f} MiB ({e / qb:.2f} x q)" for s, (e, qb) in measured.items())
    for seqlen, (extra, q_bytes) in measured.items():
        assert extra <= 8 * q_bytes, f"extra memory above 8 x q at L={seqlen}: {summary}"
    ratio = measured[lengths[-1]][0] / measured[lengths[0]][0]
    assert ratio <= 4.4, f"extra memory grew {ratio:.2f}x over two doublings of L (linear: 4x): {summary}"


# The grid's sequences stop at 2048, where the sm90 forward uses its short-sequence tiles
# (config.SHORT_SEQLEN); these run the long-sequence tiles, with and without TMA (D = 80 reads by pointer).
LONG_TILE_CASES = [
    Case(1, 2113, 2113, 4, 1, 64, causal=True, dtype=torch.bfloat16),
    Case(1, 2067, 2300, 4, 2, 128, dtype=torch.bfloat16),
    Case(1, 2300, 2067, 2, 2, 80, causal=True, window=(300, 0), dtype=torch.float16),
    Case(2, 2071, 2071, 2, 2, 128, causal=True, softcap=20.0, dtype=torch.float16),
]


@pytest.mark.parametrize("case", LONG_TILE_CASES, ids=lambda c: c.id)
def test_long_sequence_tiles(case):
    from hf_flash.ops import config

    assert case.seqlen_q > config.SHORT_SEQLEN
    q, k, v, dout = make_inputs(case, "cuda", seed=9)
    assert_matches_oracle(lambda q, k, v: flash_attn_func(q, k, v, **case.kwargs), oracle_for(case), (q, k, v), dout)
