"""Padded batches run through the whole decoder packed (hf_flash.integrations.padding_free): the layers see one
packed row, the caller sees the padded shapes, and the real tokens' outputs and gradients are those of the
per-layer path (HF_FLASH_PADDING_FREE=0), which the other integration tests hold to eager."""

from __future__ import annotations

import pytest
import torch
from _tiny import FAMILIES, OTHER_FAMILIES, make_model, pad_batch, tokens

from hf_flash.integrations import padding_free

LENGTHS = (5, 11, 17)


def _batch(side: str = "right"):
    return pad_batch([tokens(1, n, seed=n)[0] for n in LENGTHS], side)


def _layer_inputs(model, **call):
    """Shapes of what the first decoder layer received, and the model's output."""
    shapes = []
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        output = model(**call)
    finally:
        handle.remove()
    return shapes, output


@pytest.fixture
def per_layer(monkeypatch):
    """Run a callable with padding-free off (the per-layer unpadding inside attention only)."""

    def run(fn):
        with monkeypatch.context() as patch:
            patch.setenv(padding_free.ENV, "0")
            return fn()

    return run


@pytest.mark.parametrize("family", [*FAMILIES, *OTHER_FAMILIES])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_layers_same_logits(family, side, per_layer):
    ids, mask = _batch(side)
    model = make_model(family, "hf_flash")
    call = dict(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    with torch.no_grad():
        shapes, ours = _layer_inputs(model, **call)
        shapes_off, off = per_layer(lambda: _layer_inputs(model, **call))
    assert shapes == [(1, sum(LENGTHS), model.config.hidden_size)], shapes
    assert shapes_off == [(*ids.shape, model.config.hidden_size)]
    real = mask.bool()
    assert ours.logits.shape == off.logits.shape
    assert [h.shape for h in ours.hidden_states] == [h.shape for h in off.hidden_states]
    assert all(h[~real].eq(0).all() for h in ours.hidden_states[1:]), "pads of the hidden states are zeros"
    # the same per-token work in the same order: the real tokens agree to the last bit but for GEMM shapes
    torch.testing.assert_close(ours.logits[real], off.logits[real], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "call, reason",
    [
        (dict(use_cache=True), "use_cache"),
        (dict(use_cache=False, output_attentions=True), "attention weights"),
        (dict(use_cache=False, return_dict=False), "return_dict=False"),
        (dict(use_cache=False, position_ids=torch.zeros(3, 3, 17, dtype=torch.long)), "position_ids"),
    ],
)
def test_left_alone(call, reason):
    ids, mask = _batch()
    model = make_model("llama", "hf_flash")
    kwargs = dict(input_ids=ids, attention_mask=mask, **call)
    assert reason in (padding_free.skip_reason(model.model, kwargs) or "")


def test_only_hf_flash_and_only_pads(per_layer):
    ids, mask = _batch()
    sdpa = make_model("llama", "sdpa")
    assert padding_free.skip_reason(sdpa.model, dict(input_ids=ids, attention_mask=mask, use_cache=False))
    model = make_model("llama", "hf_flash")
    with torch.no_grad():
        shapes, _ = _layer_inputs(model, input_ids=ids, attention_mask=torch.ones_like(mask), use_cache=False)
        assert shapes == [(*ids.shape, 64)], "no pads: nothing to pack"
        shapes, _ = per_layer(lambda: _layer_inputs(model, input_ids=ids, attention_mask=mask, use_cache=False))
        assert shapes == [(*ids.shape, 64)], f"{padding_free.ENV}=0 keeps the padded layout"
    assert padding_free.hook(model.model) and not padding_free.hook(model), "the base model is hooked, not the LM"


def test_training_with_checkpointing_packs_and_matches(per_layer):
    """Gradient checkpointing in training turns the config's use_cache off, as Transformers does: packed."""
    from peft import LoraConfig, get_peft_model

    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads():
        model = make_model("llama", "hf_flash", dtype=torch.float32)
        torch.manual_seed(7)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
        model = get_peft_model(model, lora).to(ids.device, torch.float16 if ids.device.type == "cpu" else torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        assert model.config.use_cache
        shapes, out = _layer_inputs(model.base_model.model, input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        return shapes, out.loss.detach().float(), grads

    shapes, loss, grads = loss_and_grads()
    shapes_off, loss_off, grads_off = per_layer(loss_and_grads)
    assert shapes[0] == (1, sum(LENGTHS), 64) and shapes_off[0] == (*ids.shape, 64)
    torch.testing.assert_close(loss, loss_off, rtol=1e-3, atol=1e-3)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name}: no gradient"
        torch.testing.assert_close(grad, grads_off[name], rtol=2e-2, atol=2e-3 * grads_off[name].abs().max().item())
