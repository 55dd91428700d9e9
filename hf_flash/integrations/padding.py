"""From padded batches to the packed ("varlen") layout of the kernels, and back.

Padded layout: ``x [B, L, ...]`` plus a 2D mask ``[B, L]`` (True / 1 = real token). Packed layout:
the real tokens of all rows one after the other, ``x [N, ...]`` with ``N = mask.sum()``, and
``cu_seqlens`` int32 ``[S + 1]`` (start of each sequence, then N) so that no sequence sees another
and no compute is spent on pad tokens.

Packed batches (Transformers' ``DataCollatorWithFlattening``, TRL's ``padding_free=True``) arrive
already flattened: one row holding several sequences, told apart by ``position_ids`` that restart,
or by explicit ``cu_seq_lens_q/k`` kwargs.

Nothing here imports Transformers. The ``int(...)`` reads of lengths are device syncs, which the
varlen kernels need anyway (``max_seqlen`` is a Python int).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_flash.ops.checks import vouch_for_cu_seqlens

__all__ = [
    "cu_seqlens_from_lengths",
    "mask_to_varlen",
    "mask_to_vouched_varlen",
    "pad",
    "sequence_starts",
    "unpad",
    "varlen_from_position_ids",
]


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``lengths [S]`` (any int dtype) -> int32 ``[S + 1]``: 0, then the running sum."""
    return F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))


def mask_to_varlen(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``mask [B, L]`` (nonzero = real token) -> (indices int64 ``[N]`` of the real tokens in the
    flattened ``B * L`` rows, cu_seqlens int32 ``[B + 1]``, max_seqlen as a Python int)."""
    mask = mask.bool()
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    return indices, cu_seqlens_from_lengths(lengths), int(lengths.max())


def mask_to_vouched_varlen(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`mask_to_varlen` for the integration's own routing, its cu_seqlens recorded as valid
    (``ops.checks.vouch_for_cu_seqlens``): they are the running sum of the lengths just read, private to the
    plan (no caller can write to them), so the varlen call need not read them back (a device sync in the
    first layer, and in every layer under inference_mode). Not for tensors handed to users (:func:`unpad`)."""
    indices, cu_seqlens, max_seqlen = mask_to_varlen(mask)
    vouch_for_cu_seqlens(cu_seqlens, indices.numel(), max_seqlen)
    return indices, cu_seqlens, max_seqlen


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Keep the real tokens of a padded batch.

    Args:
        x: ``[B, L, ...]``.
        mask: ``[B, L]`` bool or int, nonzero for real tokens (left or right padding, or holes).
    Returns:
        packed ``[N, ...]`` and :func:`mask_to_varlen`'s (indices ``[N]``, cu_seqlens ``[B + 1]``, max_seqlen).
    """
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(x.shape[:2])} (batch, length) of x, got {tuple(mask.shape)}")
    indices, cu_seqlens, max_seqlen = mask_to_varlen(mask)
    return x.reshape(-1, *x.shape[2:])[indices], indices, cu_seqlens, max_seqlen


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad`: ``packed [N, ...]`` -> ``[batch, seqlen, ...]`` with zeros at the pads.

    ``index_put`` keeps autograd working: the gradient of a pad position is simply dropped.
    """
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_put((indices,), packed)
    return out.view(batch, seqlen, *packed.shape[1:])


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``position_ids [B, L]`` -> bool ``[B, L]``, True where a new sequence starts.

    A sequence starts at the first column and wherever the position does not grow by exactly one.
    This is how Transformers' own mask code finds packed sequences for eager / SDPA (it does not
    need a 0 at each start, transformers #39814), so hf_flash splits a row exactly where they do.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return starts


def varlen_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """cu_seqlens for rows that pack several sequences, or None when every row is one sequence.

    Args:
        position_ids: ``[B, L]`` ints. Each row is split where :func:`sequence_starts` says; the rows
            are then laid one after the other (the packed layout of ``x.reshape(B * L, ...)``).
    Returns:
        (cu_seqlens int32 ``[S + 1]``, max_seqlen) or None. Reading the values is a device sync.
    """
    starts = sequence_starts(position_ids).flatten()
    if int(starts.sum()) == position_ids.shape[0]:
        return None  # one sequence per row: plain (non-varlen) attention is cheaper
    start_idx = torch.nonzero(starts, as_tuple=False).flatten().to(torch.int32)
    total = torch.tensor([starts.numel()], dtype=torch.int32, device=start_idx.device)
    cu_seqlens = torch.cat([start_idx, total])
    return cu_seqlens, int(cu_seqlens.diff().max())
