"""Padded batches run through the whole decoder without their pads ("padding-free"), not only attention.

Per layer, hf_flash's attention already skips the pads of a padded batch (it unpads to the varlen layout
and pads its output again). The projections, the MLP and the norms around it still run on all ``B * L``
positions, and with long-tailed lengths most of those are pads. For a decoder (an ``embed_tokens`` +
``layers`` base model) running ``attn_implementation="hf_flash"`` on a padded 2D ``attention_mask``,
with no cache in or out, two hooks on the base model change the layout once per forward instead:

* before it: the real tokens of all rows become one packed row ``[1, N]``; their positions stay what the
  model would have used (the given ``position_ids``, else ``0 .. L - 1`` per row as Transformers builds
  them) and the rows' borders go in as ``cu_seq_lens_q/k`` + ``max_length_q/k``, the kwargs that
  Transformers' own flash path and hf_flash's attention read for packed batches;
* after it: ``last_hidden_state`` (and each of ``hidden_states``) goes back to ``[B, L, H]`` with zeros at
  the pads, so the caller (the LM head, the loss, the user) sees the usual shapes. What the model computes
  at a pad position means nothing in any backend (Transformers' own flash path differs from eager there
  too); here it is the head applied to zeros.

A call is left alone, and runs hf_flash's per-layer path, when any of these holds: another attention
implementation; no pads; a cache is passed or would be made (``use_cache``, as Transformers resolves it:
the argument, else the config, off under gradient checkpointing in training); ``cache_position``;
non-2D ``position_ids`` (multimodal RoPE); attention weights or router logits asked for;
``return_dict=False``; an already packed batch (``cu_seq_lens_*``); tensors among the kwargs that this
file does not know (per-token inputs of other models); ``torch.compile`` tracing (the packing reads the
mask: a sync); ``HF_FLASH_PADDING_FREE=0`` in the environment.

Installed by :func:`install` (from ``hf_flash.integrations.transformers.register``): every Transformers
model built afterwards that looks like a decoder base model gets the two hooks; they do nothing unless
the model runs hf_flash at the time of the call.
"""

from __future__ import annotations

import os

import torch

from hf_flash.integrations.padding import mask_to_vouched_varlen, pad
from hf_flash.integrations.patching import wrap_once

__all__ = ["ENV", "install", "skip_reason"]

ENV = "HF_FLASH_PADDING_FREE"  # "0": keep padded batches padded outside attention
_STATE = "_hf_flash_padding_free"  # attribute holding one call's packing between the two hooks
# kwargs a decoder base model may get that need no packing of their own (scalars, flags, the cache slots)
_KNOWN = frozenset(
    {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "use_cache", "past_key_values", "cache",
     "cache_position", "output_hidden_states", "output_attentions", "output_router_logits", "return_dict",
     "num_items_in_batch", "is_causal"}
)  # fmt: skip


_served: str | None = None  # the attention implementation whose calls are packed (install's name)


def _wants(module, kwargs: dict, name: str) -> bool:
    value = kwargs.get(name)
    return bool(value if value is not None else getattr(module.config, name, False))


def skip_reason(module: torch.nn.Module, kwargs: dict) -> str | None:
    """Why this call of a decoder base model keeps its padded layout (None: it is packed). Reads no tensor."""
    if _served is None or getattr(module.config, "_attn_implementation", None) != _served:
        return "another attention implementation"
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return "no 2D padding mask"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        return "a cache is passed"
    use_cache = _wants(module, kwargs, "use_cache")
    if use_cache and getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
        use_cache = False  # what Transformers does (merge_with_config_defaults / check_model_inputs)
    if use_cache:
        return "use_cache: the cache would hold the packed layout"
    if kwargs.get("cache_position") is not None:
        return "cache_position is given"
    if _wants(module, kwargs, "output_attentions") or _wants(module, kwargs, "output_router_logits"):
        return "attention weights or router logits are asked for"
    if kwargs.get("return_dict") is False:
        return "return_dict=False"
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != mask.shape[-1]):
        return "position_ids are not [B, L] sequence positions"
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if tokens is None or tuple(tokens.shape[:2]) != tuple(mask.shape):
        return "inputs do not match the mask's [B, L]"
    unknown = [k for k, v in kwargs.items() if k not in _KNOWN and isinstance(v, torch.Tensor)]
    if unknown:
        return f"per-call tensors this hook does not know: {', '.join(sorted(unknown))}"
    return None


def _pack(module, args: tuple, kwargs: dict):
    """Forward pre-hook: a padded batch -> one packed row with its borders (see the module docstring)."""
    if args:  # Transformers calls base models by keyword; a direct positional call may give input_ids
        if len(args) > 1 or "input_ids" in kwargs:
            return None
        kwargs = {**kwargs, "input_ids": args[0]}
    if skip_reason(module, kwargs) is not None:
        return None
    mask = kwargs["attention_mask"]
    if bool(mask.bool().all()):  # nothing to take out (a sync, as the per-layer path makes anyway)
        return None
    batch, length = mask.shape
    index, cu_seqlens, max_len = mask_to_vouched_varlen(mask)  # [N], [B + 1], int
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # Transformers' default: 0 .. L - 1 in every row, pads counted (left padding too)
        positions = index % length
    else:
        positions = position_ids.expand(batch, length).reshape(-1)[index]
    packed = dict(kwargs, attention_mask=None, position_ids=positions[None], cu_seq_lens_q=cu_seqlens,
                  cu_seq_lens_k=cu_seqlens, max_length_q=max_len, max_length_k=max_len)  # fmt: skip
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            packed[name] = kwargs[name].reshape(batch * length, *kwargs[name].shape[2:])[index][None]
    module.__dict__[_STATE] = (cu_seqlens, index, batch, length)
    return (), packed


def _unpack(module, args: tuple, kwargs: dict, output):
    """Forward hook: the packed row's hidden states back to ``[B, L, H]`` (zeros at the pads)."""
    state = module.__dict__.pop(_STATE, None)
    if state is None or kwargs.get("cu_seq_lens_q") is not state[0]:
        return None
    _, index, batch, length = state
    output["last_hidden_state"] = pad(output["last_hidden_state"][0], index, batch, length)
    if output.get("hidden_states") is not None:
        output["hidden_states"] = tuple(pad(h[0], index, batch, length) for h in output["hidden_states"])
    return output


def _is_decoder_base(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (
        getattr(model, "base_model", None) is model
        and isinstance(getattr(model, "layers", None), torch.nn.ModuleList)
        and getattr(model, "embed_tokens", None) is not None
        and not getattr(config, "is_encoder_decoder", False)
    )


def hook(model: torch.nn.Module) -> bool:
    """Give a decoder base model the two hooks (once). Returns whether it has them."""
    if not _is_decoder_base(model):
        return False
    if not getattr(model, "_hf_flash_hooked", False):
        model.register_forward_pre_hook(_pack, with_kwargs=True)
        model.register_forward_hook(_unpack, with_kwargs=True)
        model.__dict__["_hf_flash_hooked"] = True
    return True


def install(name: str) -> bool:
    """Hook every decoder base model that Transformers builds from now on (wraps ``PreTrainedModel.post_init``,
    which every model's ``__init__`` ends with), packing the calls of models whose attention implementation is
    ``name`` (the integration's registered name: given here, so this module needs nothing from the integration).
    Idempotent; False where Transformers has no post_init."""
    global _served
    _served = name
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return False

    def make_wrapper(original):
        def post_init(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            hook(self)
            return result

        return post_init

    return wrap_once(PreTrainedModel, "post_init", make_wrapper)
