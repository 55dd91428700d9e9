"""Where the kernels cannot run, hf_flash models fall back with one warning and give eager's result."""

import warnings

import pytest
import torch
from _tiny import DEVICE, HAS_CUDA, make_model, pad_batch, positions, tokens
from conftest import assert_close_rel

from hf_flash import fallback
from hf_flash.integrations import transformers as integration

pytestmark = pytest.mark.usefixtures("fresh_fallback_warnings")


def _fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, fallback.FallbackWarning)]


def _padded_inputs():
    ids, mask = pad_batch([tokens(1, 10, seed=1)[0], tokens(1, 6, seed=2)[0]], "left")
    return ids, {"attention_mask": mask, "position_ids": positions(mask)}, mask.bool()


@pytest.mark.skipif(HAS_CUDA, reason="simulates a machine without GPU and without the Triton interpreter")
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_no_gpu_falls_back_to_sdpa_once_and_matches_eager(family, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours = make_model(family, "hf_flash", dtype=torch.float16)
    eager = make_model(family, "eager", dtype=torch.float16)
    ref = make_model(family, "eager", dtype=torch.float32)
    ids, kw, real = _padded_inputs()
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        out = ours(ids, **kw).logits
        ours(ids, **kw)
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "TRITON_INTERPRET" in messages[0] and "SDPA" in messages[0], messages
    with torch.no_grad():
        expected, baseline = ref(ids, **kw).logits[real], eager(ids, **kw).logits[real]
    assert_close_rel(f"{family} SDPA fallback", out[real], expected, baseline, 2, eps=1e-3)


def test_fp32_model_falls_back_with_a_warning_and_matches_eager():
    ours = make_model("mistral", "hf_flash", dtype=torch.float32)
    eager = make_model("mistral", "eager", dtype=torch.float32)
    ids, kw, real = _padded_inputs()
    with pytest.warns(fallback.FallbackWarning, match="float32"), torch.no_grad():
        out = ours(ids, **kw).logits
    with torch.no_grad():
        torch.testing.assert_close(out[real], eager(ids, **kw).logits[real], atol=2e-4, rtol=2e-4)


def test_fp32_inputs_run_in_the_autocast_dtype_without_fallback():
    """peft upcasting / autocast over fp32 weights: inputs are cast to the compute dtype, like Transformers."""
    if not HAS_CUDA:
        pytest.skip("CPU autocast is bf16, which the Triton interpreter computes wrongly")
    ours = make_model("llama", "hf_flash", dtype=torch.float32)
    with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        warnings.simplefilter("error", fallback.FallbackWarning)
        ours(tokens(2, 16))


def test_strict_mode_turns_the_fallback_into_an_error(monkeypatch):
    monkeypatch.setenv("HF_FLASH_STRICT", "1")
    ours = make_model("llama", "hf_flash", dtype=torch.float32)
    with pytest.raises(fallback.FallbackError, match="float32"), torch.no_grad():
        ours(tokens(1, 6))


def test_output_attentions_falls_back_to_eager_and_returns_weights():
    ours = make_model("llama", "hf_flash")
    eager = make_model("llama", "eager")
    ids, kw, _ = _padded_inputs()
    with pytest.warns(fallback.FallbackWarning, match="output_attentions"), torch.no_grad():
        out = ours(ids, output_attentions=True, **kw)
    with torch.no_grad():
        expected = eager(ids, output_attentions=True, **kw)
    assert out.attentions is not None and len(out.attentions) == 2
    for got, want in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.logits, expected.logits, atol=2e-3, rtol=2e-3)


def test_unknown_kwarg_is_never_dropped_silently():
    model = make_model("llama", "hf_flash")
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16, device=DEVICE, dtype=model.dtype)
    k = v = torch.randn(1, 2, 5, 16, device=DEVICE, dtype=model.dtype)
    with pytest.warns(fallback.FallbackWarning, match="some_new_option"):
        out, _ = integration.hf_flash_attention_forward(attention, q, k, v, None, some_new_option=3)
    assert out.shape == (1, 5, 4, 16)
