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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hf_flash.ops.config import SHORT_SEQLEN, cuda_index

# log2(e) and ln(2) are written as literals inside the kernels: a module-level float is not allowed
# in compiled kernels, and a tl.constexpr global mis-evaluates under the interpreter (Triton 3.9).

# Integer kernel arguments that change from call to call in steady training: the lengths (a dense batch's
# padded length, a varlen batch's max_seqlen), the TMA descriptors' rows per batch and head (a KV cache's
# length) and the dropout seed. Triton specializes an integer argument on ``== 1`` and ``% 16 == 0`` and compiles the
# kernel once per combination, so each of these would compile a kernel again whenever a new batch's length
# crossed those classes (H100: 2-4 s a compile, measured mid-training). Passed to ``do_not_specialize`` of
# the four kernels (a name a kernel lacks is ignored). Q/K/V/O strides stay specialized: their ``% 16`` lets
# the compiler prove 16-byte aligned rows, and they do not change with lengths (row and head strides are
# ``H D`` and ``D``; a dense batch stride ``L H D`` keeps its class whenever ``H D % 16 == 0``). So do the
# LSE/delta strides: their rows are padded to a multiple of 16 (function._new_lse), so the strides stay in the
# ``% 16`` class for every length, and the D128 dK/dV kernel needs that fact to run its loop without spilling.
UNSPECIALIZED = ("seqlen_q_arg", "seqlen_k_arg", "desc_rows_b", "desc_rows_h", "seed")


@triton.jit
def _ordered_segments(lo, mid_lo, mid_hi, hi, BLOCK: tl.constexpr):
    """Clamp raw segment bounds into ``lo <= mid_lo <= mid_hi`` with ``hi >= lo``. The middle bounds are
    clamped to ``hi`` rounded up to a block, not to ``hi``: the loops visit the same blocks, but every
    segment start stays a multiple of the block, which the compiler can prove (varlen's ``hi`` is a loaded
    length; without the proof the dK/dV kernel's unmasked loop spilled on sm90, Triton 3.6)."""
    hi = tl.maximum(hi, lo)
    hi_up = tl.cdiv(hi, BLOCK) * BLOCK
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi_up)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi_up)
    return lo, mid_lo, mid_hi, hi


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
    return _ordered_segments(lo, mid_lo, mid_hi, hi, BLOCK_N)


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
    return _ordered_segments(lo, mid_lo, mid_hi, hi, BLOCK_M)


@triton.jit
def visible(
    offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` bool: query ``offs_m[i]`` may see key ``offs_n[j]`` (and both exist)."""
    shift = seqlen_k - seqlen_q
    ok = (offs_n[None, :] < seqlen_k) & (offs_m[:, None] < seqlen_q)
    if MASK_RIGHT:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift + window_right)
    if MASK_LEFT:
        ok = ok & (offs_n[None, :] >= offs_m[:, None] + shift - window_left)
    return ok


@triton.jit
def tanh(x):
    # tanh through exp keeps the kernels portable (the interpreter has no libdevice); for large |x|
    # exp overflows to inf or underflows to 0 and the formula still lands on +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def dropout_keep(seed, offs_m, offs_n, seqlen_k, dropout_p):
    """``[BLOCK_M, BLOCK_N]`` bool keep-mask, a pure function of (seed, row, column), so the backward
    pass regenerates exactly the forward's mask instead of storing it. The seed already differs per
    (batch, head). The counter wraps past 2**32 elements per head; streams stay valid, only repeat."""
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
def flat_row0(start, off_b, seqlen_arg, IS_VARLEN: tl.constexpr):
    """Row of this sequence's token 0 in the 2D view of :func:`tma_descriptor`: its packed start for varlen,
    else ``off_b`` whole sequences of ``seqlen_arg`` rows in."""
    if IS_VARLEN:
        return start
    else:
        return off_b * seqlen_arg


@triton.jit
def desc_row0(start, off_b, seqlen_arg, rows_b, IS_VARLEN: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Descriptor row of this sequence's token 0 in head 0 (:func:`flat_row0` for heads side by side);
    head-major (dense only): ``off_b`` batches of ``rows_b`` rows in."""
    row0 = flat_row0(start, off_b, seqlen_arg, IS_VARLEN)
    if HEAD_MAJOR:
        row0 = off_b * rows_b
    return row0


@triton.jit
def desc_head(row, off_h, rows_h, HEAD_DIM: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """``(row, column)`` of head ``off_h`` given the row in head 0: heads side by side share rows and
    sit ``HEAD_DIM`` columns apart; head-major heads have their own rows, ``rows_h`` apart, at column 0."""
    if HEAD_MAJOR:
        row = row + off_h * rows_h
        col = 0
    else:
        col = off_h * HEAD_DIM
    return row, col


@triton.jit
def load_rows(
    head, desc, desc_row, desc_col, offs, stride_row, offs_d, seqlen,
    HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """``[len(offs), BLOCK_D]`` tile of rows ``offs`` of one (batch, head) sequence starting at ``head``.
    Padding columns past HEAD_DIM read as 0, and so do rows past ``seqlen`` when ``CHECK_ROWS`` (blocks
    known to lie inside the sequence skip that compare).

    With ``USE_TMA`` the tile comes through the tensor descriptor ``desc`` instead (Hopper's TMA copies
    it to shared memory asynchronously, with no per-element address arithmetic), at row ``desc_row`` and
    column ``desc_col`` of its 2D ``[rows, heads * HEAD_DIM]`` view (see :func:`tma_descriptor`). The
    hardware zero-fills only past the whole tensor, so rows that belong to the next sequence are zeroed
    here when ``CHECK_ROWS``."""
    if USE_TMA:
        tile = desc.load([desc_row, desc_col])
        if CHECK_ROWS:
            tile = tl.where(offs[:, None] < seqlen, tile, 0.0)
        return tile
    else:
        ok = offs_d[None, :] < HEAD_DIM
        if CHECK_ROWS:
            ok = ok & (offs[:, None] < seqlen)
        return tl.load(head + offs.to(tl.int64)[:, None] * stride_row + offs_d[None, :], mask=ok, other=0.0)


@triton.jit
def head_ptr(base, off_b64, stride_b, off_h, stride_h, start, stride_row):
    """Pointer to row 0 of one (batch, head) sequence; all terms in 64 bits since batch x sequence x
    heads x head_dim can pass 2**31 elements."""
    return base + off_b64 * stride_b + off_h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_row


def diag_in_loop(varlen, window, seqlen_q, seqlen_k, config):
    """Whether the diagonal blocks join the main loop: pure causal (no window) over a dense batch whose
    lengths are equal and multiples of both blocks, so that no block needs a row or sequence-end check.
    Head dims up to 64 keep the separate loops past ``SHORT_SEQLEN``: there the diagonal is a small share
    and the merged loop measured 2-4% slower (H200, D64 causal 4k and 16k), while D128 gains everywhere."""
    return (not varlen and window[0] < 0 and window[1] == 0 and seqlen_q == seqlen_k
            and seqlen_q % config.block_m == 0 and seqlen_q % config.block_n == 0
            and (config.block_d >= 128 or seqlen_q <= SHORT_SEQLEN))


# The launchers pass every kernel argument by keyword (a swapped positional argument would compile and
# compute something else); these build the groups of keywords that travel together.


def strides_blh(t, varlen: bool, name: str, row: str) -> dict:
    """``{stride_<name>b, stride_<name><row>, stride_<name>h}``: the (batch, row, head) strides of
    ``[B, L, H, D]``, or ``(0, row, head)`` of varlen ``[total, H, D]`` (a zero batch stride: varlen sequences
    are placed by their cu_seqlens start instead). E.g. ``strides_blh(q, False, "q", "m")``."""
    strides = t.stride()
    key_b, key_row, key_h = _stride_keys(name, row)
    if varlen:
        return {key_b: 0, key_row: strides[0], key_h: strides[1]}
    return {key_b: strides[0], key_row: strides[1], key_h: strides[2]}


@functools.cache
def _stride_keys(name: str, row: str) -> tuple[str, str, str]:
    # built once: the launchers run on every call, and short sequences feel each microsecond of host time
    return f"stride_{name}b", f"stride_{name}{row}", f"stride_{name}h"


def lse_strides(lse, varlen: bool) -> dict:
    """``{stride_lb, stride_lh}`` of the LSE (and delta, laid out alike): ``[B, H, Lq]``, or varlen
    ``[H, total_q]`` with batch stride 0 (rows are placed by their cu_seqlens start)."""
    b, h = (0, lse.stride(0)) if varlen else lse.stride()[:2]
    return {"stride_lb": b, "stride_lh": h}


def option_args(softmax_scale, window, softcap, dropout_p, seed) -> dict:
    """The scalar options every attention kernel takes, with the constexpr flags that switch their code on:
    a bounded side of the window (-1: unbounded), softcap > 0, dropout > 0."""
    return {
        "sm_scale": softmax_scale, "softcap": softcap, "window_left": window[0], "window_right": window[1],
        "dropout_p": dropout_p, "seed": seed, "MASK_LEFT": window[0] >= 0, "MASK_RIGHT": window[1] >= 0,
        "HAS_SOFTCAP": softcap > 0, "HAS_DROPOUT": dropout_p > 0,
    }  # fmt: skip


def tma_view(t, varlen: bool, layout: "TmaLayout | None" = None) -> tuple[list, list]:
    """(shape, strides) of the 2D matrix a descriptor reads ``t`` (``[B, L, H, D]``, or varlen ``[total, H, D]``)
    as. Heads side by side (the default ``layout``): ``[rows, H * D]``, row ``r`` being token ``r`` of the
    flattened batch. Head-major: the storage as rows of ``D`` elements, each (batch, head) sequence on its own
    rows (:class:`TmaLayout`). Callers check :func:`tma_layout` first."""
    head_dim = t.shape[-1]
    if layout is not None and layout.head_major:
        # rows up to the last token of the last (batch, head); the hardware zero-fills past them
        rows = (t.shape[0] - 1) * layout.rows_b + (t.shape[2] - 1) * layout.rows_h + t.shape[1]
        return [rows, head_dim], [head_dim, 1]
    rows = t.shape[0] if varlen else t.shape[0] * t.shape[1]
    row_stride = t.stride(0) if varlen else t.stride(1)
    return [rows, t.shape[-2] * head_dim], [row_stride, 1]


def tma_descriptor(t, varlen: bool, block_rows: int, layout: "TmaLayout | None" = None):
    """A tensor descriptor over ``t`` (as :func:`tma_view` reads it) for tiles of ``[block_rows, D]``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    shape, strides = tma_view(t, varlen, layout)
    return TensorDescriptor(t, shape, strides, [block_rows, t.shape[-1]])


def tma_device_ok(t) -> bool:
    """A GPU with TMA (Hopper or newer) and a Triton with host-side tensor descriptors (>= 3.4)."""
    if t.device.type != "cuda":
        return False
    return _tma_on_gpu(cuda_index(t.device))


@functools.cache
def _tma_on_gpu(index: int) -> bool:
    # asked on every launch: the device query and the import are done once per GPU
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def _one_head_tile(head_dim: int) -> bool:
    # a descriptor tile is exactly one head wide: a power of two of at least 16 elements (a wider,
    # padded tile would read the next head's columns or rows)
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def tma_layout_ok(t, varlen: bool) -> bool:
    """Whether ``t`` (``[B, L, H, D]`` or varlen ``[total, H, D]``) can be read as the 2D view of
    :func:`tma_descriptor`: a power-of-two head dim (the tile is exactly one head wide; a wider one would
    read the next head), heads side by side in a row, batches evenly spaced, and the 16-byte alignment
    TMA needs for the base address and the row stride."""
    head_dim = t.shape[-1]
    row_stride = t.stride(0) if varlen else t.stride(1)
    if not _one_head_tile(head_dim) or t.stride(-2) != head_dim or t.stride(-1) != 1:
        return False
    if not varlen and t.shape[0] > 1 and t.stride(0) != t.shape[1] * row_stride:
        return False
    return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0


@dataclass(frozen=True)
class TmaLayout:
    """How the kernels address a tensor through its descriptor. ``head_major``: each (batch, head)
    sequence on its own rows of ``D`` elements, ``rows_b`` rows per batch and ``rows_h`` per head apart
    (``[B, H, L, D]`` storage, as the KV cache keeps K/V); else heads side by side in a row."""

    head_major: bool = False
    rows_b: int = 0
    rows_h: int = 0


def tma_layout(t, varlen: bool) -> TmaLayout | None:
    """The :class:`TmaLayout` that reads ``t`` (``[B, L, H, D]`` or varlen ``[total, H, D]``), or None when
    neither does: heads side by side (:func:`tma_layout_ok`), or, dense only, head-major with tokens ``D``
    elements apart, head and batch strides whole rows, a power-of-two head dim and a 16-byte aligned base."""
    if tma_layout_ok(t, varlen):
        return TmaLayout()
    head_dim = t.shape[-1]
    if varlen or not _one_head_tile(head_dim) or t.stride(-1) != 1 or t.stride(1) != head_dim:
        return None
    stride_b, stride_h = t.stride(0), t.stride(2)
    if stride_b % head_dim or stride_h % head_dim or stride_b < 0 or stride_h < 0 or t.data_ptr() % 16:
        return None
    return TmaLayout(True, stride_b // head_dim, stride_h // head_dim)


def stats_pair(lse, delta, varlen: bool, block_rows: int, beside_q_do: bool) -> dict:
    """The dK/dV kernel's keywords for the LSE and delta rows (``[B, H, L]``, same strides): with ``beside_q_do``
    (the kernel reads Q and dO through descriptors, ``TmaPair.use``, which implies a TMA device), descriptors over
    their rows as a 2D ``[B * H, L]`` matrix for ``[1, block_rows]`` tiles (columns past ``L`` read as zeros, the
    rows' padding is never read) and ``STATS_TMA``; else the tensors again, for pointer loads. Only beside Q/dO's
    descriptors: with pointer loads of Q/dO (head dims that are not a power of two) Triton 3.6's ptxas crashes
    (SIGSEGV) on the non-causal kernel at D40/80/96 (LOG, 2026-12-06). Dense batches only: a tile's first column
    must sit on 16 bytes, and a varlen sequence starts anywhere in its ``[H, total]`` row."""
    rows, width = lse.shape[0] * lse.shape[1], lse.shape[-1]
    row_stride = lse.stride(-2)
    use = (beside_q_do and not varlen and lse.stride(-1) == 1
           and lse.stride(0) == lse.shape[1] * row_stride and row_stride % 4 == 0 and lse.data_ptr() % 16 == 0
           and delta.data_ptr() % 16 == 0 and delta.stride() == lse.stride())  # fmt: skip
    if not use:
        return {"Lse_desc": lse, "Delta_desc": delta, "STATS_TMA": False}
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t):
        return TensorDescriptor(t, [rows, width], [row_stride, 1], [1, block_rows])

    return {"Lse_desc": desc(lse), "Delta_desc": desc(delta), "STATS_TMA": True}


@dataclass(frozen=True)
class TmaPair:
    """The two streamed operands of a kernel (K and V, or Q and dO) as the launcher passes them:
    descriptors (or the tensors themselves when ``use`` is off) and their shared :class:`TmaLayout`."""

    a: object
    b: object
    use: bool
    layout: TmaLayout

    @property
    def head_major(self) -> bool:
        return self.use and self.layout.head_major

    def kernel_args(self, name_a: str, name_b: str) -> dict:
        """The kernels' keywords for the pair: the two descriptors (or tensors) as ``name_a`` / ``name_b``,
        their rows per batch and head (``desc_rows_b`` / ``desc_rows_h``), ``USE_TMA`` and ``TMA_HEAD_MAJOR``."""
        return {name_a: self.a, name_b: self.b, "desc_rows_b": self.layout.rows_b, "desc_rows_h": self.layout.rows_h,
                "USE_TMA": self.use, "TMA_HEAD_MAJOR": self.head_major}  # fmt: skip


def tma_pair(a, b, varlen: bool, block_rows: int, enabled: bool) -> TmaPair:
    """Descriptors for ``a`` and ``b`` when ``enabled`` (the tile table asks for TMA), the device has it and
    both tensors are readable in one layout; else the tensors, for pointer loads."""
    layout = tma_layout(a, varlen) if enabled and tma_device_ok(a) else None
    if layout is None or tma_layout(b, varlen) != layout:
        return TmaPair(a, b, False, TmaLayout())
    return TmaPair(tma_descriptor(a, varlen, block_rows, layout), tma_descriptor(b, varlen, block_rows, layout),
                   True, layout)
