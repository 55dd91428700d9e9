"""Attention in plain PyTorch: the FlashAttention algorithm as one explains it, and the naive formula.

Two functions compute the same thing:

* :func:`attention_ref` builds the full ``[Lq, Lk]`` score matrix, masks it and applies softmax.
  It is the oracle of the tests (in fp32) and the "same dtype PyTorch" baseline of the tolerance rule.
* :func:`attention_tiled` never holds more than one ``[BLOCK_M, BLOCK_N]`` tile of scores. For each
  block of queries it walks over blocks of keys and keeps, per query row, a running maximum ``m`` and
  a running sum ``l`` of ``exp(s - m)``. When a new block raises the maximum, the sum and the output
  accumulated so far are rescaled by ``exp(m_old - m_new)``; at the end the accumulator is divided by
  ``l``. That is the online softmax of the Triton kernels in ``forward.py``, without the GPU details.

Layouts follow flash-attn: ``q [B, Lq, H, D]``, ``k``/``v`` ``[B, Lk, Hk, D]`` with ``H % Hk == 0``.

Masking rules (shared with the kernels). With ``shift = Lk - Lq`` (bottom-right alignment), query ``i``
may see key ``j`` when::

    causal:          j <= i + shift
    window (l, r):   i + shift - l <= j <= i + shift + r     (-1 = unbounded on that side)

Example: Lq = 2, Lk = 5, causal::

    keys   0 1 2 3 4
    q0     1 1 1 1 0
    q1     1 1 1 1 1

Attention sinks (``sinks [H]``, gpt-oss): one more score per row, ``sinks[h]``, that takes part in the
softmax and has no value. :func:`attention_ref` appends it as a last score column and drops that column
after the softmax; :func:`attention_tiled` starts each row's running max and sum from it.
"""

from __future__ import annotations

import math

import torch

from hf_flash.ops.visibility import visible_mask

__all__ = ["attention_ref", "attention_ref_varlen", "attention_tiled", "visible_mask"]


def _scores(q, k, softmax_scale, softcap):
    # q [B, Lq, H, D], k [B, Lk, H, D] -> [B, H, Lq, Lk]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
):
    """Naive attention with flash-attn's semantics.

    Args:
        q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, Hk, D]``.
        upcast: compute in fp32 (the oracle) instead of the input dtype (the "same dtype" baseline).
        sinks: ``[H]`` attention-sink logits, or None.
    Returns:
        out ``[B, Lq, H, D]`` in q's dtype; with ``return_lse`` also the fp32 log-sum-exp ``[B, H, Lq]``
        (``+inf`` for rows that see no key, as the kernels store it).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = _scores(q, k, scale, softcap)
    visible = visible_mask(q.shape[1], k.shape[1], causal, window_size, q.device)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        # the sink as a last score column: in the softmax's denominator, dropped before P V
        sink_column = sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink_column], dim=-1)
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    # A row that sees no key (and no sink): softmax of all -inf is NaN; flash-attn defines that output as 0.
    p = p.nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v).to(dtype)
    if return_lse:
        return out, lse.masked_fill(lse == float("-inf"), float("inf"))
    return out


def attention_ref_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, upcast=True, sinks=None,
):
    """:func:`attention_ref` per sequence of packed inputs ``q [total_q, H, D]``, ``k``/``v`` ``[total_k, Hk, D]``."""
    outs = []
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        outs.append(
            attention_ref(
                q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], softmax_scale, causal, window_size, softcap, upcast,
                sinks=sinks,
            )[0]
        )
    return torch.cat(outs, dim=0)


def attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    block_m: int = 64,
    block_n: int = 64,
    sinks: torch.Tensor | None = None,
):
    """The forward pass of FlashAttention, tile by tile, in fp32. Same arguments as :func:`attention_ref`.

    Returns ``(out [B, Lq, H, D], lse [B, H, Lq])``.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    groups = H // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    visible = visible_mask(Lq, Lk, causal, window_size, q.device)
    # Work in [B, H, L, D]; each query head reads the K/V head of its group (no copy in the kernels).
    q = q.float().transpose(1, 2)
    k = k.float().transpose(1, 2).repeat_interleave(groups, dim=1)
    v = v.float().transpose(1, 2).repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Lq, device=q.device)

    for m0 in range(0, Lq, block_m):
        q_tile = q[:, :, m0 : m0 + block_m]  # [B, H, BM, D]
        rows = q_tile.shape[2]
        m_i = torch.full((B, H, rows), float("-inf"), device=q.device)  # running max
        l_i = torch.zeros(B, H, rows, device=q.device)  # running sum of exp(s - m_i)
        if sinks is not None:
            # the sink is the first score every row has seen: max = sink, sum = exp(sink - sink) = 1
            m_i = sinks.float()[None, :, None].expand(B, H, rows).clone()
            l_i = torch.ones(B, H, rows, device=q.device)
        acc = torch.zeros(B, H, rows, D, device=q.device)  # running sum of exp(s - m_i) @ V
        for n0 in range(0, Lk, block_n):
            s = q_tile @ k[:, :, n0 : n0 + block_n].transpose(-1, -2) * scale  # [B, H, BM, BN]
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if visible is not None:
                s = s.masked_fill(~visible[m0 : m0 + block_m, n0 : n0 + block_n], float("-inf"))
            # -- new running max; a row that has seen no key yet keeps -inf, and subtracting
            #    -inf from -inf would give NaN, so such rows subtract 0 instead.
            m_new = torch.maximum(m_i, s.amax(-1))
            m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            # -- rescale what was accumulated under the old max, then add this tile
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v[:, :, n0 : n0 + block_n]
            m_i = m_new
        # -- final division; rows that saw no key output 0 and store lse = +inf
        empty = l_i == 0
        out[:, :, m0 : m0 + block_m] = acc / torch.where(empty, torch.ones_like(l_i), l_i)[..., None]
        lse[:, :, m0 : m0 + block_m] = torch.where(empty, torch.full_like(m_i, float("inf")), m_i + torch.log(l_i))
    return out.transpose(1, 2), lse
