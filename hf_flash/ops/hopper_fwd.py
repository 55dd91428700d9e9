"""The forward on Hopper (sm90) at head dims 64 and 128: warp-specialized, written in Gluon.

The portable forward (``forward.py``) runs every warp through the same steps in lockstep, so the softmax of a
block waits for its ``Q K^T`` and the next ``Q K^T`` waits for the softmax. This kernel splits a program the
way FlashAttention-3 does: a loader partition streams K and V blocks through TMA into a ring of shared-memory
stages guarded by mbarriers, and two (D128) or three (D64) 4-warp consumer partitions own 64 query rows each,
running ``Q K^T``, the online softmax and ``P V`` with ``wgmma``. The SM's warp schedulers then interleave one
group's softmax with the other groups' products. Triton 3.6's automatic warp specialization hangs with two
consumer groups (``docs/DESIGN.md``), hence Gluon, where the partitions, barriers and layouts are explicit.
On an H100 it ran the forward at 1.06-1.35x the portable kernel from 2k tokens (D64 causal: 3k) to 16k (GQA D64
causal to 32k; LOG, 2026-12-06, sixth session); shorter sequences are not faster there (0.72-1.03x against the
portable kernel's short-sequence tiles): :data:`TILES` holds each tile and the length it starts at.

So it takes only what it was measured on, and the portable kernel everything else (:func:`takes` decides):
dense or packed (varlen, self-attention: one ``cu_seqlens``, or two equal) batches on an sm90 GPU, head dim 64 or
128, ``Lq == Lk`` of any length at least the tile's ``min_seqlen`` (varlen: the mean length), causal or not, no window,
softcap, dropout or sinks, fp16/bf16, Q/K/V/O readable by TMA (heads side by side, or head-major as
Transformers' ``[B, H, L, D]`` tensors are; varlen: heads side by side). ``HF_FLASH_HOPPER_FWD=0`` turns it
off. It writes the same O and LSE (``[B, H, L]``, natural log) as the portable forward, which the backward
reads.

A tensor ``[B, L, H, D]`` is read as ``[B, H, L, D]`` whatever its strides (heads side by side or head-major:
``common.TmaLayout`` says which TMA takes), in boxes of one (batch, head), so the hardware zero-fills past L
(``_hopper_fwd_kernel.box_descriptor``).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from hf_flash.ops.checks import same_boundaries
from hf_flash.ops.common import tma_layout
from hf_flash.ops.config import cuda_index, device_facts, own_capability, sm_count

SPLIT_M = 64  # query rows of one consumer group (one warpgroup's wgmma rows)


class Tile(NamedTuple):
    """A program's tile: ``groups`` consumer warpgroups of ``split_m`` query rows, ``block_n`` keys per stage,
    ``stages`` K/V stages in shared memory; ``min_seqlen``: the shortest L it was measured faster at."""

    groups: int
    block_n: int
    stages: int
    min_seqlen: int
    split_m: int = SPLIT_M

    def per_head(self, seqlen: int) -> int:
        """Tiles of one (batch, head) at length ``seqlen``: the last one may be partly past L."""
        return -(-seqlen // (self.groups * self.split_m))


# (head dim, causal) -> tile, FlashAttention-3's split of rows (H100, hopper_fwd_speed.py; docs/DESIGN.md).
# D128: 2 x 64 rows, 128 keys, 2 stages = 2 x (2 x 32 KB) + Q's 2 x 16 KB = 160 KB of the 227 KB a program may
# have; the two groups take turns to issue their products (the kernel's ping-pong needs the 2 stages; 3 read no
# faster). D64: 3 x 64 rows (the softmax of a 64-wide head outweighs its products, so a third group keeps the tensor
# cores fed: 2 groups read 0.86-1.08x, and 1.03-1.14x with the ping-pong against 3 groups' 1.15-1.26x), 128 keys,
# 2 stages (3 measured no faster), 88 KB. With one-wave head groups: 1.06-1.35x the portable forward from min_seqlen
# to 16k (GQA 32/8 D64 causal to 32k; D128 1.16-1.41x at 4k-16k since the ping-pong); below, D128 with the ping-pong
# 1.08x non-causal but 0.95x / 0.99x causal at 1k / 1.5k, D64 0.72-0.99x at 1k and 0.86x causal at 2k.
TILES = {
    (128, False): Tile(groups=2, block_n=128, stages=2, min_seqlen=2048),
    (128, True): Tile(groups=2, block_n=128, stages=2, min_seqlen=2048),
    (64, False): Tile(groups=3, block_n=128, stages=2, min_seqlen=2048),
    (64, True): Tile(groups=3, block_n=128, stages=2, min_seqlen=3072),
}
ENV = "HF_FLASH_HOPPER_FWD"
LOG2E = 1.4426950408889634


def coverage() -> str:
    """The calls :data:`TILES` covers, in words (:func:`lengths_in_words`)."""
    return lengths_in_words({key: tile.min_seqlen for key, tile in TILES.items()})


def lengths_in_words(min_seqlen: dict) -> str:
    """``{(head dim, causal): shortest L}`` in words: ``head dim 128 from 2048 tokens; head dim 64 non-causal
    from 2048 tokens, causal from 3072 tokens``."""
    parts = []
    for d in sorted({d for d, _ in min_seqlen}, reverse=True):
        plain, causal = min_seqlen.get((d, False)), min_seqlen.get((d, True))
        if plain and plain == causal:
            parts.append(f"head dim {d} from {plain} tokens")
        else:
            parts.append(f"head dim {d} " + ", ".join(f"{name} from {n} tokens" for name, n in
                                                      (("non-causal", plain), ("causal", causal)) if n))
    return "; ".join(parts)


@functools.cache
def unavailable_reason() -> str | None:
    """None when this Triton has the Gluon pieces the kernel uses (Triton 3.6 to 3.9 were compiled), else why."""
    try:
        from triton.experimental import gluon  # noqa: F401
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError as exc:
        return f"this Triton has no Gluon Hopper language ({exc})"
    return None


if unavailable_reason() is None:
    from hf_flash.ops._hopper_fwd_kernel import launch as _launch
else:
    _launch = None


def switched_on(env: str, default: str) -> bool:
    """Whether the environment variable ``env`` (``default`` when unset) turns a kernel on: anything but ``0``,
    ``false`` or empty."""
    return os.environ.get(env, default) not in ("0", "", "false", "False")


def enabled() -> bool:
    return switched_on(ENV, "1")


def takes(q, k, v, cu_seqlens, window, softcap, dropout_p, sinks) -> bool:
    """Whether this forward runs the call (arguments as ``function._fwd_impl`` has them; ``cu_seqlens``: (q's,
    k's) of a varlen call, else None): :func:`fits`, on an sm90 GPU (a forced arch other than sm90 brings its own
    table), with the kernel available and not turned off. Runs on every forward call: the cheap checks come
    first."""
    if not fits(q, k, v, cu_seqlens, window, softcap, dropout_p, sinks) or _launch is None or not enabled():
        return False
    return q.device.type == "cuda" and on_sm90(q.device)


def on_sm90(device: torch.device) -> bool:
    """Whether ``device`` (CUDA) is an sm90 GPU that hf_flash treats as one: a forced older arch brings its own
    table, and HF_FLASH_ARCH=sm90 on another chip brings sm90's tiles, not its ``wgmma``."""
    return device_facts(device)[0] == (9, 0) and own_capability(device) == (9, 0)


def fits(q, k, v, cu_seqlens, window, softcap, dropout_p, sinks) -> bool:
    """The calls the kernel computes and was measured faster on (module docstring), whatever the device:
    :func:`plain_dense` or :func:`plain_varlen`, a head dim of :data:`TILES` and ``L`` (varlen: the mean length)
    at least the tile's ``min_seqlen``."""
    tile = TILES.get((q.shape[-1], window[1] == 0))
    if tile is None:
        return False
    if cu_seqlens is not None:
        return plain_varlen(q, k, v, cu_seqlens, tile.min_seqlen, window, softcap, dropout_p, sinks)
    if q.shape[1] < tile.min_seqlen:
        return False
    return plain_dense(q, k, v, window, softcap, dropout_p, sinks)


def plain_varlen(q, k, v, cu_seqlens, min_seqlen: int, window, softcap, dropout_p, sinks) -> bool:
    """What both Hopper kernels ask of a varlen call (``hopper_bwd`` too; ``cu_seqlens``: (q's, k's)):
    self-attention over the same sequences (one int32 buffer for Q's and K/V's, as the Transformers integration
    builds them, or two that the input checks read as equal: ``checks.same_boundaries``, no device sync), a mean
    length of at least ``min_seqlen`` (a packed batch of short sequences keeps the portable kernels, measured
    faster on short lengths), :func:`plain_options`, Q/K/V ``[total, H, D]`` readable by TMA."""
    cu_q, cu_k = cu_seqlens
    if cu_q.dtype != torch.int32 or cu_q.shape[0] < 2 or not same_boundaries(cu_q, cu_k):
        return False
    if q.shape[0] < min_seqlen * (cu_q.shape[0] - 1) or k.shape[0] != q.shape[0]:
        return False
    if not plain_options(q, k, v, window, softcap, dropout_p, sinks):
        return False
    return all(tma_layout(t, True) is not None for t in (q, k, v))


def plain_options(q, k, v, window, softcap, dropout_p, sinks) -> bool:
    """What both Hopper kernels ask of a call's options, dense or varlen: causal or not without a window, no
    softcap, dropout or sinks, fp16/bf16 throughout."""
    if sinks is not None or softcap > 0 or dropout_p > 0 or window[0] != -1 or window[1] not in (-1, 0):
        return False
    return q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype


def plain_dense(q, k, v, window, softcap, dropout_p, sinks) -> bool:
    """What both Hopper kernels ask of a call (``hopper_bwd`` too): dense, :func:`plain_options`, ``Lq == Lk``, Q
    and K/V readable by TMA (K and V in one layout)."""
    if not plain_options(q, k, v, window, softcap, dropout_p, sinks):
        return False
    if q.shape[1] != k.shape[1]:
        return False
    kv_layout = tma_layout(k, False)
    return tma_layout(q, False) is not None and kv_layout is not None and kv_layout == tma_layout(v, False)


def head_group(seqlen: int, tile: Tile, sms: int) -> int:
    """(batch, head) pairs whose tiles the kernel numbers together: as many as make one wave of ``sms``
    programs (at least 1), so the programs running at once read the K/V of few heads, from L2."""
    return max(1, sms // tile.per_head(seqlen))


def flash_fwd_hopper(q, k, v, out, lse, softmax_scale: float, causal: bool, tile: Tile | None = None,
                     group: int | None = None, cu_seqlens=None, max_seqlen: int | None = None) -> None:
    """Launch the forward for a call that :func:`takes`. q/out ``[B, L, H, D]``, k/v ``[B, L, Hk, D]``
    (``H % Hk == 0``); out written in q's layout (``torch.empty_like(q)``), lse fp32 ``[B, H, L]`` written.
    Varlen: ``cu_seqlens`` (int32 ``[B + 1]``, Q's and K/V's), ``max_seqlen``, the tensors packed ``[total, H,
    D]`` and lse ``[H, total]``. ``tile`` and ``group`` (:func:`head_group`): the table's for (D, causal) and the
    one-wave group unless given (``benchmarks/hopper_fwd_speed.py`` times others)."""
    varlen = cu_seqlens is not None
    seqlen = max_seqlen if varlen else q.shape[1]
    tile = tile or TILES[q.shape[-1], causal]
    if tma_layout(out, varlen) is None:
        raise ValueError("out must be TMA-readable (torch.empty_like(q)) for the Hopper forward")
    if varlen:  # the packed tensors as batch 1, as the kernel reads them
        q, k, v, out = (t.unsqueeze(0) for t in (q, k, v, out))
    _launch(q=q, k=k, v=v, out=out, lse=lse, qk_scale=softmax_scale * LOG2E, causal=causal, tile=tile,
            head_group=group or head_group(seqlen, tile, sm_count(cuda_index(q.device))), cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen)
