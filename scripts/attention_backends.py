"""The attention backends that scripts/bench_attention.py times: for each, a builder that makes the backend's inputs
in its native layout and returns a callable for its forward.

A builder takes a ``Shape`` and returns ``(forward, [q, k, v], dout)``: ``forward()`` runs one forward and returns
the output; q, k, v require grad; dout, shaped like the output, is what the runner hands to ``out.backward``.
Layouts, each contiguous, H query heads and H_k key/value heads:

    dense, SDPA / Flex / eager:    q, dout [B, H, L, D];  k, v [B, H_k, L, D]
    dense, hf_flash / flash-attn:  q, dout [B, L, H, D];  k, v [B, L, H_k, D]
    varlen, every backend:         q, dout [total, H, D]; k, v [total, H_k, D], the sequences of Shape.lengths packed
                                   one after another (cu_seqlens [n + 1] int32; Flex views them as [1, H, total, D])

``backend_builders(varlen)`` maps a backend's name to its builder; ``unavailable_backends()`` names those that
cannot run here and why. The runner imports this module, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEVICE = "cuda"
DENSE_BACKENDS = ("hf_flash", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "eager", "flash_attn")
VARLEN_BACKENDS = ("hf_flash", "flash_attn", "flex", "sdpa_njt")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Shape:
    """One case of the grid: the builders make its inputs; the runner labels its rows and counts its FLOPs."""

    dtype: str
    head_dim: int
    causal: bool
    seqlen: int  # longest sequence (varlen: of the mix)
    batch: int
    nheads: int
    nheads_k: int
    lengths: list[int] = field(default_factory=list)  # varlen only: the mix of sequence lengths

    @property
    def kind(self):
        return "varlen" if self.lengths else ("gqa" if self.nheads_k != self.nheads else "mha")

    @property
    def label(self):
        heads = f"H{self.nheads}" + (f"/{self.nheads_k}" if self.nheads_k != self.nheads else "")
        size = f"{len(self.lengths)} seqs <= {self.seqlen}" if self.lengths else f"B{self.batch} L{self.seqlen}"
        return f"{self.kind} {self.dtype} D{self.head_dim} {'causal' if self.causal else 'full'} {size} {heads}"

    def fwd_flops(self):
        squares = sum(n * n for n in self.lengths) if self.lengths else self.batch * self.seqlen**2
        return 4 * self.nheads * squares * self.head_dim / (2 if self.causal else 1)


# ---- each backend: make its inputs in its native layout and return a callable for the forward ----


def _dense_inputs(shape, layout, device=None):
    """q, k, v contiguous in ``layout`` ("bhld" or "blhd"), requiring grad, and a matching dout."""
    dtype, device = DTYPES[shape.dtype], device or DEVICE
    gen = torch.Generator(device=device).manual_seed(0)

    def make(heads):
        dims = (
            (shape.batch, heads, shape.seqlen, shape.head_dim)
            if layout == "bhld"
            else (shape.batch, shape.seqlen, heads, shape.head_dim)
        )
        return torch.randn(*dims, generator=gen, device=device, dtype=dtype)

    q, k, v = make(shape.nheads), make(shape.nheads_k), make(shape.nheads_k)
    return [t.requires_grad_() for t in (q, k, v)], make(shape.nheads)


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend_name]

    def build(shape):
        inputs, dout = _dense_inputs(shape, "bhld")
        gqa = {"enable_gqa": True} if shape.nheads_k != shape.nheads else {}

        def forward():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*inputs, is_causal=shape.causal, **gqa)

        return forward, inputs, dout

    return build


def _eager(shape):
    inputs, dout = _dense_inputs(shape, "bhld")
    q, k, v = inputs
    group = shape.nheads // shape.nheads_k
    mask = torch.ones(shape.seqlen, shape.seqlen, dtype=torch.bool, device=DEVICE).tril() if shape.causal else None

    def forward():
        kk, vv = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) if group > 1 else (k, v)
        scores = (q @ kk.transpose(-1, -2)) * shape.head_dim**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ vv

    return forward, inputs, dout


_FLEX = {}


def _flex_fn(dynamic=False):
    """flex_attention compiled once per shape (static, as its users run it), unless --flex-dynamic."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # every shape is a recompile; past dynamo's limit (8) flex would silently fall back to eager
        for knob in (
            "cache_size_limit",
            "recompile_limit",
            "accumulated_cache_size_limit",
            "accumulated_recompile_limit",
        ):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 1024))
        # the backward is timed by replaying one saved graph (retain_graph=True); compiled backwards
        # that donate their buffers refuse that, so donation is turned off for the benchmark
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=dynamic)
    return _FLEX["fn"]


def _flex(shape):
    from torch.nn.attention.flex_attention import create_block_mask

    inputs, dout = _dense_inputs(shape, "bhld")
    block_mask = None
    if shape.causal:
        block_mask = create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, shape.seqlen, shape.seqlen, device=DEVICE
        )
    gqa = shape.nheads_k != shape.nheads
    flex = _flex_fn(_FLEX.get("dynamic", False))
    return lambda: flex(*inputs, block_mask=block_mask, enable_gqa=gqa), inputs, dout


def _blhd(module_name):
    """hf_flash or flash-attn, which share flash-attn 2's API and [B, L, H, D] layout."""

    def build(shape):
        mod = __import__(module_name)
        inputs, dout = _dense_inputs(shape, "blhd")
        return lambda: mod.flash_attn_func(*inputs, causal=shape.causal), inputs, dout

    return build


# ---- varlen: one packed batch of mixed lengths ----


def _packed_inputs(shape):
    total = sum(shape.lengths)
    dtype = DTYPES[shape.dtype]
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def make(heads):
        return torch.randn(total, heads, shape.head_dim, generator=gen, device=DEVICE, dtype=dtype)

    q, k, v = make(shape.nheads), make(shape.nheads_k), make(shape.nheads_k)
    cu = torch.tensor([0] + shape.lengths, device=DEVICE).cumsum(0).to(torch.int32)
    return [t.requires_grad_() for t in (q, k, v)], make(shape.nheads), cu


def _varlen_blhd(module_name):
    def build(shape):
        mod = __import__(module_name)
        inputs, dout, cu = _packed_inputs(shape)
        longest = max(shape.lengths)
        return (
            lambda: mod.flash_attn_varlen_func(*inputs, cu, cu, longest, longest, causal=shape.causal),
            inputs,
            dout,
        )

    return build


def _varlen_flex(shape):
    """Documents as a block mask over one packed sequence [1, H, total, D]."""
    from torch.nn.attention.flex_attention import create_block_mask

    inputs, dout, cu = _packed_inputs(shape)
    total = cu[-1].item()
    doc = torch.repeat_interleave(
        torch.arange(len(shape.lengths), device=DEVICE), torch.tensor(shape.lengths, device=DEVICE)
    )

    def same_doc(b, h, q_idx, kv_idx):
        keep = doc[q_idx] == doc[kv_idx]
        return keep & (q_idx >= kv_idx) if shape.causal else keep

    block_mask = create_block_mask(same_doc, None, None, total, total, device=DEVICE)
    flex, gqa = _flex_fn(_FLEX.get("dynamic", False)), shape.nheads_k != shape.nheads

    def forward():
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in inputs)  # views: [1, H, total, D]
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)[0].transpose(0, 1)

    return forward, inputs, dout


def _varlen_sdpa_njt(shape):
    """SDPA on nested (jagged) tensors, whichever fused backend SDPA picks."""
    inputs, dout, cu = _packed_inputs(shape)
    offsets = cu.long()

    def forward():
        q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in inputs)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal)
        return out.transpose(1, 2).values()

    return forward, inputs, dout


def backend_builders(varlen):
    if varlen:
        return {
            "hf_flash": _varlen_blhd("hf_flash"),
            "flash_attn": _varlen_blhd("flash_attn"),
            "flex": _varlen_flex,
            "sdpa_njt": _varlen_sdpa_njt,
        }
    builders = {"hf_flash": _blhd("hf_flash"), "flex": _flex, "eager": _eager, "flash_attn": _blhd("flash_attn")}
    builders.update({name: _sdpa(name) for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")})
    return builders


def unavailable_backends():
    """name -> why it is skipped in this environment."""
    notes = {}
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        notes["flash_attn"] = f"flash-attn not installed ({err.msg})"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        notes["flex"] = f"FlexAttention needs torch >= 2.5 (have {torch.__version__})"
    if not torch.backends.cudnn.is_available():
        notes["sdpa_cudnn"] = "cuDNN not available"
    return notes
