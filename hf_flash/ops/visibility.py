"""Which keys a query may see: the one Python definition of flash-attn's masking rule.

Every token has a sequence id and a position in its sequence. Query positions are aligned bottom-right:
in a sequence of ``Lq`` queries over ``Lk`` keys, query ``i`` sits at key position ``i + Lk - Lq`` (a
chunk of new tokens after a KV cache). With ``(left, right)`` from :func:`window_bounds`, query position
``i`` sees key position ``j`` of the same sequence when::

    i - left <= j <= i + right        (-1: that side is unbounded; causal sets right = 0)

Example: Lq = 2, Lk = 5, causal::

    keys   0 1 2 3 4
    q0     1 1 1 1 0
    q1     1 1 1 1 1

A query that sees no key (``Lq > Lk`` under causal, narrow windows) outputs 0.

The PyTorch reference (:mod:`hf_flash.ops.reference`), the SDPA fallback's masks (:mod:`hf_flash.fallback`),
the sm75 path choice (:mod:`hf_flash.dispatch`) and the Transformers integration's padded masks all call
this module. The Triton kernels keep their own form of the rule (``common.visible``), and the tests' oracle
(``tests/ops/flash_oracle.py``) its own, so that each checks the other.
"""

from __future__ import annotations

import torch

__all__ = ["packed_positions", "simplify_mask", "varlen_positions", "varlen_visible_mask", "visible", "visible_mask",
           "window_bounds"]  # fmt: skip


def window_bounds(causal: bool, window_size) -> tuple[int, int]:
    """``(left, right)``: how far left and right of its aligned position a query sees (-1 = unbounded)."""
    left, right = window_size
    return left, 0 if causal else right


def visible(q_seq, q_pos, k_seq, k_pos, causal: bool, window_size=(-1, -1)) -> torch.Tensor:
    """Bool ``[..., Lq, Lk]``: True where query i may attend key j.

    Args:
        q_seq, q_pos: ``[..., Lq]`` ints: each query's sequence id and its position, already aligned
            bottom-right (``+ Lk - Lq`` of its sequence).
        k_seq, k_pos: ``[..., Lk]`` the same for keys; a sequence id no query has (e.g. -1) hides a key (padding).
        causal, window_size: flash-attn's.
    """
    left, right = window_bounds(causal, window_size)
    offset = k_pos[..., None, :] - q_pos[..., :, None]  # how far right of the query the key is
    seen = q_seq[..., :, None] == k_seq[..., None, :]
    if right >= 0:
        seen = seen & (offset <= right)
    if left >= 0:
        seen = seen & (offset >= -left)
    return seen


def visible_mask(
    seqlen_q: int, seqlen_k: int, causal: bool, window_size: tuple[int, int], device=None
) -> torch.Tensor | None:
    """:func:`visible` ``[Lq, Lk]`` for one sequence; None when no bound is set (everything visible)."""
    if window_bounds(causal, window_size) == (-1, -1):
        return None
    q_pos = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)
    k_pos = torch.arange(seqlen_k, device=device)
    return visible(torch.zeros_like(q_pos), q_pos, torch.zeros_like(k_pos), k_pos, causal, window_size)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For packed tokens ``0..total-1``: (sequence id ``[total]``, position in it ``[total]``, lengths ``[S]``)."""
    cu = cu_seqlens.long()
    token = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], token, right=True)
    return seq, token - cu[seq], cu.diff()


def varlen_positions(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int):
    """``(q_seq, q_pos, k_seq, k_pos)`` of packed sequences, query positions aligned bottom-right inside
    each sequence: the arguments of :func:`visible` for the varlen layout."""
    q_seq, q_pos, len_q = packed_positions(cu_seqlens_q, total_q)
    k_seq, k_pos, len_k = packed_positions(cu_seqlens_k, total_k)
    return q_seq, q_pos + (len_k - len_q)[q_seq], k_seq, k_pos


def varlen_visible_mask(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, causal: bool, window_size):
    """:func:`visible` ``[total_q, total_k]`` for packed sequences (block diagonal)."""
    return visible(*varlen_positions(cu_seqlens_q, cu_seqlens_k, total_q, total_k), causal, window_size)


def simplify_mask(causal: bool, window, len_q: int, len_k: int) -> tuple[bool, tuple[int, int]]:
    """``(causal, window)`` describing the same visible keys with every part that hides none dropped.

    Bottom-right aligned, key-minus-query offsets run from ``-(Lk - 1)`` to ``Lq - 1``: a left window of
    ``Lk - 1`` or more hides nothing (a 4096-token window over 512 tokens), nor does a right one of
    ``Lq - 1`` or more, and causal (a right window of 0) hides nothing from a single query (decoding).
    """
    left, right = window_bounds(causal, window)
    if left >= len_k - 1:
        left = -1
    if right >= len_q - 1:
        right = -1
    causal = right == 0
    return causal, (left, -1 if causal else right)
