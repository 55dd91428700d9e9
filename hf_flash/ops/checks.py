"""Input validation for the public functions: every error names the argument and what is accepted,
so bad input never reaches Triton (where it would be a compile error or a silently wrong result)."""

from __future__ import annotations

import weakref

import torch

from hf_flash.ops.config import MAX_HEAD_DIM, SUPPORTED_DTYPES, kernels_unavailable_reason


def is_compiling() -> bool:
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


def check_tensors(names, tensors, ndim: int, layout: str) -> None:
    """Type, dtype, device and rank of q, k, v (and their packed forms' slices)."""
    ref_name, ref = names[0], tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; hf_flash kernels accept torch.float16 and torch.bfloat16 "
                "(cast the inputs, or use PyTorch SDPA for float32)"
            )
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all must match")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all must be on one device")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")
    reason = kernels_unavailable_reason(ref.device, ref.dtype)
    if reason is not None:
        raise ValueError(f"{ref_name}: the hf_flash kernels cannot run here: {reason}")


def check_shapes(q, k, v, varlen: bool) -> None:
    """q ``[B, Lq, H, D]`` / k, v ``[B, Lk, Hk, D]`` (or without B for varlen)."""
    lead = 1 if varlen else 2  # dims before (heads, head_dim) that k and v share
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    n_heads, head_dim = q.shape[lead], q.shape[lead + 1]
    n_heads_k = k.shape[lead]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}, got {k.shape[-1]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q) must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if n_heads_k == 0 or n_heads % n_heads_k != 0:
        raise ValueError(
            f"the number of query heads ({n_heads}) must be a multiple of the number of key/value heads "
            f"({n_heads_k}) (MQA/GQA)"
        )


def check_options(dropout_p, softmax_scale, window_size, softcap, alibi_slopes) -> tuple[int, int]:
    """Scalar options; returns the window as two ints."""
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported by hf_flash; pass alibi_slopes=None")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not float(softmax_scale) > 0:
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale}")
    if float(softcap) < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints (left, right), -1 for unbounded; got {window_size!r}")
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    return left, right


def check_sinks(sinks, n_heads: int, device) -> None:
    """sinks: None or a floating-point tensor ``[H]`` (one logit per query head) on q's device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        kind = f"dtype {sinks.dtype}" if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise TypeError(f"sinks must be a floating-point torch.Tensor of shape [nheads] = [{n_heads}], got {kind}")
    if tuple(sinks.shape) != (n_heads,):
        raise ValueError(
            f"sinks must have shape [nheads] = [{n_heads}] (one logit per query head), got {tuple(sinks.shape)}"
        )
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}; all must be on one device")


# Reading cu_seqlens is a device sync. Every layer of a model gets the same cu_seqlens tensors, so a
# tensor that passed is not read again while it is alive and unmodified: entries hold a weak reference
# (a freed tensor never matches, whatever reuses its memory) and the tensor's version counter, which
# every in-place write bumps. Q and K usually share one tensor; a few entries cover models that
# alternate layouts. Tensors made under torch.inference_mode have no version counter, so an in-place
# write to one would go unseen: they are read on every call, unless hf_flash built them itself and
# vouched for them (:func:`vouch_for_cu_seqlens`), as the Transformers integration does.
_CU_SEQLENS_CHECKED: list = []
_CU_SEQLENS_CHECKED_SIZE = 8
UNTRACKED = object()  # the "version" of a tensor made under torch.inference_mode, which has no counter


def version_of(t: torch.Tensor) -> object:
    """``t``'s version counter (bumped by every in-place write), or :data:`UNTRACKED` for an inference
    tensor, whose in-place writes cannot be seen. Shared by the read-once caches here and in the
    Transformers integration's routing."""
    return UNTRACKED if t.is_inference() else t._version


def _cache_key(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> tuple:
    return (version_of(cu_seqlens), total, max_seqlen)


def _remember(cu_seqlens: torch.Tensor, key: tuple, values: tuple | None = None) -> None:
    """Record a checked (or vouched-for) tensor; ``values``: what the check read, when it read them."""
    _CU_SEQLENS_CHECKED.insert(0, (weakref.ref(cu_seqlens), key, values))
    del _CU_SEQLENS_CHECKED[_CU_SEQLENS_CHECKED_SIZE:]


def same_boundaries(cu_a: torch.Tensor, cu_b: torch.Tensor) -> bool:
    """Whether two ``cu_seqlens`` are known to hold the same values without reading them (no device sync): one
    buffer (same address, shape and strides), or two tensors whose checks read equal values and that nothing
    wrote to since. Transformers' ``DataCollatorWithFlattening`` hands ``cu_seq_lens_q`` and ``cu_seq_lens_k``
    over as two equal tensors; the Hopper kernels take a varlen call only when Q's and K/V's sequences are the
    same."""
    if cu_a.data_ptr() == cu_b.data_ptr() and cu_a.shape == cu_b.shape and cu_a.stride() == cu_b.stride():
        return True
    read = []
    for t in (cu_a, cu_b):
        version = version_of(t)
        found = next((values for ref, key, values in _CU_SEQLENS_CHECKED if ref() is t and key[0] == version), None)
        if found is None or version is UNTRACKED:
            return False
        read.append(found)
    return read[0] == read[1]


def _read(cu_seqlens: torch.Tensor) -> list:
    return cu_seqlens.tolist()  # the device sync; a function of its own so tests can count the reads


def vouch_for_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Record ``cu_seqlens`` as valid for ``total`` packed tokens and ``max_seqlen`` without reading it.

    Only for tensors hf_flash built itself from values it has already read (the Transformers
    integration's padding plan) and that no caller can reach, so nothing writes to them afterwards.
    Under inference_mode this is what spares such a tensor a read (a device sync) in every layer of every
    step; otherwise it spares the first layer's."""
    if not is_compiling():  # compiled calls skip the check anyway
        _remember(cu_seqlens, _cache_key(cu_seqlens, total, max_seqlen))


def check_cu_seqlens(name: str, cu_seqlens, total: int, max_seqlen, max_name: str, device) -> None:
    """cu_seqlens: int32 ``[B + 1]``, starting at 0, non-decreasing, ending at the packed length, with no
    sequence longer than ``max_seqlen``. The values are read once per tensor (see above)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative Python int, got {max_seqlen!r}")
    if is_compiling():
        return  # reading the values would sync and break the graph; checked in eager runs
    key = _cache_key(cu_seqlens, total, max_seqlen)
    if any(ref() is cu_seqlens and seen == key for ref, seen, _ in _CU_SEQLENS_CHECKED):
        return
    values = _read(cu_seqlens)
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or min(lengths) < 0:
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {values[:8]}...")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {values[-1]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} ({max(lengths)})")
    if key[0] is not UNTRACKED:
        _remember(cu_seqlens, key, tuple(values))
