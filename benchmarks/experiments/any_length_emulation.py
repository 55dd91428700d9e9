"""The arithmetic of the Hopper backward at any L (``_hopper_bwd_kernel``) on the CPU: its block walk (128-key
programs of two 64-key groups, STEP-query steps, the causal and wrap-around orders, the masked steps) on inputs
zero-filled past L as TMA fills them, the rows past L dropped from the dK/dV stores, in fp64 for one (batch,
head), against autograd.

    python benchmarks/experiments/any_length_emulation.py    # max |diff| per (L, causal, STEP); ~1e-15 expected

The forward's walk (``emulate_fwd``: tiles of 2 or 3 groups of 64 rows, any L, zeros or the next sequence's rows
past it) is replayed the same way, O and LSE against the reference.

It checks the derivation (the zero rows add nothing but through P, which the masks cover), not the kernel. The
``packed`` rows replay its varlen form instead: the rows past L hold another sequence's data (not zeros),
the queries past L get LSE = +inf (P = 0), and the dQ rows past L must receive exact zeros."""
import math
import torch

torch.manual_seed(0)
ROWS = 64


def reference(q, k, v, do, causal, scale):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    s = q @ k.T * scale
    if causal:
        L = q.shape[0]
        s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    p = torch.softmax(s, -1)
    o = p @ v
    o.backward(do)
    lse = torch.logsumexp(s, -1)
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def emulate(q, k, v, do, o, lse, causal, scale, step, packed=False):
    L, D = q.shape
    n_blocks = -(-L // (2 * ROWS))
    pad = n_blocks * 2 * ROWS + 2 * ROWS  # room for a last step past L
    if packed:  # the next sequence's rows (any finite values)
        z = lambda t: torch.cat([t, torch.randn(pad - t.shape[0], *t.shape[1:], dtype=t.dtype)])
    else:  # TMA's zero fill
        z = lambda t: torch.cat([t, torch.zeros(pad - t.shape[0], *t.shape[1:], dtype=t.dtype)])
    delta = (do * o).sum(-1)
    Q, K, V, DO, LSE, DELTA = z(q), z(k), z(v), z(do), z(lse), z(delta)
    if packed:  # the step's query mask: LSE = +inf past L
        LSE[L:] = float("inf")
    dq = torch.zeros(pad, D, dtype=q.dtype)
    dk = torch.zeros(pad, D, dtype=q.dtype)
    dv = torch.zeros(pad, D, dtype=q.dtype)
    for nb in range(n_blocks):
        n0 = nb * 2 * ROWS
        q_lo = n0 if causal else 0
        per_head = -(-(L - q_lo) // step)
        n_diag = min(2 * ROWS // step, per_head) if causal else (per_head if n0 + 2 * ROWS > L else 0)
        keys = torch.arange(n0, n0 + 2 * ROWS)
        Kb, Vb = K[keys], V[keys]
        dkb = torch.zeros(2 * ROWS, D, dtype=q.dtype)
        dvb = torch.zeros(2 * ROWS, D, dtype=q.dtype)
        for i in range(per_head):
            q_start = q_lo + i * step if causal else ((i + n0 // step) % per_head) * step
            qs = torch.arange(q_start, q_start + step)
            st = Kb @ Q[qs].T  # [keys, queries]
            pt = torch.exp(st * scale - LSE[qs][None, :])
            if i < n_diag:
                if causal:
                    pt = torch.where(keys[:, None] <= qs[None, :], pt, 0.0)
                else:
                    pt = torch.where((keys < L)[:, None], pt, 0.0)
            dpt = Vb @ DO[qs].T
            dst = pt * (dpt - DELTA[qs][None, :])
            dvb += pt @ DO[qs]
            dkb += dst @ Q[qs]
            dq[qs] += (dst.T @ Kb) * scale
        # TMA store: rows past L dropped
        valid = keys < L
        dk[keys[valid]] = dkb[valid] * scale
        dv[keys[valid]] = dvb[valid]
    assert not packed or (dq[L:] == 0).all(), "dQ rows past L must receive zeros"
    return dq[:L], dk[:L], dv[:L]


def emulate_fwd(q, k, v, causal, scale, groups, packed, lead=False):
    """The Hopper forward's tile walk (``packed``: its varlen form, landed in the thirteenth session): tiles of ``groups`` 64-row groups,
    128-key blocks, the unmasked blocks (causal: up to the group's first row; else the whole ones) then the
    masked ones; past L the next sequence's rows (``packed``) or zeros; rows past L never stored (NaN marks).
    ``lead`` (causal; landed in the sixteenth session): the tiles start ``_lead`` rows before the sequence, in
    whole groups, so that the last ends at L; the groups before the start compute nothing. Either way the grid's
    ``cdiv(L, tile_m)`` tiles store every row once."""
    L, D = q.shape
    block_n, tile_m = 128, groups * ROWS
    pad = -(-L // tile_m) * tile_m + block_n
    fill = torch.randn if packed else torch.zeros
    Q, K, V = (torch.cat([t, fill(pad - L, D, dtype=t.dtype)]) for t in (q, k, v))
    o = torch.full((pad, D), float("nan"), dtype=q.dtype)
    lse = torch.full((pad,), float("nan"), dtype=q.dtype)
    shift = (-(-L // tile_m) * tile_m - L) // ROWS * ROWS if lead and causal else 0
    starts = range(-shift, L, tile_m)
    assert len(starts) == -(-L // tile_m), "the grid's tiles"
    for q_start in starts:
        n_blocks = -(-min(L, q_start + tile_m) // block_n) if causal else -(-L // block_n)
        for g in range(groups):
            first = q_start + g * ROWS
            if first < 0 or first >= L:
                continue
            rows = torch.arange(first, first + ROWS)
            n_full = min((first + 1) // block_n, n_blocks) if causal else L // block_n
            m = torch.full((ROWS,), float("-inf"), dtype=q.dtype)
            l, acc = torch.zeros(ROWS, dtype=q.dtype), torch.zeros(ROWS, D, dtype=q.dtype)
            for j in range(n_blocks):
                keys = torch.arange(j * block_n, (j + 1) * block_n)
                s = Q[rows] @ K[keys].T * scale
                if j >= n_full:
                    keep = keys[None, :] <= rows[:, None] if causal else (keys < L)[None, :].expand_as(s)
                    s = torch.where(keep, s, float("-inf"))
                m_new = torch.maximum(m, s.max(1).values)
                m_new = torch.where(m_new == float("-inf"), 0.0, m_new)
                p = torch.exp(s - m_new[:, None])
                alpha = torch.exp(m - m_new)
                l, acc, m = l * alpha + p.sum(1), acc * alpha[:, None] + p @ V[keys], m_new
            valid = rows < L  # the masked stores
            assert not o[rows[valid]].isfinite().any(), "a row stored twice"
            o[rows[valid]] = (acc / l[:, None])[valid]
            lse[rows[valid]] = (m + torch.log(l))[valid]
    assert not o[L:].isfinite().any(), "rows past L must not be stored"
    return o[:L], lse[:L]


worst = 0.0
for L in (129, 200, 333, 700, 64 * 3 + 5, 128, 256, 77 + 256, 1000):
    for causal in (False, True):
        for groups in (2, 3):
            for packed, lead in ((False, False), (True, False), (False, True), (True, True)):
                if lead and not causal:
                    continue
                q, k, v = (torch.randn(L, 16, dtype=torch.float64) for _ in range(3))
                o, lse = reference(q, k, v, torch.zeros_like(q), causal, 0.25)[:2]
                eo, else_ = emulate_fwd(q, k, v, causal, 0.25, groups, packed, lead)
                assert eo.isfinite().all(), "a row left unstored"
                err = max((eo - o).abs().max().item(), (else_ - lse).abs().max().item())
                worst = max(worst, err)
                print(f"forward L={L} causal={causal} groups={groups} {'packed' if packed else 'zeros'}"
                      f"{' lead' if lead else ''}: max |diff| {err:.1e}")
for L in (129, 200, 333, 700, 64 * 3 + 5, 128, 256, 77 + 256):
    for causal in (False, True):
        for step in (64, 128):
            for packed in (False, True):
                D = 16
                q, k, v, do = (torch.randn(L, D, dtype=torch.float64) for _ in range(4))
                scale = 1 / math.sqrt(D)
                o, lse, gq, gk, gv = reference(q, k, v, do, causal, scale)
                eq, ek, ev = emulate(q, k, v, do, o, lse, causal, scale, step, packed)
                err = max((a - b).abs().max().item() for a, b in ((eq, gq), (ek, gk), (ev, gv)))
                worst = max(worst, err)
                print(f"L={L} causal={causal} step={step} {'packed' if packed else 'zeros'}: max |diff| {err:.1e}")
print("worst", worst)
