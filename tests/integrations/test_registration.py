"""Registration with Transformers: the name, the mask function, loading side by side, the 5.x loader trap."""

import pytest
import torch
import transformers
from _tiny import DTYPE, make_config, make_model, pad_batch, positions, tokens
from conftest import assert_close_rel
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import hf_flash
from hf_flash.integrations import transformers as integration

IS_V5 = int(transformers.__version__.split(".")[0]) >= 5


def test_register_is_idempotent():
    assert integration.is_registered()
    hf_flash.register()
    integration.register()
    assert integration.is_registered()
    assert AttentionInterface._global_mapping["hf_flash"] is integration.hf_flash_attention_forward
    assert AttentionMaskInterface._global_mapping["hf_flash"] is integration.hf_flash_mask


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", "eager", dtype=torch.float32).save_pretrained(path)
    return path


def _load(path, attn):
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation=attn)
    return model.to(device=tokens(1, 1).device).eval()


def test_from_pretrained_side_by_side_with_sdpa_and_eager(saved_llama):
    loaded = {attn: _load(saved_llama, attn) for attn in ("hf_flash", "sdpa", "eager", "hf_flash")}
    for attn, model in loaded.items():
        assert model.config._attn_implementation == attn
    ids, mask = pad_batch([tokens(1, 10, seed=1)[0], tokens(1, 6, seed=2)[0]], "left")
    kw = {"attention_mask": mask, "position_ids": positions(mask)}
    real = mask.bool()
    with torch.no_grad():
        ref = loaded["eager"](ids, **kw).logits[real]
        low = {attn: model.to(DTYPE)(ids, **kw).logits[real] for attn, model in loaded.items()}
    assert_close_rel("hf_flash vs eager", low["hf_flash"], ref, low["eager"], 2, eps=1e-3)
    assert_close_rel("sdpa vs eager", low["sdpa"], ref, low["eager"], 2, eps=1e-3)


def test_set_attn_implementation_after_loading(saved_llama):
    model = _load(saved_llama, "eager")
    model.set_attn_implementation("hf_flash")
    assert model.config._attn_implementation == "hf_flash"
    seen = []
    original = AttentionInterface._global_mapping["hf_flash"]

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    AttentionInterface._global_mapping["hf_flash"] = spy
    try:
        with torch.no_grad():
            model.to(DTYPE)(tokens(1, 5))
    finally:
        AttentionInterface._global_mapping["hf_flash"] = original
    assert len(seen) == model.config.num_hidden_layers
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not IS_V5, reason="Transformers 4.x does not send 'hf_flash' through its flash loader")
def test_flash_loader_answers_for_hf_flash_after_another_implementation(saved_llama):
    """5.x loads every name containing "flash" through lazy_import_flash_attention, whose cache is
    replaced when another flash implementation loads; our name must still load afterwards."""
    from transformers import modeling_flash_attention_utils as fa_utils

    loaded = fa_utils.lazy_import_flash_attention("hf_flash")
    assert loaded[0][0] is hf_flash.flash_attn_func and loaded[0][1] is hf_flash.flash_attn_varlen_func
    fa_utils._loaded_implementation = "flash_attention_2"  # as if a model had loaded FA2 meanwhile
    model = _load(saved_llama, "hf_flash")
    assert model.config._attn_implementation == "hf_flash"
    assert fa_utils._loaded_implementation == "hf_flash"


def test_mask_function_returns_2d_or_none():
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = integration.hf_flash_mask(batch_size=2, kv_length=3, attention_mask=mask)
    assert out.shape == (2, 3) and out.dtype == torch.bool
    assert integration.hf_flash_mask(batch_size=2, kv_length=4, attention_mask=torch.ones(2, 4)) is None
    # a static cache: the mask is shorter than the keys and is kept, so that the keys can be cut
    assert integration.hf_flash_mask(batch_size=2, kv_length=8, attention_mask=torch.ones(2, 4)).shape == (2, 4)
    assert integration.hf_flash_mask(batch_size=2, kv_length=4, attention_mask=None) is None


def test_custom_mask_pattern_is_detected():
    from transformers import masking_utils as mu

    assert integration._custom_pattern(mu.causal_mask_function) is None
    sliding = mu.and_masks(mu.sliding_window_overlay(4), mu.causal_mask_function)
    assert integration._custom_pattern(sliding) is None

    def image_tokens_bidirectional(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx < 2

    assert integration._custom_pattern(mu.or_masks(mu.causal_mask_function, image_tokens_bidirectional))
    assert integration._custom_pattern(mu.and_masks(mu.causal_mask_function, image_tokens_bidirectional))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_no_4d_mask_reaches_the_attention_function(family, monkeypatch):
    seen = []
    original = integration.hf_flash_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "hf_flash", spy)
    model = make_model(family, "hf_flash", config=make_config(family))
    ids, mask = pad_batch([tokens(1, 9, seed=3)[0], tokens(1, 5, seed=4)[0]], "left")
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask))
        model(tokens(1, 8), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]], device=ids.device))
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(seen) > 0
    assert all(shape is None or len(shape) == 2 for shape in seen), seen


def test_custom_mask_pattern_yields_a_4d_mask_for_the_eager_fallback():
    """An or-mask overlay (e.g. bidirectional image tokens) cannot be expressed as padding: the mask
    function hands over Transformers' 4D mask, which the attention function sends to eager."""
    import inspect

    from transformers import masking_utils as mu

    def image_tokens_bidirectional(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < 3

    config = make_config("llama")
    config._attn_implementation = "hf_flash"
    params = inspect.signature(mu.create_causal_mask).parameters
    kwargs = {"config": config, "attention_mask": None, "or_mask_function": image_tokens_bidirectional}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = torch.zeros(1, 6, 64)
    kwargs["past_key_values" if "past_key_values" in params else "cache"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(6)
    mask = mu.create_causal_mask(**kwargs)
    assert mask is not None and mask.dim() == 4
    assert bool(mask[0, 0, 0, 2]) and not bool(mask[0, 0, 3, 4])  # image keys visible, future text keys not
