"""Which path a Transformers attention call takes on this chip: hf_flash's kernels or PyTorch SDPA.

The kernels are the fast path wherever Triton lowers ``tl.dot`` to tensor-core ``mma`` (sm80 and newer).
Below sm80 Triton emits FMA on CUDA cores (no ``mma.sync`` in its sm75 code), so on a T4 the kernels are
correct and O(L) in memory but run on the slow half of the chip: ~8 TFLOP/s of fp32 FMA against
65 TFLOP/s of fp16 tensor cores (datasheet peaks; nothing here was timed on a T4). PyTorch SDPA's
memory-efficient backend runs on those tensor cores with O(L) memory too, as long as it needs no mask: a
padded or packed batch, a sliding window, or causal attention with ``Lq != Lk`` (SDPA's ``is_causal``
is top-left aligned, flash-attn's bottom-right) would each need an explicit ``[B, 1, Lq, Lk]`` mask, and
SDPA has no softcap and no attention sinks.

So on a chip whose tile table has ``tensor_cores=False`` the Transformers integration sends the calls that
need no mask to SDPA restricted to its EFFICIENT_ATTENTION backend and keeps the rest on the kernels
(:func:`choose`). ``HF_FLASH_SM75_PATH`` changes that rule:

* ``auto`` (default): as above;
* ``kernels``: every call runs on the kernels;
* ``sdpa``: padded/packed batches and windows go to SDPA too, with an explicit mask (O(L^2) memory).

In every mode softcap, attention sinks, a requested deterministic backward and head dims the SDPA kernel
cannot take stay on the kernels. This is a choice, not a fallback: it is announced once per process (:class:`PathNotice`)
and ``HF_FLASH_STRICT=1`` does not make it an error. The direct API (``hf_flash.flash_attn_func`` ...)
always runs the kernels. ``hf_flash.info()`` prints the decision per dtype.

Nothing here imports Transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hf_flash import fallback
from hf_flash.ops import config
from hf_flash.ops.visibility import simplify_mask

__all__ = ["KERNELS", "SDPA", "SM75_PATH_ENV", "Call", "PathNotice", "choose", "describe", "integration_path",
           "simplify_mask", "sm75_path"]  # fmt: skip

SM75_PATH_ENV = "HF_FLASH_SM75_PATH"
SM75_PATHS = ("auto", "kernels", "sdpa")
KERNELS = "kernels"
SDPA = "sdpa-efficient"

# what each mode does on a chip without tensor-core tl.dot, for the notice and the report
_RULES = {
    "auto": (
        "plain causal/full attention runs through PyTorch SDPA's memory-efficient kernel (tensor cores, O(L) "
        "memory); padded/packed batches, sliding windows, softcap and attention sinks stay on hf_flash's kernels "
        "(SDPA would need an O(L^2) mask for them, and has no softcap or sinks)"
    ),
    "sdpa": (
        f"attention runs through PyTorch SDPA's memory-efficient kernel (tensor cores), padded/packed batches "
        f"and sliding windows included, with an explicit O(L^2) mask ({SM75_PATH_ENV}=sdpa); softcap and attention "
        "sinks stay on hf_flash's kernels"
    ),
    "kernels": f"{SM75_PATH_ENV}=kernels keeps every call on hf_flash's kernels all the same",
}
_SUMMARIES = {
    "auto": "SDPA memory-efficient for dense batches; hf_flash kernels for padded/packed/window/softcap",
    "sdpa": "SDPA memory-efficient, masks included (O(L^2) for padded/packed/window); hf_flash kernels for softcap",
    "kernels": "hf_flash kernels (CUDA cores)",
}


class PathNotice(UserWarning):
    """hf_flash chose PyTorch SDPA over its kernels because it is faster on this chip (not a fallback)."""


def sm75_path() -> str:
    """``$HF_FLASH_SM75_PATH``: "auto" (unset or empty), "kernels" or "sdpa"; anything else raises."""
    raw = os.environ.get(SM75_PATH_ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in SM75_PATHS:
        raise ValueError(f"{SM75_PATH_ENV} must be one of {', '.join(SM75_PATHS)} (default auto), got {raw!r}")
    return value


def sdpa_backends() -> list:
    """The only SDPA backend the chosen path may use: :func:`choose` checked that it takes the call, and
    allowing MATH would let SDPA silently form the O(L^2) score matrix instead."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.EFFICIENT_ATTENTION]


@dataclass(frozen=True)
class Call:
    """What the choice depends on, for one call the kernels can run.

    head_dim, value_dim: of q/k and of v. len_q, len_k: query and key length of the (padded) batch.
    masked: a padded or packed batch (the integration's varlen layout). causal, window, softcap: flash-attn's
    (``causal`` bottom-right aligned; ``window=(left, right)``, -1 = unbounded). deterministic: asked for.
    sinks: the call has attention sinks (gpt-oss's ``s_aux``).
    """

    dtype: torch.dtype
    head_dim: int
    value_dim: int
    len_q: int
    len_k: int
    masked: bool = False
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    deterministic: bool = False
    sinks: bool = False


def _sdpa_cannot(call: Call) -> str | None:
    """Why SDPA's memory-efficient kernel cannot give this call's result on tensor cores (None: it can)."""
    if call.dtype != torch.float16:
        return f"{call.dtype} has no tensor-core path in SDPA's memory-efficient kernel below sm80"
    bad = [d for d in (call.head_dim, call.value_dim) if d <= 0 or d % 8]
    if bad:
        return f"head dim {bad[0]} is not a multiple of 8, which SDPA's memory-efficient kernel needs"
    if call.len_q == 0 or call.len_k == 0:
        return "an empty sequence"
    if call.softcap > 0:
        return "softcap: SDPA has no logit softcap"
    if call.sinks:
        return "attention sinks: SDPA has no extra softmax term"
    if call.deterministic:
        return "a deterministic backward was asked for; SDPA's memory-efficient backward is not deterministic"
    return None


def _needs_mask(call: Call) -> str | None:
    """Why SDPA would need an explicit O(Lq x Lk) mask for this call (None: it needs none)."""
    if call.masked:
        return "padded/packed batch: SDPA would need an O(L^2) mask"
    causal, window = simplify_mask(call.causal, call.window, call.len_q, call.len_k)
    if window != (-1, -1):
        return "sliding window: SDPA would need an O(L^2) mask"
    if causal and call.len_q != call.len_k:
        return "causal with Lq != Lk is bottom-right aligned; SDPA's is_causal is top-left, so it would need a mask"
    return None


def choose(table: config.ChipTable, call: Call, mode: str = "auto") -> tuple[str, str]:
    """``(KERNELS or SDPA, why)`` for a Transformers call that the kernels can run on a chip with ``table``.

    ``mode``: :func:`sm75_path`'s value; it matters only on chips without tensor-core ``tl.dot``.
    """
    if table.tensor_cores:
        return KERNELS, f"tl.dot runs on tensor cores on {table.name}"
    if mode == "kernels":
        return KERNELS, f"{SM75_PATH_ENV}=kernels"
    reason = _sdpa_cannot(call) or (None if mode == "sdpa" else _needs_mask(call))
    if reason is not None:
        return KERNELS, reason
    return SDPA, f"SDPA's memory-efficient kernel runs on {table.name}'s tensor cores; Triton's tl.dot does not"


def chip_of(device: torch.device) -> config.ChipTable | None:
    """The tile table of a CUDA device's chip (None for other devices). Tests replace it to route CPU
    tensors as on a T4.

    It runs on every call, also inside ``torch.compile(fullgraph=True)``, so it asks only for the compute
    capability, as :func:`hf_flash.ops.config.kernels_unavailable_reason` does (dynamo folds it to a
    constant), and honours a forced arch like the kernels' own table choice."""
    if device.type != "cuda":
        return None
    forced = config.forced_arch()
    return config.table_for(forced if forced is not None else torch.cuda.get_device_capability(device))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _chip_clause(table: config.ChipTable, name: str) -> str:
    return f"on {name} ({table.name}) Triton has no tensor-core matmul (tl.dot runs as FMA on CUDA cores); "


def integration_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool, options: dict) -> str:
    """KERNELS or SDPA for one routed Transformers call that the kernels can run; announces the rule once.

    Args:
        q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, Hk, D]`` (keys already cut to those used).
        masked: the call runs in the varlen layout (padded or packed batch).
        options: the kernel options (``causal``, ``window_size``, ``softcap``, optional ``deterministic``).
    """
    table = chip_of(q.device)
    if table is None or table.tensor_cores:
        return KERNELS
    mode = sm75_path()
    # a warning is a graph break (an error under fullgraph): while compiling, the next eager call announces it
    if mode != "kernels" and not torch.compiler.is_compiling():
        message = f"hf_flash: {_chip_clause(table, device_name(q.device))}{_RULES[mode]}."
        if mode == "auto":
            message += f" Set {SM75_PATH_ENV}=kernels to run every call on the kernels."
        fallback.warn_once(f"path:{table.name}:{mode}", message, PathNotice, stacklevel=5)
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return KERNELS  # the memory-efficient kernel wants contiguous rows; SDPA would refuse the call
    call = Call(q.dtype, q.shape[-1], v.shape[-1], q.shape[1], k.shape[1], masked, bool(options["causal"]),
                tuple(options["window_size"]), float(options.get("softcap") or 0.0),
                bool(options.get("deterministic")), options.get("sinks") is not None)  # fmt: skip
    return choose(table, call, mode)[0]


def describe(table: config.ChipTable, dtype: torch.dtype, mode: str, chip: str) -> dict[str, str]:
    """What the integration does with ``dtype`` on a chip (for :mod:`hf_flash.info`), when the kernels
    can run it: ``{"path": KERNELS | "sdpa-efficient+kernels", "summary": ..., "why": ...}``."""
    if table.tensor_cores:
        return {"path": KERNELS, "summary": "hf_flash kernels", "why": f"tl.dot runs on tensor cores on {table.name}"}
    why = _chip_clause(table, chip) + _RULES[mode]
    if mode == "kernels" or dtype != torch.float16:
        return {"path": KERNELS, "summary": _SUMMARIES["kernels"], "why": why}
    return {"path": f"{SDPA}+{KERNELS}", "summary": _SUMMARIES[mode], "why": why}
