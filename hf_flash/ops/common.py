"""Pieces shared by the forward and backward kernels: which keys a block of queries may see (and the
converse), the score mask, the softcap and the dropout mask.

Visibility, with ``shift = seqlen_k - seqlen_q`` (flash-attn's bottom-right alignment) and a window of
``(left, right)`` keys around the diagonal, is: query ``i`` sees key ``j`` when
``i + shift - left <= j <= i + shift + right``. Causal is ``right = 0``; an unbounded side has no flag
set (``MASK_LEFT`` / ``MASK_RIGHT``), so the non-causal, windowless kernel carries no mask arithmetic.

Each kernel walks over blocks in three segments: a masked head, an unmasked middle and a masked tail.
Only blocks that straddle a mask edge or the end of a sequence pay for building the mask.
Integer divisions only ever see non-negative operands: GPU division truncates toward zero while the
interpreter floors, and the two differ below zero.
"""

import functools

import torch
import triton
import triton.language as tl

# log2(e) and ln(2) are written as literals inside the kernels: a module-level float is not allowed
# in compiled kernels, and a tl.constexpr global mis-evaluates under the interpreter (Triton 3.9).


@triton.jit
def kv_segments(
    m0, seqlen_q, seqlen_k, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
):
    """Key blocks for the query block starting at ``m0``: ``[lo, mid_lo)`` masked, ``[mid_lo, mid_hi)``
    fully visible, ``[mid_hi, hi)`` masked. All bounds are multiples of BLOCK_N except ``hi``."""
    shift = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_k
    mid_lo = 0
    # keys >= the last multiple of BLOCK_N below seqlen_k need the sequence-end mask
    mid_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if MASK_RIGHT:
        # the last row of the block sees up to m0 + BLOCK_M - 1 + shift + right
        hi = tl.minimum(hi, m0 + BLOCK_M + shift + window_right)
        # every row sees the whole key block only if its last key <= m0 + shift + right
        mid_hi = tl.minimum(mid_hi, (tl.maximum(m0 + shift + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    if MASK_LEFT:
        lo = tl.maximum(m0 + shift - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        # every row sees the whole block only if its first key >= (m0 + BLOCK_M - 1) + shift - left
        mid_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + shift - window_left, 0), BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def q_segments(
    n0, seqlen_q, seqlen_k, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
):
    """Query blocks that see some key of the key block starting at ``n0``, split like
    :func:`kv_segments`: ``[lo, mid_lo)`` masked, ``[mid_lo, mid_hi)`` fully visible, ``[mid_hi, hi)`` masked."""
    shift = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_q
    mid_lo = 0
    mid_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if n0 + BLOCK_N > seqlen_k:
        # the key block runs past the sequence end: every query block needs the mask
        mid_hi = 0
    if MASK_RIGHT:
        # key j is seen by rows i >= j - shift - right
        lo = tl.maximum(n0 - shift - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift - window_right, 0), BLOCK_M) * BLOCK_M
    if MASK_LEFT:
        # key j is seen by rows i <= j - shift + left
        hi = tl.minimum(hi, n0 + BLOCK_N - shift + window_left)
        mid_hi = tl.minimum(mid_hi, (tl.maximum(n0 - shift + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def visible(
    offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, KEYS_FIRST: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` bool: query ``offs_m[i]`` may see key ``offs_n[j]`` (and both exist); with
    ``KEYS_FIRST`` the same mask built as ``[BLOCK_N, BLOCK_M]``. The dK/dV kernel works on transposed
    tiles: building its mask in that orientation costs nothing, while ``tl.trans`` of a finished mask is
    a layout conversion through shared memory on every masked block."""
    if KEYS_FIRST:
        rows = offs_m[None, :]
        cols = offs_n[:, None]
    else:
        rows = offs_m[:, None]
        cols = offs_n[None, :]
    shift = seqlen_k - seqlen_q
    ok = (cols < seqlen_k) & (rows < seqlen_q)
    if MASK_RIGHT:
        ok = ok & (cols <= rows + shift + window_right)
    if MASK_LEFT:
        ok = ok & (cols >= rows + shift - window_left)
    return ok


@triton.jit
def tanh(x):
    # tanh through exp keeps the kernels portable (the interpreter has no libdevice); for large |x|
    # exp overflows to inf or underflows to 0 and the formula still lands on +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def dropout_keep(seed, offs_m, offs_n, seqlen_k, dropout_p, KEYS_FIRST: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` bool keep-mask (``[BLOCK_N, BLOCK_M]`` with ``KEYS_FIRST``, as in
    :func:`visible`), a pure function of (seed, row, column), so the backward pass regenerates exactly the
    forward's mask instead of storing it. The seed already differs per (batch, head). The counter wraps
    past 2**32 elements per head; streams stay valid, only repeat."""
    if KEYS_FIRST:
        rng_offs = offs_m[None, :] * seqlen_k + offs_n[:, None]
    else:
        rng_offs = offs_m[:, None] * seqlen_k + offs_n[None, :]
    return tl.rand(seed, rng_offs) >= dropout_p


@triton.jit
def seq_bounds(cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN: tl.constexpr):
    """``(q_start, k_start, seqlen_q, seqlen_k)`` of batch element ``off_b``. Starts are rows of the packed
    varlen tensors; without varlen they are 0 and the batch stride places the sequence instead."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + off_b)
        k_start = tl.load(cu_seqlens_k + off_b)
        seqlen_q = tl.load(cu_seqlens_q + off_b + 1) - q_start
        seqlen_k = tl.load(cu_seqlens_k + off_b + 1) - k_start
    else:
        q_start = tl.full([], 0, tl.int32)
        k_start = tl.full([], 0, tl.int32)
        seqlen_q = seqlen_q_arg
        seqlen_k = seqlen_k_arg
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def load_rows(
    head, desc, start, offs, stride_row, offs_d, seqlen,
    HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """``[len(offs), BLOCK_D]`` tile of rows ``offs = start + arange`` of one (batch, head) sequence starting
    at ``head``. Padding columns past HEAD_DIM read as 0, and so do rows past ``seqlen`` when
    ``CHECK_ROWS`` (blocks known to lie inside the sequence skip that compare).

    With ``USE_TMA`` the tile comes through ``desc``, the sequence's descriptor from
    :func:`rows_descriptor`: Hopper's TMA copies it to shared memory asynchronously with no per-element
    address arithmetic, and the descriptor's bounds make the hardware zero-fill the rows past the
    sequence, so no row check is needed (nor a pass of the tile through registers to apply one)."""
    if USE_TMA:
        return desc.load([start, 0])
    else:
        ok = offs_d[None, :] < HEAD_DIM
        if CHECK_ROWS:
            ok = ok & (offs[:, None] < seqlen)
        return tl.load(head + offs.to(tl.int64)[:, None] * stride_row + offs_d[None, :], mask=ok, other=0.0)


@triton.jit
def rows_descriptor(
    head, seqlen, stride_row, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """With ``USE_TMA``, a tensor descriptor of one (batch, head) sequence: ``[seqlen, HEAD_DIM]`` from
    ``head`` (:func:`head_ptr`), row stride ``stride_row``, read in ``[BLOCK_ROWS, BLOCK_D]`` tiles. It is
    built on the device, per program (host-side descriptors are encoded by the launcher at every call,
    about 30 us of host time each). Without TMA, ``head`` itself (unused by :func:`load_rows`)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(head, shape=[seqlen, HEAD_DIM], strides=[stride_row, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        return head


@triton.jit
def program_ids(LONGEST_LAST: tl.constexpr):
    """``(block, batch * head)`` indices of this program, from the grid ``(blocks, batch * heads)``. With
    ``LONGEST_LAST`` the block index is reversed, so that the programs with the most work are launched
    first and the grid's tail is made of short ones.

    The block index stays on the grid's fast axis, so the programs running at one time mostly belong to
    a few heads and share their K/V (or Q/dO) in L2. Issuing block by block across all heads instead
    (longest first over the whole grid) was measured on an H200 at L = 4k: +2% on the causal D128
    backward, but -8 to -18% on the non-causal kernels, from the lost L2 reuse."""
    pid_blk = tl.program_id(0)
    if LONGEST_LAST:
        pid_blk = tl.num_programs(0) - 1 - pid_blk
    return pid_blk, tl.program_id(1)


@triton.jit
def head_ptr(base, off_b64, stride_b, off_h, stride_h, start, stride_row):
    """Pointer to row 0 of one (batch, head) sequence; all terms in 64 bits since batch x sequence x
    heads x head_dim can pass 2**31 elements."""
    return base + off_b64 * stride_b + off_h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_row


def strides_blh(t, varlen: bool):
    """(batch, row, head) strides of ``[B, L, H, D]``, or ``(0, row, head)`` of varlen ``[total, H, D]``
    (a zero batch stride: varlen sequences are placed by their cu_seqlens start instead)."""
    return (0, *t.stride()[:2]) if varlen else tuple(t.stride()[:3])


def tma_device_ok(t) -> bool:
    """A GPU with TMA (Hopper or newer) and a Triton with device-side tensor descriptors (>= 3.3)."""
    if t.device.type != "cuda":
        return False
    return _tma_on_gpu(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _tma_on_gpu(index: int) -> bool:
    # asked on every launch: the device query and the feature checks are done once per GPU
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.runtime import _allocation
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor") and hasattr(_allocation, "_allocator")


def tma_layout_ok(t) -> bool:
    """Whether each (batch, head) sequence of ``t`` (``[B, L, H, D]`` or varlen ``[total, H, D]``) can be
    described to TMA: a power-of-two head dim (tiles are exactly one head wide), unit stride along D, and
    the 16-byte alignment TMA needs for every sequence's base address (so for the tensor's address and
    its batch, head and row strides) and for the row stride."""
    head_dim = t.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1) or t.stride(-1) != 1:
        return False
    # [B, L, H] or varlen [total, H] strides: a sequence starts at any combination of them
    return t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])


def tma_usable(*tensors) -> bool:
    """Whether the streamed tiles of ``tensors`` can come through TMA descriptors on their device."""
    return tma_device_ok(tensors[0]) and all(tma_layout_ok(t) for t in tensors)


def _scratch(size: int, alignment: int, stream):
    # the global memory Triton asks for at launch: 128 bytes per descriptor per program
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def ensure_tma_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch memory, unless the caller has set one.
    Triton keeps it in a context variable: each thread that launches (the autograd engine runs the
    backward in its own) needs it set, so launchers call this before every TMA launch."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
