"""The same documents give the same loss and LoRA gradients whatever the batch layout: each document alone,
a right-padded batch (attention_mask; with a cache, unpadded per layer, without one, packed for the whole
decoder), or one packed row (position_ids restarting per document, as
DataCollatorWithFlattening emits). hf_flash in each layout is held to flash-attn's rule against an fp32
eager run of the documents one by one, with an eager run of the documents one by one in the same dtype as
the yardstick (eager in the same layout would not do: a layout that leaked across documents would move
the yardstick with it)."""

from __future__ import annotations

import pytest
import torch
from _tiny import DEVICE, DTYPE, VOCAB, make_model
from conftest import assert_close_rel
from peft import LoraConfig, get_peft_model

LENGTHS = (5, 11, 17)  # odd, unequal: the padded batch holds 12 + 6 pads, the packed row 33 tokens


def _documents() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=generator).to(DEVICE) for n in LENGTHS]


def _lora_model(attn: str, dtype):
    model = make_model("llama", attn, dtype=torch.float32)
    torch.manual_seed(7)  # the same LoRA weights in every model; random B so that every LoRA weight gets a gradient
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model, config).to(dtype)


def _summed_loss(model, input_ids, labels, **kwargs) -> tuple[torch.Tensor, int]:
    """Sum of the next-token cross-entropy over the targets (labels != -100) and their number."""
    logits = model(input_ids=input_ids, **kwargs).logits.float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")  # fmt: skip
    return loss, int(targets.ne(-100).sum())


def _loss(model, layout: str, docs: list[torch.Tensor]) -> torch.Tensor:
    """Mean loss per target over all documents in ``layout``."""
    if layout == "alone":
        parts = [_summed_loss(model, d[None], d[None]) for d in docs]
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    elif layout.startswith("padded"):
        longest = max(len(d) for d in docs)
        ids = torch.zeros(len(docs), longest, dtype=torch.long, device=DEVICE)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, d in enumerate(docs):
            ids[row, : len(d)], mask[row, : len(d)], labels[row, : len(d)] = d, 1, d
        # "padded": a cache is made (eval, use_cache on), so only attention unpads; "padded-free": without a
        # cache the whole decoder runs the real tokens as one packed row (integrations/padding_free.py)
        total, count = _summed_loss(model, ids, labels, attention_mask=mask, use_cache=layout == "padded")
    else:  # packed: one row, each document's first label hidden so that no target crosses a boundary
        ids = torch.cat(docs)[None]
        labels = torch.cat([torch.cat([d.new_full((1,), -100), d[1:]]) for d in docs])[None]
        position_ids = torch.cat([torch.arange(len(d), device=DEVICE) for d in docs])[None]
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        total, count = _summed_loss(model, ids, labels, position_ids=position_ids, cu_seq_lens_q=cu,
                                    cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))  # fmt: skip
    return total / count


def _loss_and_grads(attn: str, dtype, layout: str):
    model = _lora_model(attn, dtype)
    loss = _loss(model, layout, _documents())
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


@pytest.fixture(scope="module")
def truth():
    return _loss_and_grads("eager", torch.float32, "alone")


@pytest.fixture(scope="module")
def eager_alone():
    return _loss_and_grads("eager", DTYPE, "alone")


@pytest.mark.parametrize("layout", ["alone", "padded", "padded-free", "packed"])
def test_layouts_agree_with_documents_alone(truth, eager_alone, layout, recwarn):
    ours = _loss_and_grads("hf_flash", DTYPE, layout)
    eager = eager_alone
    assert not [w for w in recwarn if "hf_flash" in str(w.message)], "a call fell back"
    assert_close_rel(f"{layout} loss", ours[0], truth[0], eager[0], factor=2)
    assert set(ours[1]) == set(truth[1]) and len(truth[1]) > 0
    for name, grad in ours[1].items():
        assert truth[1][name].abs().max() > 0, f"{name}: no gradient"
        assert_close_rel(f"{layout} {name}", grad, truth[1][name], eager[1][name], factor=3)
