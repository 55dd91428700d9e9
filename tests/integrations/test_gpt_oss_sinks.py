"""Attention sinks (``s_aux``) through the integration: a tiny gpt-oss against eager attention.

gpt-oss passes its learned sinks as ``s_aux`` on every layer; the tiny model alternates a window-4 layer and a
full one, with GQA (4 query heads, 2 KV heads) and a small MoE. Every route is covered: plain, padded
(varlen), packed, decode with a cache. No call may fall back (a FallbackWarning fails the test).
"""

import warnings

import pytest
import torch
from _tiny import DTYPE, greedy_equal_up_to_ties, make_model, models, pad_batch, positions, tokens
from conftest import assert_close_rel
from test_models import check, check_packed_batch, check_padded_batch

from hf_flash import fallback

pytestmark = pytest.mark.usefixtures("fresh_fallback_warnings")


def _set_sinks(model, seed: int) -> None:
    """Sinks of a few units (the init gives ~0.2), the same in every model built with ``seed``, so that a
    sink that is dropped or misapplied shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        sinks = layer.self_attn.sinks
        with torch.no_grad():
            sinks.copy_(2 * torch.randn(sinks.shape, generator=generator))


def gpt_oss_models(seed: int = 0):
    """(hf_flash fp16, eager fp16, eager fp32), as ``_tiny.models``."""
    triple = models("gpt_oss", seed=seed)
    for model in triple:
        _set_sinks(model, seed)
    return triple


@pytest.fixture
def strict():
    """Any FallbackWarning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", fallback.FallbackWarning)
        yield


def test_the_tiny_gpt_oss_has_a_window_layer_a_full_layer_and_gqa():
    attention = [layer.self_attn for layer in gpt_oss_models()[0].model.layers]
    assert [a.sliding_window for a in attention] == [4, None]
    assert attention[0].num_key_value_groups == 2


def test_logits_match_eager(strict):
    ours, eager, ref = gpt_oss_models()
    ids = tokens(2, 13)
    with torch.no_grad():
        check("gpt-oss logits", ours(ids).logits, ref(ids).logits, eager(ids).logits)


def _attention_grads(model, ids, mask):
    """Gradients of every attention parameter (sinks, q/k/v/o weights and biases) for the LM loss."""
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if ".self_attn." in name}
    assert all(g is not None for g in grads.values())
    return grads


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "right-padded"])
def test_sink_and_projection_gradients_match_eager(padded, strict):
    ours, eager, ref = gpt_oss_models()
    if padded:
        ids, mask = pad_batch([tokens(1, 12, seed=14)[0], tokens(1, 7, seed=15)[0]], "right")
    else:
        ids = tokens(2, 12, seed=14)
        mask = torch.ones_like(ids)
    grads_ours, grads_eager, grads_ref = (_attention_grads(m, ids, mask) for m in (ours, eager, ref))
    assert any(name.endswith("sinks") for name in grads_ref) and any("o_proj" in name for name in grads_ref)
    for name, ref_grad in grads_ref.items():
        if name.endswith("sinks"):
            # H numbers, each summed over every row of the batch: the largest of so few errors can be near 0 for
            # eager by luck (seen: 1 ulp against our 4), so the floor is a few half-precision ulps of their size
            eps = 8 * torch.finfo(DTYPE).eps * ref_grad.abs().max().item()
            assert_close_rel(f"gpt-oss grad {name}", grads_ours[name], ref_grad, grads_eager[name], 3, eps=eps)
        else:
            check(f"gpt-oss grad {name}", grads_ours[name], ref_grad, grads_eager[name], factor=3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(side, strict):
    check_padded_batch("gpt-oss", gpt_oss_models(), side)


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
def test_packed_batch_equals_sequences_alone(source, strict):
    check_packed_batch("gpt-oss", gpt_oss_models(), source)


def test_padded_generate_matches_eager(strict):
    """Prefill of a left-padded batch, then decode steps against the cache (one query per row, the window
    layer's keys past the window hidden)."""
    ours, eager, ref = gpt_oss_models()
    ids, mask = pad_batch([tokens(1, 9, seed=8)[0], tokens(1, 5, seed=9)[0]], "left")
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out_ours, out_eager = ours.generate(ids, **kwargs), eager.generate(ids, **kwargs)
    greedy_equal_up_to_ties(out_ours, out_eager, ref, mask)


def test_fp32_model_runs_sinks_through_the_sdpa_fallback():
    """Where the kernels cannot run (fp32 weights), the SDPA fallback honours the sinks too."""
    ours = make_model("gpt_oss", "hf_flash", dtype=torch.float32)
    eager = make_model("gpt_oss", "eager", dtype=torch.float32)
    _set_sinks(ours, 0)
    _set_sinks(eager, 0)
    ids, mask = pad_batch([tokens(1, 10, seed=1)[0], tokens(1, 6, seed=2)[0]], "left")
    kw = {"attention_mask": mask, "position_ids": positions(mask)}
    with pytest.warns(fallback.FallbackWarning, match="float32") as record, torch.no_grad():
        out = ours(ids, **kw).logits
    assert not any("eager" in str(w.message) for w in record)
    with torch.no_grad():
        torch.testing.assert_close(out[mask.bool()], eager(ids, **kw).logits[mask.bool()], atol=2e-4, rtol=2e-4)


def test_output_attentions_falls_back_to_eager_with_the_sinks():
    """The eager fallback (here for the attention weights) gets ``s_aux`` too."""
    ours, eager, _ = gpt_oss_models()
    ids = tokens(1, 9)
    with pytest.warns(fallback.FallbackWarning, match="output_attentions"), torch.no_grad():
        out = ours(ids, output_attentions=True)
    with torch.no_grad():
        expected = eager(ids, output_attentions=True)
    for got, want in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.logits, expected.logits, atol=2e-3, rtol=2e-3)

