"""The causal-LM training loss without the ``[tokens, vocab]`` logits, and its hook into the Trainer.

Why: at long context the loss, not attention, holds the memory. Llama-3.2-1B at 32k tokens: logits
``[32768, 128256]`` are 8.4 GB in bf16 and 16.8 GB once upcast to fp32 for cross-entropy, and the
log-softmax and the gradient add copies of that size (51.7 GiB peak with any attention backend).

How (``--loss chunked``, the default): the model runs its own forward (through PEFT, DDP or FSDP, gradient
checkpointing), but a forward pre-hook on its output layer (``get_output_embeddings()``, the lm_head)
keeps that layer's input, the final hidden states, and hands the layer an empty slice instead, so no
logits are made. The loss is then computed over chunks of tokens: per chunk the output *module* (a
LoRA-wrapped or biased head works), the model's soft-cap if it has one, an fp32 log-sum-exp, and at
once the gradient of the chunk's summed loss with respect to its hidden states and the head's trainable
parameters. That gradient is kept (``[tokens, hidden]``, what backward would produce anyway) and scaled by
the incoming gradient in backward, so the head's matmul runs twice per token as in the plain loss,
not three times as a recomputation in backward would (see :class:`_ChunkedLinearCrossEntropy`).
``--loss liger`` sends the same rows to Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` instead;
``--loss plain`` is the model's own loss.

The loss is Transformers' ``ForCausalLMLoss`` (4.56 and 5.x): position i is scored against ``labels[i + 1]``
(or against ``shift_labels[i]`` when a collator provides them), -100 is ignored, and the sum is divided
by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), else by the number of scored
targets. Padding (-100 on pads) and packing (-100 at each sequence start) need nothing more; rows
without a target skip the head altogether.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_flash.fallback import warn_once

from .data import IGNORE_INDEX

LOSSES = ("auto", "chunked", "liger", "plain")
# auto: Liger's fused linear cross-entropy where it runs (liger-kernel installed, CUDA, a plain Linear head),
# else the chunked PyTorch loss. On an H100 (Llama-3.2-1B, 2026-12-06) both hold 11.83 GiB at 32k tokens
# against 51.72 for the plain loss; Liger ran 3% faster there (17,225 vs 16,745 tokens/s) and 0.2% at 8k.
DEFAULT_LOSS = "auto"
CHUNK_BYTES = 1 << 30  # one chunk's fp32 logits; the chunk's peak is about twice that (bf16 logits, fp32, bf16 grad)

# Config fields that change the logits after the output layer in ways this loss does not reproduce (Cohere,
# Granite, Muse), or that make the model add a term to its loss (MoE router balancing); such models keep
# their own loss. `final_logit_softcapping` (Gemma 2/3) is reproduced exactly.
_LOGIT_CHANGES = ("logit_scale", "logits_scaling", "output_multiplier")


class LossFallbackWarning(UserWarning):
    """The chunked (or Liger) loss cannot serve this model or these tensors; the message says what runs instead."""


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk whose fp32 logits fit :data:`CHUNK_BYTES` (1 GiB): 2048 for Llama 3's 128256 entries,
    8192 for a 32768 vocabulary; a multiple of 128 (matmul tiles), at least 128."""
    return max(128, CHUNK_BYTES // (4 * vocab_size) // 128 * 128)


def _sum_and_grad(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool):
    """Summed cross-entropy of ``logits`` ``[c, V]`` (any float dtype, computed in fp32) against ``targets``
    ``[c]``, and its gradient ``softmax - one_hot`` in the logits' dtype (None unless ``want_grad``)."""
    # logsumexp's own steps, done in place in one fp32 copy: torch.logsumexp would allocate a second [c, V]
    logits32 = logits.to(torch.float32, copy=True)  # [c, V]
    picked = logits32.gather(1, targets[:, None]).squeeze(1)  # [c]
    top = logits32.amax(dim=-1, keepdim=True)  # [c, 1]
    exps = logits32.sub_(top).exp_()  # [c, V], overwrites logits32
    sums = exps.sum(dim=-1, keepdim=True)  # [c, 1]
    loss = (sums.log() + top - picked[:, None]).sum()
    if not want_grad:
        return loss, None
    probs = exps.div_(sums)
    probs.scatter_add_(1, targets[:, None], probs.new_full((targets.shape[0], 1), -1.0))
    # Left unscaled by 1/N: (p - y) stays within [-1, 1], where fp16 keeps it; 1/N and the loss scale of
    # fp16 training come with the incoming gradient in backward.
    return loss, probs.to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(head(hidden[i]), targets[i])`` over chunks of rows; the forward also makes the gradients.

    hidden ``[N, H]`` (scored rows only), targets ``[N]`` int64, ``head`` ``[c, H] -> [c, V]`` (module + soft-cap),
    params: the head's trainable parameters (inputs here so autograd routes their gradients).

    Per chunk: logits ``[c, V]`` in the head's dtype, their fp32 copy turned into ``softmax - one_hot`` in
    place, that cast back, and ``autograd.grad`` through the head gives ``d sum / d rows`` (and the
    parameters'): about 8·c·V bytes at the peak (bf16 logits, their fp32 copy, the bf16 gradient), nothing of
    size V kept. Recomputing the logits in backward instead (``torch.utils.checkpoint`` per chunk) keeps
    nothing either, but costs a third head matmul per token (estimated ~2% of a 1B step at 8k) and holds more
    in backward (bf16 and fp32 logits, log-softmax, its gradient): 0.38 against 0.32 GiB, 2.9x the time, on
    the CPU (benchmarks/LOSS.md). The kept gradient ``[N, H]`` is what that backward would allocate anyway.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk, *params):
        want = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if want[0] else None  # [N, H]
        grad_params = [torch.zeros_like(p, dtype=torch.float32) if w else None for p, w in zip(params, want[4:])]
        wrt = [p for p, g in zip(params, grad_params) if g is not None]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start : start + chunk].detach().requires_grad_(want[0])  # [c, H]
            with torch.enable_grad():
                logits = head(rows)  # [c, V]
            loss, grad_logits = _sum_and_grad(logits.detach(), targets[start : start + chunk], logits.requires_grad)
            total += loss
            if grad_logits is None:
                continue
            grads = torch.autograd.grad(logits, ([rows] if want[0] else []) + wrt, grad_logits)
            if want[0]:
                grad_hidden[start : start + chunk] = grads[0]
                grads = grads[1:]
            for accumulated, grad in zip([g for g in grad_params if g is not None], grads):
                accumulated += grad
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.param_dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, *grad_params = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total
        grad_params = [None if g is None else (g * grad_total).to(d) for g, d in zip(grad_params, ctx.param_dtypes)]
        return grad_hidden, None, None, None, *grad_params


def liger_unavailable_reason(head: torch.nn.Module, device: torch.device) -> str | None:
    """None when Liger-Kernel's fused linear cross-entropy can take this head on ``device``, else why not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if not isinstance(head, torch.nn.Linear):
        return f"the output layer is a {type(head).__name__}, and Liger takes a plain nn.Linear's weight and bias"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Liger's Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1)"
    return None


def auto_impl(head: torch.nn.Module, device: torch.device) -> str:
    """What ``--loss auto`` runs: "liger" on a CUDA device when Liger can take the head, else "chunked" (also
    on CPU under the interpreter, where Liger would run but slowly)."""
    return "liger" if device.type == "cuda" and liger_unavailable_reason(head, device) is None else "chunked"


def _liger_sum(hidden, targets, head: torch.nn.Linear, softcap: float | None):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
    return loss(head.weight, hidden, targets, head.bias)


def _vocab_size(head: torch.nn.Module) -> int:
    return getattr(head, "out_features", None) or head.weight.shape[0]


def _softcapped(head: torch.nn.Module, softcap: float, hidden: torch.Tensor) -> torch.Tensor:
    # The same three steps as Gemma 2/3, in the logits' dtype, so that the result is bit for bit theirs.
    logits = head(hidden) / softcap
    return torch.tanh(logits) * softcap


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
    impl: str = "chunked",
) -> torch.Tensor:
    """Transformers' causal-LM loss of ``head(hidden)``, never holding more than one chunk of logits.

    hidden: ``[B, L, H]`` (or ``[T, H]``) final hidden states, what the model feeds its output layer;
    head: the output layer (``[.., H] -> [.., V]``), called on ``[c, H]`` chunks;
    labels: ``[B, L]``, position i is scored against ``labels[i + 1]``; or shift_labels ``[B, L]`` already aligned;
    num_items_in_batch: the divisor the Trainer passes under gradient accumulation; None: the number of scored targets;
    softcap: ``softcap * tanh(logits / softcap)`` before the loss (Gemma's ``final_logit_softcapping``);
    chunk_tokens: rows per chunk (default :func:`default_chunk_tokens`); impl: "chunked" or "liger".
    Returns a 0-dim fp32 loss (NaN when nothing is scored and there is no divisor, as in Transformers).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)  # [T]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [N]
    if keep.numel() < targets.numel():  # prompts, pads, sequence starts: no logits at all for them
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    call = head if softcap is None else functools.partial(_softcapped, head, softcap)
    if keep.numel() == 0:  # logits of no row: a zero loss that still gives every parameter its (zero) gradient
        total = call(hidden).float().sum()
    elif impl == "liger":
        total = _liger_sum(hidden, targets, head, softcap)
    else:
        params = [p for p in head.parameters() if p.requires_grad]
        chunk = chunk_tokens or default_chunk_tokens(_vocab_size(head))
        total = _ChunkedLinearCrossEntropy.apply(hidden, targets, call, chunk, *params)
    if num_items_in_batch is None:
        return total / keep.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _base_model(model):
    """The transformers model under a PEFT wrapper (itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunked_unavailable_reason(model) -> str | None:
    """None when the model's training loss is ForCausalLMLoss of its output layer's logits (soft-capped or
    not), which :func:`linear_cross_entropy` reproduces; else why not."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = _base_model(model)
    name = type(base).__name__
    if getattr(base, "get_output_embeddings", lambda: None)() is None:
        return f"{name} has no output layer (get_output_embeddings() is None)"
    own = getattr(base, "loss_function", ForCausalLMLoss)
    if own is not ForCausalLMLoss:
        return f"{name}'s loss is {getattr(own, '__name__', own)}, not Transformers' ForCausalLMLoss"
    config = base.config.get_text_config()
    for field in _LOGIT_CHANGES:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            return f"{name} scales its logits after the output layer (config.{field} = {value})"
    if getattr(config, "output_router_logits", False):
        return f"{name} adds the router's load-balancing loss to the loss (config.output_router_logits = True)"
    return None


def _keep_hidden(kept: dict, module, args):
    """Forward pre-hook of the output layer: keep its input (and the autocast state it runs under), pass on none of it."""
    hidden = args[0]
    kind = hidden.device.type
    kept["hidden"] = hidden
    kept["autocast"] = {"device_type": kind, "dtype": torch.get_autocast_dtype(kind),
                        "enabled": torch.is_autocast_enabled(kind)}  # fmt: skip
    return (hidden[..., :0, :], *args[1:])  # [B, 0, H]: logits of no token


@dataclass
class LossPlan:
    """How the Trainer computes one model's training loss; :meth:`for_model` decides, calling it computes.

    impl: what runs ("chunked", "liger" or "plain"); note: why a requested loss does not run ("" when it does).
    """

    impl: str
    head: torch.nn.Module | None = None
    softcap: float | None = None
    chunk_tokens: int | None = None
    offload_activations: bool = False
    note: str = ""

    @classmethod
    def for_model(cls, model, requested: str = DEFAULT_LOSS, chunk_tokens: int | None = None,
                  offload_activations: bool = False) -> LossPlan:  # fmt: skip
        """The plan for ``model`` (PEFT-wrapped or not, not yet wrapped by DDP/FSDP); falls back with one warning."""
        if requested not in LOSSES:
            raise ValueError(f"unknown loss {requested!r}; choose one of {', '.join(LOSSES)}")
        if requested == "plain":
            return cls("plain", offload_activations=offload_activations)
        reason = _chunked_unavailable_reason(model)
        if reason:
            warn_once(f"loss:{reason}", f"hf_flash: the {requested} loss runs as the model's own loss: {reason}",
                      LossFallbackWarning)  # fmt: skip
            return cls("plain", offload_activations=offload_activations, note=reason)
        base = _base_model(model)
        head, note = base.get_output_embeddings(), ""
        if requested == "auto":  # no warning: the chunked loss is a full answer where Liger cannot run
            requested = auto_impl(head, next(base.parameters()).device)
        elif requested == "liger":
            note = liger_unavailable_reason(head, next(base.parameters()).device) or ""
            if note:
                warn_once(f"loss:{note}", f"hf_flash: the chunked PyTorch loss runs instead of Liger's: {note}",
                          LossFallbackWarning)  # fmt: skip
                requested = "chunked"
        softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        return cls(requested, head, softcap, chunk_tokens, offload_activations, note)

    def describe(self) -> str:
        """One line for the log: what runs, and why not what was asked."""
        text = self.impl
        if self.impl == "chunked":
            text += f" ({self.chunk_tokens or default_chunk_tokens(_vocab_size(self.head))} tokens a chunk)"
        if self.offload_activations:
            text += ", activations offloaded to CPU"
        return text + (f" [{self.note}]" if self.note else "")

    def _offload(self):
        # Every tensor autograd saves in this context goes to pinned CPU memory and comes back in backward:
        # with gradient checkpointing, the layer inputs it keeps; without, every activation.
        return (
            torch.autograd.graph.save_on_cpu(pin_memory=True) if self.offload_activations else contextlib.nullcontext()
        )

    def __call__(self, model, **inputs):
        """Stands in for ``model(**inputs)`` in ``Trainer.compute_loss``: returns ``{"loss": ...}`` (plain: the
        model's own output). Pops ``labels``, ``shift_labels`` and ``num_items_in_batch`` for the loss."""
        with self._offload():
            if self.impl == "plain":
                return model(**inputs)
            labels, shift_labels = inputs.pop("labels"), inputs.pop("shift_labels", None)
            num_items_in_batch = inputs.pop("num_items_in_batch", None)
            kept = {}
            handle = self.head.register_forward_pre_hook(functools.partial(_keep_hidden, kept))
            try:
                model(**inputs)  # its logits cover no token; nothing else of its output is needed
            finally:
                handle.remove()
        # Outside the offload context: the loss saves only the [tokens, hidden] gradient, the first thing
        # backward needs; offloading it would add two copies and lower no peak.
        with torch.autocast(**kept["autocast"]):
            loss = linear_cross_entropy(kept["hidden"], self.head, labels, shift_labels=shift_labels,
                                        num_items_in_batch=num_items_in_batch, softcap=self.softcap,
                                        chunk_tokens=self.chunk_tokens, impl=self.impl)  # fmt: skip
        return {"loss": loss}


class LossTrainerMixin:
    """Put before ``transformers.Trainer`` in a subclass's bases: training steps compute the loss through
    ``self.loss_plan`` (unset: the Trainer's own behaviour).

    The Trainer's own ``compute_loss`` still runs, with the plan standing in for the model: each release's
    handling of ``num_items_in_batch`` (counted with or without the shifted-out first label: 4.56 vs 5.x) and
    of token averaging across processes stays Transformers'. Evaluation, a label smoother or a
    ``compute_loss_func`` keep the model's own loss.
    """

    loss_plan: LossPlan | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        plan = self.loss_plan
        if not (plan is None or return_outputs or not model.training or "labels" not in inputs
                or self.label_smoother is not None or self.compute_loss_func is not None):  # fmt: skip
            model = functools.partial(plan, model)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch, **kwargs)  # fmt: skip
