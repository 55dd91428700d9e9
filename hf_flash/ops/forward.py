"""Forward kernel: one program per (block of BLOCK_M queries, batch, head).

The program keeps its query tile in registers and streams the key/value tiles of its (batch, kv head)
through on-chip memory, with the online softmax of ``reference.attention_tiled``: running row max
``m_i``, running row sum ``l_i``, accumulator ``acc`` rescaled by ``exp(m_old - m_new)``. Only the output
and the fp32 log-sum-exp reach device memory, so extra memory is O(L).

Scores are kept in base 2: ``softmax_scale * log2(e)`` is folded into one multiply so the kernel uses
``exp2`` (one instruction) instead of ``exp``.

Attention sinks (gpt-oss): one learnable logit per query head that joins every row's softmax as an extra
term ``exp(sink)`` with no value. The running max and sum simply start from it (``m = sink * log2(e)``,
``l = 1``) instead of (-inf, 0); nothing else in the loop changes, the saved LSE includes the sink, and a
row that sees no key ends with ``out = 0`` and ``lse = sink``. The sink is a raw logit, compared with the
scores after ``softmax_scale`` (and softcap), so it is not scaled.
"""

import triton
import triton.language as tl

from hf_flash.ops.common import (
    UNSPECIALIZED,
    desc_head,
    desc_row0,
    diag_in_loop,
    dropout_keep,
    head_ptr,
    kv_segments,
    load_rows,
    lse_strides,
    option_args,
    seq_bounds,
    strides_blh,
    tanh,
    tma_pair,
    visible,
)
from hf_flash.ops.config import cdiv


@triton.jit
def _fwd_inner(
    state, tile, kv, rule, opts, start, end, diag_start,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
    DIAG: tl.constexpr,
):
    """Fold key blocks ``[start, end)`` into ``state`` = (acc [BLOCK_M, BLOCK_D], l_i [BLOCK_M], m_i [BLOCK_M]),
    and return it. ``MASK`` is off for blocks that every row sees whole, so those skip all mask arithmetic.
    ``DIAG`` (``MASK`` off; rows and keys known to be in range, Lq == Lk: ``common.diag_in_loop``): the causal
    compare alone, on the blocks from ``diag_start`` on. A row's first block holds its key 0, so its running
    max is finite from then on (or from the start, with a sink) and a fully masked row of a later block needs
    no -inf guard.

    What the kernel passes in groups (the same for its three segments):
    tile: the query block (q [BLOCK_M, BLOCK_D], offs_m [BLOCK_M], offs_d [BLOCK_D]);
    kv: one kv head's K and V (k_head, v_head, k_desc, v_desc, kv_row0, kv_col, stride_kn, stride_vn): pointers
    to key 0, descriptors and their coordinates of key 0 (``USE_TMA``), row strides;
    rule: which keys a query sees, (seqlen_q, seqlen_k, window_left, window_right) of :func:`common.visible`;
    opts: (sm_scale, softcap, dropout_p, seed).
    Constexpr flags travel one by one: Triton turns a tuple of them into runtime values."""
    acc, l_i, m_i = state
    q, offs_m, offs_d = tile
    k_head, v_head, k_desc, v_desc, kv_row0, kv_col, stride_kn, stride_vn = kv
    seqlen_q, seqlen_k, window_left, window_right = rule
    sm_scale, softcap, dropout_p, seed = opts
    qk_scale = sm_scale * 1.4426950408889634
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_head, k_desc, kv_row0 + start_n, kv_col, offs_n, stride_kn, offs_d, seqlen_k,
                      HEAD_DIM, MASK, USE_TMA)  # [BN, BD]
        s = tl.dot(q, tl.trans(k))  # [BM, BN] fp32, unscaled
        if MASK or HAS_SOFTCAP:
            # -- scores in base-2 units, then the mask
            if HAS_SOFTCAP:
                s = (softcap * 1.4426950408889634) * tanh(s * (sm_scale / softcap))
            else:
                s = s * qk_scale
            if MASK:
                ok = visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, MASK_LEFT, MASK_RIGHT)
                s = tl.where(ok, s, float("-inf"))
            elif DIAG:
                if start_n >= diag_start:
                    s = tl.where(offs_n[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q), s, float("-inf"))
            # -- new running max. A row that has seen no visible key yet keeps m = -inf; subtracting
            #    -inf from -inf would give NaN, so such rows subtract 0 (their p is exp2(-inf) = 0 anyway).
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASK:
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_sub = m_new
            p = tl.math.exp2(s - m_sub[:, None])
        else:
            if DIAG:
                if start_n >= diag_start:  # -inf stays -inf through the scale below
                    s = tl.where(offs_n[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q), s, float("-inf"))
            # -- the hot path (every key visible): the scale is applied inside the exponent, so scaling
            #    and subtracting the max is one fused multiply-add per score instead of two operations
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(s * qk_scale - m_sub[:, None])
        # -- rescale what was accumulated under the old max
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            # the normaliser l_i uses the undropped p; only the product with V is dropped
            keep = dropout_keep(seed, offs_m, offs_n, seqlen_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = load_rows(v_head, v_desc, kv_row0 + start_n, kv_col, offs_n, stride_vn, offs_d, seqlen_k,
                      HEAD_DIM, MASK, USE_TMA)  # [BN, BD]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


# per-call integers (lengths, LSE strides, dropout seed) must not trigger a recompile: common.UNSPECIALIZED
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _fwd_kernel(
    Q, K, V, K_desc, V_desc, Out, Lse, Sinks, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q_arg, seqlen_k_arg, n_heads, n_groups, desc_rows_b, desc_rows_h,
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, TMA_HEAD_MAJOR: tl.constexpr,
    HAS_SINKS: tl.constexpr, DIAG_IN_LOOP: tl.constexpr,
):
    """Q ``[.., Lq, H, D]``, K/V ``[.., Lk, Hk, D]``, Out like Q, Lse fp32 indexed
    ``b * stride_lb + h * stride_lh + row`` (``[B, H, Lq]``, or ``[H, total_q]`` for varlen).
    Sinks: fp32 ``[H]`` with ``HAS_SINKS``, else unused.
    K_desc/V_desc: tensor descriptors of K/V with ``USE_TMA`` (``common.tma_pair``), else unused;
    ``TMA_HEAD_MAJOR`` with ``desc_rows_b``/``desc_rows_h``: their layout (``common.TmaLayout``).
    ``DIAG_IN_LOOP``: one loop with the diagonal blocks at its end (``common.diag_in_loop``), else masked
    head, unmasked middle, masked tail."""
    pid_m = tl.program_id(0)
    if MASK_RIGHT:
        # with a causal/right bound, later query blocks see more keys: launch them first so the
        # grid's tail is made of short programs (better balance across the SMs)
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    off_hk = off_h // n_groups  # GQA: the kv head of this query head's group, read in place

    q_start, k_start, seqlen_q, seqlen_k = seq_bounds(
        cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN
    )
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off_b64 = off_b.to(tl.int64)
    q_head = head_ptr(Q, off_b64, stride_qb, off_h, stride_qh, q_start, stride_qm)
    k_head = head_ptr(K, off_b64, stride_kb, off_hk, stride_kh, k_start, stride_kn)
    v_head = head_ptr(V, off_b64, stride_vb, off_hk, stride_vh, k_start, stride_vn)
    # the descriptors' coordinates of key 0 of this kv head
    kv_row0, kv_col = desc_head(desc_row0(k_start, off_b, seqlen_k_arg, desc_rows_b, IS_VARLEN, TMA_HEAD_MAJOR),
                                off_hk, desc_rows_h, HEAD_DIM, TMA_HEAD_MAJOR)
    o_head = head_ptr(Out, off_b64, stride_ob, off_h, stride_oh, q_start, stride_om)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]
    q_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = load_rows(q_head, Q, 0, 0, offs_m, stride_qm, offs_d, seqlen_q, HEAD_DIM, True, False)  # [BM, BD]

    if HAS_SINKS:
        # -- the sink is the row's first "key": exp2(m - m) = 1 in the sum, no value in acc. A sink of
        #    -inf (no sink) must leave (-inf, 0), else an empty row would get lse = -inf instead of +inf
        sink2 = tl.load(Sinks + off_h) * 1.4426950408889634
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + sink2
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.where(sink2 == float("-inf"), 0.0, 1.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DROPOUT:
        seed = seed + pid_bh
    lo, mid_lo, mid_hi, hi = kv_segments(
        m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
    )
    state, tile = (acc, l_i, m_i), (q, offs_m, offs_d)
    kv = (k_head, v_head, K_desc, V_desc, kv_row0, kv_col, stride_kn, stride_vn)
    rule, opts = (seqlen_q, seqlen_k, window_left, window_right), (sm_scale, softcap, dropout_p, seed)
    if DIAG_IN_LOOP:
        bounds = (lo, hi)  # one loop; the diagonal blocks at its end compare (DIAG)
    else:
        # masked head (left window edge), unmasked middle, masked tail (diagonal / window / sequence end)
        bounds = (lo, mid_lo, mid_hi, hi)
    # unrolled at compile time, each segment's loop compiled with its own MASK
    for SEG in tl.static_range(len(bounds) - 1):
        state = _fwd_inner(
            state=state, tile=tile, kv=kv, rule=rule, opts=opts, start=bounds[SEG], end=bounds[SEG + 1],
            diag_start=mid_hi, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, MASK=SEG != 1 and not DIAG_IN_LOOP,
            MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT, HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT,
            USE_TMA=USE_TMA, DIAG=DIAG_IN_LOOP,
        )
    acc, l_i, m_i = state

    # -- final division. Rows that saw no key output 0 and store lse = +inf, which makes the
    #    backward's recomputed p = exp(s - lse) exactly 0 for them. With a sink, l_i >= 1 (the largest
    #    term is exp2(0)): such rows end with acc = 0, lse = sink, and their p is 0 through the mask.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(o_head + rows * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_ok)
    lse_ptr = Lse + off_b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + offs_m
    tl.store(lse_ptr, lse, mask=offs_m < seqlen_q)


def flash_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window,
              softcap, dropout_p, seed, config, sinks=None):
    """Launch the forward kernel. Shapes are checked by the caller (``function.py``).

    Args:
        q: ``[B, Lq, H, D]`` or, varlen, ``[total_q, H, D]``; k, v: ``[B, Lk, Hk, D]`` / ``[total_k, Hk, D]``;
            last dimension contiguous.
        out: like q, written. lse: fp32 ``[B, H, Lq]`` / ``[H, total_q]``, written.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` for varlen, else None.
        window: ``(left, right)`` with -1 for unbounded; causal is ``right = 0``.
        config: :class:`hf_flash.ops.config.KernelConfig`.
        sinks: fp32 ``[H]`` contiguous attention-sink logits, or None.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        n_heads, head_dim = q.shape[1], q.shape[2]
        n_heads_k = k.shape[1]
    else:
        batch, _, n_heads, head_dim = q.shape
        n_heads_k = k.shape[2]
        cu_seqlens_q = cu_seqlens_k = q  # unused placeholders (never read when IS_VARLEN is off)
    block_m, block_n = config.block_m, config.block_n
    kv = tma_pair(k, v, varlen, block_n, config.tma)
    grid = (cdiv(max_seqlen_q, block_m), batch * n_heads)
    _fwd_kernel[grid](
        Q=q, K=k, V=v, Out=out, Lse=lse, Sinks=lse if sinks is None else sinks,  # lse: a placeholder, never read
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **kv.kernel_args("K_desc", "V_desc"),
        **strides_blh(q, varlen, "q", "m"), **strides_blh(k, varlen, "k", "n"), **strides_blh(v, varlen, "v", "n"),
        **strides_blh(out, varlen, "o", "m"), **lse_strides(lse, varlen),
        seqlen_q_arg=max_seqlen_q, seqlen_k_arg=max_seqlen_k, n_heads=n_heads, n_groups=n_heads // n_heads_k,
        **option_args(softmax_scale, window, softcap, dropout_p, seed),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=config.block_d, IS_VARLEN=varlen,
        HAS_SINKS=sinks is not None, DIAG_IN_LOOP=diag_in_loop(varlen, window, max_seqlen_q, max_seqlen_k, config),
        **config.launch_options(),
    )

