"""``attn_implementation="hf_flash"`` for Hugging Face Transformers (4.56 and 5.x).

:func:`register` (called by ``import hf_flash``) does five things:

1. registers :func:`hf_flash_attention_forward` in ``AttentionInterface`` under ``"hf_flash"``;
2. registers :func:`hf_flash_mask` in ``AttentionMaskInterface``. Without a mask function
   Transformers hands a custom implementation ``attention_mask=None`` even for padded batches, so
   padding would be silently ignored. Ours passes on at most the 2D padding mask (never an O(L^2)
   4D mask): causal, sliding-window and packing become the kernels' job;
3. on Transformers 5.x, answers for ``"hf_flash"`` inside the flash-attention loader. 5.x sends every
   implementation whose name contains "flash" through that loader (at ``from_pretrained`` and
   ``set_attn_implementation``), which otherwise looks for a Hub kernel called ``hf_flash`` and fails
   with "Could not find the currently requested flash attention implementation at `hf_flash`".
4. on Transformers 5.x, keeps models that name their own flash kernels (``_compatible_flash_implementations``:
   gpt-oss, granite_swa, ...) from replacing ``"hf_flash"`` by the first of them, a Hub kernel;
5. hooks the decoder base models built afterwards so that padded training batches run packed through the
   whole decoder, not only attention (:mod:`hf_flash.integrations.padding_free`).

How a call is routed (mirroring Transformers' own flash path, so results match its eager path):

* 2D padding mask -> unpad to the varlen layout (no compute on pads); with a static cache the keys
  are first cut to the mask's length (the unfilled cache slots are zeros);
* ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs -> varlen over the flattened batch;
* ``position_ids`` that restart inside a row (packed / padding-free batches) -> varlen, split where
  the position does not grow by one (the rule of Transformers' eager/SDPA masks);
* otherwise plain causal attention; without a mask, keys beyond ``position_ids.max() + 1`` (unfilled
  static-cache slots) are dropped.

On a chip without tensor-core ``tl.dot`` (sm75, T4) calls that need no mask run through PyTorch SDPA's
memory-efficient kernel instead of the kernels, because it is faster there (:mod:`hf_flash.dispatch`).

Attention sinks (``s_aux``: gpt-oss, granite_swa, ...) go to the kernels' ``sinks`` on every route.

What the kernels cannot do falls back, announced once per reason by :mod:`hf_flash.fallback`:
no usable GPU / dtype -> PyTorch SDPA with the same routing; options the kernels cannot honour
(``output_attentions=True``, a 4D or custom mask pattern, unknown kwargs) -> the model's own
``eager_attention_forward`` with a 4D mask built here.
"""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_flash import dispatch, fallback
from hf_flash.integrations import padding_free
from hf_flash.integrations.padding import mask_to_vouched_varlen, pad, varlen_from_position_ids
from hf_flash.integrations.patching import wrap_once
from hf_flash.ops import flash_attn_func, flash_attn_varlen_func, visibility
from hf_flash.ops.checks import UNTRACKED, version_of, vouch_for_cu_seqlens

__all__ = ["NAME", "hf_flash_attention_forward", "hf_flash_mask", "is_registered", "register"]

NAME = "hf_flash"

# kwargs that models send along and that do not change the attention result
_IGNORED_KWARGS = frozenset(
    {
        "use_cache", "cache_position", "past_key_value", "past_key_values", "output_hidden_states",
        "output_router_logits", "return_dict", "num_items_in_batch", "position_embeddings", "layer_idx",
        "seq_idx",  # Mamba-hybrid packing ids; the same borders come from cu_seq_lens / position_ids
    }
)  # fmt: skip
# kwargs read by this file
_HANDLED_KWARGS = frozenset(
    {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "deterministic"}
)


# ----------------------------------------------------------------------------------------------
# Routing: which tokens go where
# ----------------------------------------------------------------------------------------------


@dataclass
class _Varlen:
    """The packed layout of one call. ``index_*``: rows of the flattened ``[B * L]`` tokens that
    are kept, in packed order; None keeps all of them (packed batches, decode steps)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    index_q: torch.Tensor | None
    index_k: torch.Tensor | None


def _route(batch: int, len_q: int, len_k: int, attention_mask, kwargs) -> tuple[int, _Varlen | None]:
    """Decide the layout: (number of keys to use, varlen plan or None for plain attention).

    Args:
        attention_mask: None or bool/int ``[B, Lm]`` (True = real token), already sliced by
            :func:`hf_flash_mask` to the last ``Lk`` columns (``Lm < Lk`` under a static cache).
    """
    if attention_mask is not None:
        mask = attention_mask[:, -len_k:].bool()
        used_k = mask.shape[-1]
        index_k, cu_k, max_k = mask_to_vouched_varlen(mask)
        if len_q == used_k:
            return used_k, _Varlen(cu_k, cu_k, max_k, max_k, index_k, index_k)
        if len_q == 1:  # decode: one query per row, pad rows included (their output is discarded anyway)
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=mask.device)
            vouch_for_cu_seqlens(cu_q, batch, 1)
            return used_k, _Varlen(cu_q, cu_k, 1, max_k, None, index_k)
        # a chunk of new tokens after a cache: padding can only be on the left, as in Transformers
        index_q, cu_q, max_q = mask_to_vouched_varlen(mask[:, -len_q:])
        return used_k, _Varlen(cu_q, cu_k, max_q, max_k, index_q, index_k)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        return len_k, _Varlen(cu_q, cu_k, int(max_q), int(max_k), None, None)

    position_ids = kwargs.get("position_ids")
    # 3D position ids (multimodal RoPE) are not sequence positions: never read them as packing
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == len_q:
        # Finding packed rows reads the positions (a sync, a graph break under torch.compile). Packed
        # batches have one row (DataCollatorWithFlattening, TRL padding_free), so compiled multi-row
        # batches skip the check and keep one graph, as Transformers' own flash path does.
        maybe_packed = batch == 1 or not torch.compiler.is_compiling()
        if len_q == len_k and len_q > 1 and maybe_packed:
            packed = varlen_from_position_ids(position_ids.expand(batch, -1))
            if packed is not None:
                cu, max_len = packed
                vouch_for_cu_seqlens(cu, batch * len_q, max_len)
                return len_k, _Varlen(cu, cu, max_len, max_len, None, None)
        elif len_q < len_k:
            # without a mask there is no padding, so the last position tells how much of a static
            # cache is filled; with a dynamic cache this is len_k itself
            filled = int(position_ids.max()) + 1
            if 0 < filled < len_k:
                return filled, None
    return len_k, None


# The layers of one forward pass get the same mask / position tensors, so the routing (and its device
# syncs) is computed once and reused: by the other layers, and by the recomputed layers of the backward
# under gradient checkpointing, which run in reverse order (without the reuse, each recomputed layer
# synced the device again). An entry matches only the same tensor objects (held by the entry, so an id
# cannot be recycled) with the same version counters, which every in-place write bumps. Tensors made
# under torch.inference_mode have no version counter: an entry holding one lasts only while the layer
# index grows (one forward pass). A few entries, because Gemma-style models alternate masks.
_ROUTE_CACHE: list[tuple[tuple, tuple, tuple, tuple[int, _Varlen | None]]] = []
_ROUTE_CACHE_SIZE = 4
_last_layer_idx = [-1]


def _versions(tensors) -> tuple:
    return tuple(None if t is None else version_of(t) for t in tensors)


def _route_cached(batch, len_q, len_k, attention_mask, kwargs, layer_idx) -> tuple[int, _Varlen | None]:
    """:func:`_route`, memoized over the layers of a forward pass and their recomputation (not under
    torch.compile)."""
    if torch.compiler.is_compiling() or not isinstance(layer_idx, int):
        return _route(batch, len_q, len_k, attention_mask, kwargs)
    if layer_idx <= _last_layer_idx[0]:  # a new pass, or a recomputation: inference tensors expire
        _ROUTE_CACHE[:] = [entry for entry in _ROUTE_CACHE if UNTRACKED not in entry[1]]
    _last_layer_idx[0] = layer_idx
    tensors = (attention_mask, *(kwargs.get(k) for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")))
    tensors = tuple(t if isinstance(t, torch.Tensor) else None for t in tensors)
    versions = _versions(tensors)
    key = (batch, len_q, len_k, kwargs.get("max_length_q"), kwargs.get("max_length_k"))
    for cached_tensors, cached_versions, cached_key, result in _ROUTE_CACHE:
        if (cached_key == key and all(a is b for a, b in zip(cached_tensors, tensors))
                and cached_versions == versions):
            return result
    result = _route(batch, len_q, len_k, attention_mask, kwargs)
    _ROUTE_CACHE.insert(0, (tensors, versions, key, result))
    del _ROUTE_CACHE[_ROUTE_CACHE_SIZE:]
    return result


def _flatten(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, H, D]`` -> packed ``[N, H, D]`` (all rows, or those in ``index``)."""
    x = x.reshape(-1, *x.shape[2:])
    return x if index is None else x[index]


def _padded_visibility(plan, batch, len_q, len_k, causal, window, device):
    """The routed pattern as a bool ``[B, 1, Lq, Lk]`` mask in the padded layout (None = all visible)."""
    if plan is None:
        return fallback.dense_visibility(batch, len_q, len_k, causal, window, device)
    totals = [batch * length if index is None else index.numel()
              for index, length in ((plan.index_q, len_q), (plan.index_k, len_k))]  # fmt: skip
    q_seq, q_pos, k_seq, k_pos = visibility.varlen_positions(plan.cu_q, plan.cu_k, *totals)

    def padded(seq, pos, index, total, length, missing):
        # the packed tokens' ids and positions at their rows of the padded layout; pads get an id that no
        # token on the other side has (-1 for queries, -2 for keys), so they see and are seen by nothing
        rows = torch.arange(total, device=device) if index is None else index
        seq = torch.full((batch * length,), missing, dtype=torch.long, device=device).index_put((rows,), seq)
        pos = torch.zeros(batch * length, dtype=torch.long, device=device).index_put((rows,), pos)
        return seq.view(batch, length), pos.view(batch, length)

    q_coords = padded(q_seq, q_pos, plan.index_q, totals[0], len_q, -1)
    k_coords = padded(k_seq, k_pos, plan.index_k, totals[1], len_k, -2)
    return visibility.visible(*q_coords, *k_coords, causal, window)[:, None]


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------


def _unsupported_reason(attention_mask, kwargs) -> str | None:
    """Why the kernels cannot honour this call's options (None: they can)."""
    if kwargs.get("output_attentions"):
        return "`output_attentions=True` needs the attention weights, which flash attention never forms"
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        return "a 4D (or custom) attention mask cannot be expressed as padding, packing, causal and window"
    for key, value in kwargs.items():
        if key in _IGNORED_KWARGS or key in _HANDLED_KWARGS or value is None or value is False:
            continue
        return f"the argument `{key}` is not supported by the kernels"
    return None


def _compute_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype:
    """The dtype to run fp32 inputs in, chosen like Transformers' own flash path.

    fp32 queries happen when peft upcasts layer norms or when autocast is on over fp32 weights; the
    model's real compute dtype is then the autocast dtype, the quantized config's dtype, or the
    dtype of its Linear weights. A model whose weights are fp32 stays fp32 and falls back to SDPA:
    casting its attention to half precision behind the user's back would change its numerics.
    """
    if query.dtype != torch.float32:
        return query.dtype
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "_is_quantized"):
        return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or query.dtype
    linear = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    return linear.weight.dtype if linear is not None and linear.weight.is_floating_point() else query.dtype


def _eager_fallback(module, query, key, value, attention_mask, reason, plan_args, call_kwargs):
    """Run the model's own ``eager_attention_forward`` with a 4D additive mask (handles sinks,
    attention weights, custom masks). Returns what it returns: ``(out [B, Lq, H, D], weights)``."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"hf_flash cannot run this call ({reason}) and {type(module).__module__} has no "
            "eager_attention_forward to fall back to; load the model with attn_implementation='eager'"
        )
    fallback.report_fallback(reason, instead=f"the model's eager attention ({type(module).__name__})")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        mask, used_k = attention_mask, key.shape[2]
    else:
        used_k, plan, causal, window = plan_args()
        mask = _padded_visibility(plan, query.shape[0], query.shape[2], used_k, causal, window, query.device)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    return eager(module, query, key[:, :, :used_k], value[:, :, :used_k], mask, **call_kwargs)


def hf_flash_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transformers' attention-function contract, computed by the hf_flash kernels.

    Args:
        module: the calling attention layer (``is_causal``, ``training``, ``config`` are read).
        query: ``[B, H, Lq, D]``; key, value: ``[B, Hk, Lk, D]`` (GQA: ``H % Hk == 0``, not repeated).
            ``Lk`` is ``Lq`` in training, past + ``Lq`` with a dynamic cache, the cache size with a static one.
        attention_mask: None or the 2D padding mask ``[B, Lm]`` from :func:`hf_flash_mask` (True = token).
        dropout: attention dropout probability, applied only while ``module.training``.
        scaling: softmax scale (default ``D ** -0.5``). sliding_window: a query sees its last ``W`` keys
            (itself included), i.e. flash-attn ``window_size=(W - 1, 0)``. softcap: Gemma 2's ``tanh`` cap.
        is_causal: overrides ``module.is_causal``; causal is bottom-right aligned when ``Lq != Lk``.
        s_aux: attention sinks ``[H]`` (gpt-oss): one logit per query head added to each row's softmax sum,
            with no value; its gradient flows back to the model's parameter.
        kwargs: ``position_ids`` ``[B or 1, Lq]``, ``cu_seq_lens_q/k`` ``[S + 1]``, ``max_length_q/k``
            (ints), ``deterministic``; anything else that is set triggers the eager fallback.
    Returns:
        ``(out [B, Lq, H, D], None)``; ``out`` is in the compute dtype (see :func:`_compute_dtype`).
    """
    if is_causal is None:
        # 5.x lets a config turn a decoder bidirectional (``config.is_causal = False``) without
        # touching its layers; its eager/SDPA masks follow the config, so do we
        config_causal = getattr(getattr(module, "config", None), "is_causal", True)
        is_causal = getattr(module, "is_causal", True) and config_causal is not False
    causal = bool(is_causal)
    window = (-1, -1)
    if sliding_window is not None and sliding_window > 0:
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    dropout = float(dropout) if module.training else 0.0
    batch, len_q, len_k = query.shape[0], query.shape[2], key.shape[2]

    reason = _unsupported_reason(attention_mask, kwargs)
    if reason is not None:
        # eager functions take ``scaling`` as required (None would fail there)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        call_kwargs = dict(kwargs, dropout=dropout, scaling=scaling, sliding_window=sliding_window,
                           softcap=softcap, is_causal=is_causal, s_aux=s_aux)  # fmt: skip
        plan_args = lambda: (*_route(batch, len_q, len_k, attention_mask, kwargs), causal, window)
        return _eager_fallback(module, query, key, value, attention_mask, reason, plan_args, call_kwargs)

    dtype = _compute_dtype(query, module)
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))  # [B, L, H, D] views
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    scale = scaling if scaling is not None else head_dim**-0.5
    if value_dim != head_dim:  # e.g. MLA: the kernels want one head dim; zero columns change nothing
        width = max(head_dim, value_dim)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))

    unavailable = fallback.kernel_unavailable_reason(q)
    if unavailable is not None:
        fallback.report_fallback(unavailable)

    options = {"dropout_p": dropout, "softmax_scale": scale, "causal": causal, "window_size": window,
               "softcap": float(softcap or 0.0)}  # fmt: skip
    if s_aux is not None:
        options["sinks"] = s_aux
    if kwargs.get("deterministic") is not None:
        options["deterministic"] = bool(kwargs["deterministic"])
    used_k, plan = _route_cached(batch, len_q, len_k, attention_mask, kwargs, getattr(module, "layer_idx", None))
    out = _attention(q, k[:, :used_k], v[:, :used_k], plan, options, kernels=unavailable is None)
    return out[..., :value_dim], None


def _attention(q, k, v, plan: _Varlen | None, options: dict, kernels: bool) -> torch.Tensor:
    """One routed call, on the path this chip prefers: q ``[B, Lq, H, D]``, k/v ``[B, Lk, Hk, D]`` ->
    ``[B, Lq, H, D]``. ``kernels``: whether the kernels can run it (else the SDPA fallback does)."""
    batch, len_q = q.shape[:2]
    if not kernels:
        attn_func, varlen_func = fallback.sdpa_flash_attn_func, fallback.sdpa_flash_attn_varlen_func
    elif dispatch.integration_path(q, k, v, plan is not None, options) == dispatch.SDPA:
        return _chosen_sdpa(q, k, v, plan, options)
    else:
        attn_func, varlen_func = flash_attn_func, flash_attn_varlen_func
    if plan is None:
        return attn_func(q, k, v, **options)
    out = varlen_func(
        _flatten(q, plan.index_q), _flatten(k, plan.index_k), _flatten(v, plan.index_k),
        plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, **options,
    )  # fmt: skip
    return out.view(batch, len_q, *out.shape[1:]) if plan.index_q is None else pad(out, plan.index_q, batch, len_q)


def _chosen_sdpa(q, k, v, plan: _Varlen | None, options: dict) -> torch.Tensor:
    """:func:`_attention` through SDPA's memory-efficient kernel, where :mod:`hf_flash.dispatch` prefers it.

    A dense call needs no mask once the parts of causal/window that hide nothing are dropped (that is
    what dispatch checked). A padded or packed one (``HF_FLASH_SM75_PATH=sdpa``) gets a ``[B, 1, Lq, Lk]``
    mask in the padded layout: ``B * Lq * Lk`` entries, where the fallback's one mask over all packed
    tokens would hold ``(B * L) ** 2`` and compute as much.
    """
    batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
    causal, window = visibility.simplify_mask(options["causal"], options["window_size"], len_q, len_k)
    backends = dispatch.sdpa_backends()
    if plan is None:
        return fallback.sdpa_flash_attn_func(q, k, v, **dict(options, causal=causal, window_size=window),
                                             backends=backends)  # fmt: skip
    visible = _padded_visibility(plan, batch, len_q, len_k, causal, window, q.device)
    return fallback.attention_with_mask(q, k, v, visible, options["softmax_scale"], options["dropout_p"],
                                        backends=backends)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The mask function
# ----------------------------------------------------------------------------------------------

# Mask-pattern pieces of Transformers' masking_utils that the kernels reproduce (by qualified name;
# 4.56 and 5.x share them). Anything else in a mask function is a custom pattern.
_KNOWN_PATTERNS = ("causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay.",
                   "sliding_window_bidirectional_overlay.", "padding_mask_function.",
                   "packed_sequence_mask_function.")  # fmt: skip
_COMBINERS = ("and_masks.", "remap_positions_for_packed_sequence.")


def _custom_pattern(mask_function, depth: int = 0) -> str | None:
    """Name of a part of ``mask_function`` the kernels cannot reproduce (e.g. bidirectional image
    tokens, chunked attention), or None. Walks the closures of Transformers' mask combinators."""
    name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
    if name.startswith(_KNOWN_PATTERNS) or depth > 8:
        return None
    if not name.startswith(_COMBINERS):
        return name
    for cell in mask_function.__closure__ or ():
        contents = cell.cell_contents
        for part in contents if isinstance(contents, (tuple, list)) else (contents,):
            if callable(part) and not isinstance(part, torch.Tensor):
                found = _custom_pattern(part, depth + 1)
                if found is not None:
                    return found
    return None


def hf_flash_mask(batch_size=None, kv_length=None, mask_function=None, attention_mask=None, **kwargs):
    """``AttentionMaskInterface`` entry for ``"hf_flash"``: the 2D padding mask or None, never 4D.

    Returns:
        None when there is no padding; else bool ``[B, Lm]`` = the last ``kv_length`` columns of the
        2D mask (``Lm < kv_length`` with a static cache: the attention function then cuts the keys).
        A mask function with a custom pattern gets Transformers' own 4D SDPA mask instead, which
        sends the call to the eager fallback with a warning rather than dropping the pattern.
    """
    compiling = torch.compiler.is_compiling()
    custom = None if compiling or mask_function is None else _custom_pattern(mask_function)
    if custom is not None:
        from transformers.masking_utils import sdpa_mask

        kwargs.update(allow_is_causal_skip=False, batch_size=batch_size, kv_length=kv_length)
        return sdpa_mask(mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    mask = attention_mask[:, -kv_length:].bool() if kv_length else attention_mask.bool()
    # an all-True mask as long as the keys carries no information; dropping it keeps the plain
    # (non-varlen) path. Reading it is a sync, so under compile the mask is kept.
    if not compiling and mask.shape[-1] == kv_length and bool(mask.all()):
        return None
    return mask


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def _is_our_name(attn_implementation) -> bool:
    # "paged|hf_flash": 5.x's prefix for the paged (continuous-batching) form of an implementation
    return isinstance(attn_implementation, str) and attn_implementation.split("|")[-1] == NAME


_MISSING = object()


class _QuietLoaderFilter(logging.Filter):
    """Drops Transformers' notes that our loader entry has no paged (block-table) function: they are
    true of every non-paged kernel and would be logged at each model load."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (f"`{NAME}`" in message and ("block tables" in message or "only supports varlen" in message))


def _teach_flash_loader() -> bool:
    """Make Transformers 5.x's flash-attention loader answer for ``"hf_flash"``.

    Its ``_lazy_imports`` falls through to ``hub_kernels.load_and_register_attn_kernel`` (imported at
    call time in 5.0-5.24) for any name it does not know; we wrap that function so that our name
    gets hf_flash's ``flash_attn_func`` / ``flash_attn_varlen_func``. Answering inside the loader
    keeps working after another model in the process loads ``flash_attention_2`` (the loader's
    cache is keyed by name). Returns False when this Transformers has no such loader (4.56).
    """
    try:
        from transformers.integrations import hub_kernels
    except ImportError:
        return False

    def make_wrapper(original):
        def load_and_register_attn_kernel(attn_implementation, *args, **kwargs):
            if _is_our_name(attn_implementation):
                # no register call here: our attention and mask functions are already registered
                return types.SimpleNamespace(flash_attn_func=flash_attn_func,
                                             flash_attn_varlen_func=flash_attn_varlen_func)
            return original(attn_implementation, *args, **kwargs)

        # with the wrap, once: the loader's notes about our entry would otherwise come at every model load
        logging.getLogger("transformers.modeling_flash_attention_utils").addFilter(_QuietLoaderFilter())
        return load_and_register_attn_kernel

    return wrap_once(hub_kernels, "load_and_register_attn_kernel", make_wrapper)


def _count_among_compatible_flash_implementations() -> bool:
    """Keep Transformers 5.x from replacing ``"hf_flash"`` by a model's own flash kernel.

    A model class may list the flash kernels that handle what it needs (gpt-oss: attention sinks) in
    ``_compatible_flash_implementations``; ``PreTrainedModel._check_and_adjust_attn_implementation`` then
    swaps any requested name containing "flash" that is not in the list for its first entry, a Hub kernel
    (logged as "Automatically falling back to `kernels-community/vllm-flash-attn3` instead of `hf_flash`"):
    offline the load fails, online the user silently runs another kernel. hf_flash honours what these
    models ask for, or falls back loudly, so for our name the list is read with ``"hf_flash"`` in it.

    That method is the one place where a name is checked: ``__init__`` (``from_pretrained``,
    ``from_config``) and ``set_attn_implementation`` (for the model and each sub-model) call it. We wrap it
    on ``PreTrainedModel``, no model class is touched; for a call with our name the instance gets, for the
    call's duration only, an attribute shadowing its class's list with ``"hf_flash"`` appended. Other names
    and models without a list go through unchanged.

    Private API, needed on 5.x releases that have ``PreTrainedModel._compatible_flash_implementations``
    (read in 5.17 and 5.25, where the redirect is in that method); 4.56 has no redirect. Returns False
    where there is nothing to wrap. tests/integrations/test_flash_redirect.py checks every model class
    that declares a list, found by scanning Transformers' modeling modules.
    """
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return False
    attribute = "_compatible_flash_implementations"
    if not hasattr(PreTrainedModel, attribute):
        return False

    def make_wrapper(original):
        def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
            listed = getattr(self, attribute, None)
            if not _is_our_name(attn_implementation) or listed is None or NAME in listed:
                return original(self, attn_implementation, *args, **kwargs)
            own = self.__dict__.get(attribute, _MISSING)  # written to __dict__: nn.Module.__setattr__ is bypassed
            self.__dict__[attribute] = [*listed, NAME]
            try:
                return original(self, attn_implementation, *args, **kwargs)
            finally:
                if own is _MISSING:
                    del self.__dict__[attribute]
                else:
                    self.__dict__[attribute] = own

        return _check_and_adjust_attn_implementation

    return wrap_once(PreTrainedModel, "_check_and_adjust_attn_implementation", make_wrapper)


_registered = False


def register() -> None:
    """Register ``"hf_flash"`` with Transformers (idempotent). Needs ``transformers`` importable."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, hf_flash_attention_forward)
    AttentionMaskInterface.register(NAME, hf_flash_mask)
    if not _registered:
        _teach_flash_loader()
        _count_among_compatible_flash_implementations()
        padding_free.install(NAME)
    _registered = True


def is_registered() -> bool:
    """True when ``"hf_flash"`` is in Transformers' global attention and mask registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (
        AttentionInterface._global_mapping.get(NAME) is hf_flash_attention_forward
        and AttentionMaskInterface._global_mapping.get(NAME) is hf_flash_mask
    )
