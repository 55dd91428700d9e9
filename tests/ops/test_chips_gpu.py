"""Each chip's tile table run on the GPU at hand: ``config.force_arch`` puts a chip's tiles (and its
limits, e.g. no bfloat16 on a T4) on this GPU, and the results are compared against the fp32 reference.
The cross-compiled checks of the same tables (shared memory, spills; no GPU needed) are in
``test_chips.py``."""

from __future__ import annotations

import pytest
from test_chips import TARGETS

GPU_SHAPES = [  # (batch, seqlen_q, seqlen_k, heads, kv heads, head dim, causal)
    (2, 113, 203, 4, 2, 64, True),
    (1, 255, 255, 2, 2, 128, False),
    (2, 97, 65, 4, 1, 256, True),
    (1, 130, 257, 2, 2, 80, False),
]


@pytest.fixture
def forced(request):
    from hf_flash.ops import config

    previous = config.force_arch(request.param)
    yield request.param
    config.force_arch(previous)


def _shape_id(shape):
    b, lq, lk, h, hk, d, causal = shape
    return f"B{b}-Lq{lq}-Lk{lk}-H{h}/{hk}-D{d}" + ("-causal" if causal else "")


def _assert_matches_reference(label, attn, ref, q, k, v, monkeypatch):
    """``attn(q, k, v, deterministic)`` against ``ref(q, k, v, upcast)``: the output within 2x and the
    gradients within 3x of PyTorch's own fp16 error, once with dQ added by atomics inside the dK/dV kernel
    (at every head dim, not only above 128 where the launcher picks it) and once from the dQ kernel, so
    all three of the chip's backward tiles run."""
    import torch
    from conftest import assert_close_rel

    from hf_flash.ops import function

    dout = torch.randn_like(q)
    expected, baseline = ref(q, k, v, True), ref(q, k, v, False)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    baseline_grads = torch.autograd.grad(baseline, (q, k, v), dout)
    monkeypatch.setattr(function, "ATOMIC_DQ_MIN_HEAD_DIM", 0)
    for deterministic in (False, True):
        out = attn(q, k, v, deterministic)
        assert_close_rel(f"{label} out", out, expected, baseline, 2)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        for name, ours, r, b in zip(("dq", "dk", "dv"), grads, expected_grads, baseline_grads):
            assert_close_rel(f"{label} {name} deterministic={deterministic}", ours, r, b, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("forced", list(TARGETS), indirect=True)
def test_chip_tiles_match_reference_on_this_gpu(forced, shape, monkeypatch):
    import torch

    from hf_flash import flash_attn_func
    from hf_flash.ops import config
    from hf_flash.ops.reference import attention_ref

    b, lq, lk, h, hk, d, causal = shape
    device = torch.device("cuda")
    table = config.table_for(config.parse_arch(forced))
    assert config.forward_config(d, device) == table.config("fwd", d)
    assert config.backward_config(d, device) == (table.config("dkdv", d), table.config("dq", d))
    torch.manual_seed(0)
    q = torch.randn(b, lq, h, d, device=device, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(b, lk, hk, d, device=device, dtype=torch.float16, requires_grad=True) for _ in range(2))
    _assert_matches_reference(
        f"{forced} {_shape_id(shape)}",
        lambda q, k, v, det: flash_attn_func(q, k, v, causal=causal, deterministic=det),
        lambda q, k, v, upcast: attention_ref(q, k, v, causal=causal, upcast=upcast),
        q, k, v, monkeypatch,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("forced", list(TARGETS), indirect=True)
def test_chip_tiles_varlen_window_softcap_on_this_gpu(forced, monkeypatch):
    import torch

    from hf_flash import flash_attn_varlen_func
    from hf_flash.ops.reference import attention_ref_varlen

    device = torch.device("cuda")
    lens_q, lens_k = [37, 0, 130, 64], [70, 5, 130, 97]
    cu_q = torch.tensor([0, *lens_q], device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lens_k], device=device).cumsum(0).to(torch.int32)
    torch.manual_seed(1)
    q = torch.randn(sum(lens_q), 4, 128, device=device, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 128, device=device, dtype=torch.float16, requires_grad=True) for _ in range(2))
    options = {"causal": True, "window_size": (40, 0), "softcap": 20.0}
    _assert_matches_reference(
        f"{forced} varlen",
        lambda q, k, v, det: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                    deterministic=det, **options),
        lambda q, k, v, upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, upcast=upcast, **options),
        q, k, v, monkeypatch,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("forced", ["sm75"], indirect=True)
def test_bf16_on_sm75_warns_once_and_falls_back(forced, monkeypatch):
    """A T4 has no bfloat16: the Transformers integration runs SDPA instead, with one warning."""
    import warnings

    import torch

    from hf_flash import fallback
    from hf_flash.integrations.transformers import hf_flash_attention_forward
    from hf_flash.ops.reference import attention_ref

    monkeypatch.delenv("HF_FLASH_STRICT", raising=False)
    fallback.reset_warnings()
    layer = torch.nn.Module()
    layer.is_causal, layer.training = True, False
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 50, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))  # [B, H, L, D]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = hf_flash_attention_forward(layer, q, k, v, None)
        hf_flash_attention_forward(layer, q, k, v, None)
    messages = [str(w.message) for w in record if issubclass(w.category, fallback.FallbackWarning)]
    fallback.reset_warnings()
    assert len(messages) == 1 and "bfloat16" in messages[0] and "SDPA" in messages[0], messages
    expected = attention_ref(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


