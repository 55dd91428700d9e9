"""hf_flash inside tiny Llama / Mistral / Qwen2 / Gemma 2 / Qwen3 models, against eager attention.

Tolerance (flash-attn's rule, ``conftest.assert_close_rel``): hf_flash in fp16 (CPU interpreter) or
bf16 (GPU) may be at most 2x (outputs) or 3x (gradients) further from an fp32 eager run than eager
itself in the same low precision.
"""

import pytest
import torch
from _tiny import DEVICE, FAMILIES, greedy_equal_up_to_ties, models, pad_batch, positions, tokens
from conftest import assert_close_rel

FAMILY_NAMES = list(FAMILIES)


def check(name, ours, ref32, same_dtype, factor=2):
    # a small absolute floor relative to the values' size: an fp16 eager run can be exact by luck
    eps = 1e-3 * ref32.float().abs().max().item() + 1e-6
    assert_close_rel(name, ours, ref32, same_dtype, factor, eps=eps)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_match_eager(family):
    ours, eager, ref = models(family)
    ids = tokens(2, 16)
    with torch.no_grad():
        check(f"{family} logits", ours(ids).logits, ref(ids).logits, eager(ids).logits)


def check_padded_batch(name, triple, side):
    """A padded batch through ``ours`` gives each row what the row alone gives (``triple`` as ``models()``)."""
    ours, eager, ref = triple
    seqs = [tokens(1, 13, seed=2)[0], tokens(1, 7, seed=3)[0], tokens(1, 10, seed=4)[0]]
    ids, mask = pad_batch(seqs, side)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask, position_ids=positions(mask)).logits
        for row, seq in enumerate(seqs):
            real = batched[row][mask[row].bool()]
            check(f"{name} {side}-padded row {row}", real, ref(seq[None]).logits[0], eager(seq[None]).logits[0])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_padded_batch_equals_each_sample_alone(family, side):
    check_padded_batch(family, models(family), side)


def _flattened_batch(seqs):
    """What DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes of ``seqs`` (one packed row)."""
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}


def check_packed_batch(name, triple, source):
    """A packed row through ``ours`` gives each sequence what it gives alone; the borders come from ``source``."""
    ours, eager, ref = triple
    seqs = [tokens(1, 6, seed=5)[0], tokens(1, 9, seed=6)[0], tokens(1, 4, seed=7)[0]]
    batch = _flattened_batch(seqs)
    if source == "position_ids":  # TRL-style padding-free batch: only restarting positions tell the borders
        batch = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        packed = ours(**batch).logits[0]
        start = 0
        for i, seq in enumerate(seqs):
            part = packed[start : start + len(seq)]
            check(f"{name} packed seq {i} ({source})", part, ref(seq[None]).logits[0], eager(seq[None]).logits[0])
            start += len(seq)


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_batch_equals_sequences_alone(family, source):
    check_packed_batch(family, models(family), source)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generate_matches_eager(family):
    ours, eager, ref = models(family)
    ids, mask = pad_batch([tokens(1, 11, seed=8)[0], tokens(1, 6, seed=9)[0]], "left")
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out_ours, out_eager = ours.generate(ids, **kwargs), eager.generate(ids, **kwargs)
    greedy_equal_up_to_ties(out_ours, out_eager, ref, mask)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_padding_plan_is_not_read_back(mode, monkeypatch):
    """The cu_seqlens of the padding plan are built from lengths the routing has just read: the varlen
    calls must not read them back (a device sync; under inference_mode it was one per layer per step).
    ``torch.inference_mode`` (serving code) makes tensors without a version counter, which neither this
    nor the routing cache may need; a left-padded batch takes the varlen path at prefill and every step."""
    from hf_flash.ops import checks

    ours, eager, ref = models("llama")
    ids, mask = pad_batch([tokens(1, 11, seed=23)[0], tokens(1, 6, seed=24)[0]], "left")
    reads = []
    monkeypatch.setattr(checks, "_read", lambda t: reads.append(t) or t.tolist())
    kwargs = {"attention_mask": mask, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with mode():
        out_ours = ours.generate(ids, **kwargs)
    assert not reads, f"{len(reads)} reads of cu_seqlens during a padded generate"
    with torch.no_grad():
        out_eager = eager.generate(ids, **kwargs)
    greedy_equal_up_to_ties(out_ours, out_eager, ref, mask)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_cache_generate_matches_eager(family):
    ours, eager, ref = models(family)
    for ids, mask in (pad_batch([tokens(1, 9, seed=10)[0], tokens(1, 5, seed=11)[0]], "left"),
                      (tokens(2, 7, seed=12), None)):  # fmt: skip
        kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0,
                      "cache_implementation": "static"}  # fmt: skip
        with torch.no_grad():
            out_ours, out_eager = ours.generate(ids, **kwargs), eager.generate(ids, **kwargs)
        greedy_equal_up_to_ties(out_ours, out_eager, ref, mask if mask is not None else torch.ones_like(ids))


def test_static_cache_forward_without_mask_ignores_empty_slots():
    """A direct forward with a StaticCache and no mask: keys past the last position are unfilled zeros."""
    from transformers import StaticCache

    ours, eager, ref = models("llama")
    ids = tokens(1, 10, seed=13)
    logits = {}
    for name, model in (("ours", ours), ("eager", eager), ("ref", ref)):
        cache = StaticCache(config=model.config, max_cache_len=24)
        with torch.no_grad():
            first = model(ids[:, :7], past_key_values=cache, use_cache=True).logits
            second = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
        logits[name] = torch.cat([first, second], dim=1)
    check("static cache, no mask", logits["ours"], logits["ref"], logits["eager"])


def _lora_grads(model, ids, mask):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)  # the same LoRA init for every implementation
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    peft_model = get_peft_model(model, config)
    peft_model.train()
    labels = ids.masked_fill(mask == 0, -100)
    peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_gradients_match_eager(family):
    ours, eager, ref = models(family)
    ids, mask = pad_batch([tokens(1, 12, seed=14)[0], tokens(1, 8, seed=15)[0]], "right")
    grads_ours, grads_eager, grads_ref = (_lora_grads(m, ids, mask) for m in (ours, eager, ref))
    assert grads_ours.keys() == grads_ref.keys() and len(grads_ours) > 0
    for name in grads_ref:
        check(f"{family} grad {name}", grads_ours[name], grads_ref[name], grads_eager[name], factor=3)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_longer_sequences_match_eager(family):
    """bf16 on the GPU at lengths that span several kernel tiles."""
    ours, eager, ref = models(family)
    ids, mask = pad_batch([tokens(1, 300, seed=16)[0], tokens(1, 170, seed=17)[0]], "left")
    with torch.no_grad():
        kw = {"attention_mask": mask, "position_ids": positions(mask)}
        real = mask.bool()
        check(
            f"{family} long", ours(ids, **kw).logits[real], ref(ids, **kw).logits[real], eager(ids, **kw).logits[real]
        )


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_lora_gradients(reentrant):
    ids, mask = pad_batch([tokens(1, 12, seed=14)[0], tokens(1, 8, seed=15)[0]], "right")
    plain = _lora_grads(models("llama")[0], ids, mask)
    model = models("llama")[0]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    checkpointed = _lora_grads(model, ids, mask)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_torch_compile_fullgraph_training_step(family):
    """A compiled LoRA step on an unpadded multi-row batch: the attention must not break the graph.
    On CPU only the graph capture is tested (backend "eager"); on a GPU inductor compiles it."""
    from peft import LoraConfig, get_peft_model

    ours, eager, ref = models(family)
    ids = tokens(2, 16 if DEVICE == "cpu" else 64, seed=18)
    mask = torch.ones_like(ids)
    expected, baseline = _lora_grads(ref, ids, mask), _lora_grads(eager, ids, mask)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    peft_model = get_peft_model(ours, config).train()
    torch._dynamo.reset()
    # model code outside attention may break graphs (e.g. Gemma 2's training warning on 4.56): only
    # breaks whose stack passes through hf_flash count
    explanation = torch._dynamo.explain(peft_model)(input_ids=ids, labels=ids)
    ours_breaks = [str(r.reason) for r in explanation.break_reasons
                   if any("hf_flash" in frame.filename for frame in r.user_stack)]  # fmt: skip
    assert not ours_breaks, ours_breaks
    peft_model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(peft_model, backend="eager" if DEVICE == "cpu" else "inductor")
    compiled(input_ids=ids, labels=ids).loss.backward()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            check(f"{family} compiled grad {name}", param.grad, expected[name], baseline[name], factor=3)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_routing_is_recomputed_for_each_forward_pass(mode):
    """The padding layout is computed once and shared by the layers; a mask changed in place is read
    again (by its version counter, or, for inference tensors, which have none, at the next pass)."""
    ours = models("llama")[0]
    ids, mask = pad_batch([tokens(1, 9, seed=19)[0], tokens(1, 5, seed=20)[0]], "left")
    with mode():
        ids, mask = ids.clone(), mask.clone()  # made under the mode (inference tensors for inference_mode)
        ours(ids, attention_mask=mask, position_ids=positions(mask))
        mask[1] = 1  # the same tensor object, changed in place
        reused = ours(ids, attention_mask=mask, position_ids=positions(mask)).logits
        fresh = ours(ids, attention_mask=mask.clone(), position_ids=positions(mask)).logits
    assert torch.equal(reused, fresh)


def test_routing_is_shared_with_the_recomputed_layers(monkeypatch):
    """Under gradient checkpointing the backward recomputes every layer, in reverse order. The recomputed
    layers reuse the forward's routing instead of reading the mask and positions again (each read is a
    device sync, which would drain the GPU's queue once per layer in every backward)."""
    import hf_flash.integrations.transformers as integration

    ours = models("llama")[0].train()
    ours.gradient_checkpointing_enable()
    ids, mask = pad_batch([tokens(1, 9, seed=21)[0], tokens(1, 5, seed=22)[0]], "left")
    routed = []
    route = integration._route
    monkeypatch.setattr(integration, "_route", lambda *args: routed.append(1) or route(*args))
    out = ours(ids, attention_mask=mask, position_ids=positions(mask), labels=ids)
    assert len(routed) == 1, "the layers of one forward pass share one routing"
    out.loss.backward()
    assert len(routed) == 1, "the recomputed layers routed again"
