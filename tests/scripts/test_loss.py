"""The chunked causal-LM loss (hf_flash/training/loss.py) against Transformers' own, on the CPU.

Oracle: Transformers' ``ForCausalLMLoss`` on the full logits (the model's own loss for the model-level tests).
fp32 must agree to fp32 rounding; fp16 follows the repository's rule: our error against the fp32 oracle is
at most 2x (loss) / 3x (gradients) the error of the plain loss computed in fp16, plus a small eps.
"""

import copy

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_flash.training.loop import FinetuneConfig, read_steps, validate
from hf_flash.training.loss import (
    LossFallbackWarning,
    LossPlan,
    default_chunk_tokens,
    liger_unavailable_reason,
    linear_cross_entropy,
)
from hf_flash.training.models import UsageError, add_lora, build_model, extend_positions, resolve_model

IGNORE = -100


def _err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _within(name, ours, oracle, plain_same_dtype, factor, eps=1e-6):
    err, base = _err(ours, oracle), _err(plain_same_dtype, oracle)
    assert err <= factor * base + eps, f"{name}: max err {err:.3e} > {factor} x plain's {base:.3e} + {eps}"


def _labels(layout: str, batch: int, length: int, vocab: int, seed: int = 3) -> torch.Tensor:
    """padded: rows end in -100 pads, one row all -100; packed: one row, -100 at each sequence start."""
    labels = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    if layout == "padded":
        labels[0, length - 4 :] = IGNORE
        labels[1] = IGNORE
        labels[2, length // 2 :] = IGNORE
    else:
        labels[:, [0, 5, 6, 17]] = IGNORE  # sequences of 5, 1, 11 and the rest
    return labels


# ---- the loss on its own ----------------------------------------------------------------------------------------


def _head(kind: str, hidden: int, vocab: int, dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=kind == "bias").requires_grad_(kind != "frozen")
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        wrapper = torch.nn.Sequential()
        wrapper.add_module("lm_head", head)
        lora = LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False, lora_dropout=0.0)
        head = get_peft_model(wrapper, lora).base_model.model.lm_head
    return head.to(dtype)


def _loss_and_grads(fn, hidden, head):
    hidden = hidden.detach().requires_grad_()
    head.zero_grad()
    loss = fn(hidden)
    loss.backward()
    return [loss, hidden.grad] + [p.grad for p in head.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_kind", ["frozen", "bias", "lora", "softcap"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 37], ids=["mean", "num_items37"])
def test_linear_cross_entropy_equals_transformers_loss(dtype, head_kind, layout, num_items):
    batch, length, width, vocab = (4, 23, 24, 97) if layout == "padded" else (1, 41, 24, 97)
    labels = _labels(layout, batch, length, vocab)
    items = None if num_items is None else torch.tensor(num_items)
    softcap = 3.0 if head_kind == "softcap" else None
    hidden32 = torch.randn(batch, length, width, generator=torch.Generator().manual_seed(1))
    head32 = _head(head_kind, width, vocab, torch.float32)

    def plain(head):
        def fn(hidden):
            logits = head(hidden)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            return ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=items)

        return fn

    def chunked(head):  # 7 rows a chunk: chunk boundaries fall inside sequences
        return lambda h: linear_cross_entropy(
            h, head, labels, num_items_in_batch=items, softcap=softcap, chunk_tokens=7
        )

    oracle = _loss_and_grads(plain(head32), hidden32, head32)
    head = head32 if dtype == torch.float32 else copy.deepcopy(head32).to(dtype)
    ours = _loss_and_grads(chunked(head), hidden32.to(dtype), head)
    assert len(ours) == len(oracle) == {"frozen": 2, "bias": 4, "lora": 4, "softcap": 3}[head_kind]
    if dtype == torch.float32:
        for name, a, b in zip(["loss", "hidden", "param"], ours, oracle):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        return
    same_dtype = _loss_and_grads(plain(head), hidden32.to(dtype), head)
    for i, (a, b, c) in enumerate(zip(ours, oracle, same_dtype)):
        _within(f"tensor {i}", a, b, c, factor=2 if i == 0 else 3)


def test_all_rows_ignored_gives_transformers_nan_and_zero_gradients():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    labels = torch.full((2, 5), IGNORE)
    assert torch.isnan(linear_cross_entropy(hidden, head, labels))  # 0 / 0, as ForCausalLMLoss
    linear_cross_entropy(hidden, head, labels, num_items_in_batch=torch.tensor(3)).backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(head.weight.grad) == 0


def test_shift_labels_are_taken_as_aligned():
    hidden, head = torch.randn(1, 9, 8), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (1, 9))
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    assert torch.equal(
        linear_cross_entropy(hidden, head, labels), linear_cross_entropy(hidden, head, shift_labels=shifted)
    )


def test_default_chunk():
    assert default_chunk_tokens(128256) == 2048 and default_chunk_tokens(32768) == 8192
    assert default_chunk_tokens(10**7) == 128


@pytest.mark.skipif(liger_unavailable_reason(torch.nn.Linear(1, 1), torch.device("cpu")) is not None,
                    reason="needs liger-kernel and TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")  # fmt: skip
def test_liger_gives_the_same_loss_and_gradients():
    # fp32 only: Triton's interpreter computes bf16 dots wrongly and takes no float soft-cap (see the gpu test).
    hidden = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    head, labels = _head("frozen", 32, 300, torch.float32), _labels("padded", 3, 24, 300)[:2]
    ours = _loss_and_grads(lambda h: linear_cross_entropy(h, head, labels, impl="liger"), hidden, head)
    oracle = _loss_and_grads(lambda h: ForCausalLMLoss(head(h), labels, 300), hidden, head)
    for a, b in zip(ours, oracle):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_bf16_softcap_on_gpu(impl):
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    hidden32 = torch.randn(2, 3000, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    head32 = _head("frozen", 256, 32000, torch.float32).cuda()
    labels = _labels("padded", 3, 3000, 32000)[:2].cuda()

    def plain(head):
        return lambda h: ForCausalLMLoss(torch.tanh(head(h) / 30.0) * 30.0, labels, 32000)

    oracle = _loss_and_grads(plain(head32), hidden32, head32)
    head = copy.deepcopy(head32).bfloat16()
    same = _loss_and_grads(plain(head), hidden32.bfloat16(), head)
    ours = _loss_and_grads(lambda h: linear_cross_entropy(h, head, labels, softcap=30.0, impl=impl),
                           hidden32.bfloat16(), head)  # fmt: skip
    for i, (a, b, c) in enumerate(zip(ours, oracle, same)):
        _within(f"tensor {i}", a, b, c, factor=2 if i == 0 else 3)


# ---- through a model: the embedded tiny Llama with LoRA ---------------------------------------------------------


def _lora_model(targets="all-linear", dtype=torch.float32, checkpointing=False):
    base = build_model(resolve_model(), "sdpa", dtype, "cpu", seed=0)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules=targets)
    for name, p in model.named_parameters():  # LoRA B starts at zero; make every LoRA weight matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _batch(layout: str):
    vocab = 4096
    if layout == "padded":
        ids = torch.randint(1, vocab, (3, 40), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, 31:] = 0
        mask[2, 12:] = 0
        labels = ids.masked_fill(mask == 0, IGNORE)
        labels[1] = IGNORE  # a row with no target at all
        return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}
    from transformers import DataCollatorWithFlattening

    docs = [torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (17, 3, 29)]
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    return collate([{"input_ids": d, "labels": d} for d in docs])


def _run(model, fn, inputs):
    model.zero_grad()
    loss = fn(dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _plain(model):
    return lambda inputs: model(**inputs).loss


def _planned(model, **options):
    plan = LossPlan.for_model(model, **options)
    return lambda inputs: plan(model, **inputs)["loss"]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offload"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_plan_equals_the_models_own_loss(layout, offload, checkpointing):
    model = _lora_model(checkpointing=checkpointing)
    inputs = {**_batch(layout), "num_items_in_batch": torch.tensor(50)}
    loss, grads = _run(model, _plain(model), inputs)
    ours, our_grads = _run(model, _planned(model, chunk_tokens=16, offload_activations=offload), inputs)
    torch.testing.assert_close(ours, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_plan_fp16_and_a_lora_head():
    inputs = _batch("padded")
    reference = _lora_model("q_proj,lm_head")
    assert type(reference.get_output_embeddings()).__name__ == "Linear" and hasattr(
        reference.get_output_embeddings(), "lora_A"
    )
    oracle_loss, oracle = _run(reference, _plain(reference), inputs)
    model = copy.deepcopy(reference).half()
    loss, plain = _run(model, _plain(model), inputs)
    ours_loss, ours = _run(model, _planned(model, chunk_tokens=16), inputs)
    _within("loss", ours_loss, oracle_loss, loss, 2)
    assert any("lm_head" in name for name in ours)
    for name in oracle:
        _within(name, ours[name], oracle[name], plain[name], 3, eps=1e-5)


def _tiny_config(kind: str, **extra):
    return getattr(transformers, f"{kind}Config")(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, **extra,
    )  # fmt: skip


def _tiny_lora(kind: str, **extra):
    torch.manual_seed(0)
    base = getattr(transformers, f"{kind}ForCausalLM")(_tiny_config(kind, **extra))
    base.set_attn_implementation("eager")
    return add_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules="all-linear").train()


def test_gemma2_softcap_is_reproduced():
    model = _tiny_lora("Gemma2", final_logit_softcapping=0.5, sliding_window=8)  # a cap that bites
    inputs = {"input_ids": torch.randint(1, 256, (2, 19)), "labels": torch.randint(0, 256, (2, 19))}
    plan = LossPlan.for_model(model, chunk_tokens=8)
    assert (plan.impl, plan.softcap) == ("chunked", 0.5)
    loss, grads = _run(model, _plain(model), inputs)
    ours, our_grads = _run(model, lambda i: plan(model, **i)["loss"], inputs)
    torch.testing.assert_close(ours, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize(("kind", "extra", "why"), [
    ("Cohere", {"logit_scale": 0.25}, "config.logit_scale = 0.25"),
    ("Granite", {"logits_scaling": 4.0}, "config.logits_scaling = 4.0"),
])  # fmt: skip
def test_models_that_rescale_logits_keep_their_own_loss(kind, extra, why):
    from hf_flash.fallback import reset_warnings

    reset_warnings()
    model = _tiny_lora(kind, **extra)
    with pytest.warns(LossFallbackWarning, match=why):
        plan = LossPlan.for_model(model, "chunked")
    assert plan.impl == "plain" and why in plan.describe()
    inputs = {"input_ids": torch.randint(1, 256, (1, 9)), "labels": torch.randint(0, 256, (1, 9))}
    assert torch.equal(plan(model, **dict(inputs)).loss, model(**inputs).loss)


def test_auto_takes_liger_only_where_it_runs(monkeypatch):
    from hf_flash.training import loss

    head = torch.nn.Linear(8, 32, bias=False)
    monkeypatch.setattr(loss.importlib.util, "find_spec", lambda name: object())  # liger-kernel "installed"
    assert loss.auto_impl(head, torch.device("cuda")) == "liger"
    assert loss.auto_impl(head, torch.device("cpu")) == "chunked"  # the interpreter would run it, slowly
    assert loss.auto_impl(_lora_model("q_proj,lm_head").get_output_embeddings(), torch.device("cuda")) == "chunked"
    monkeypatch.setattr(loss.importlib.util, "find_spec", lambda name: None)  # not installed
    assert loss.auto_impl(head, torch.device("cuda")) == "chunked"
    assert LossPlan.for_model(_lora_model("q_proj")).impl == "chunked"  # the default, on CPU: no warning


def test_liger_request_without_liger_conditions_runs_chunked(monkeypatch):
    from hf_flash.fallback import reset_warnings

    reset_warnings()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _lora_model("q_proj,lm_head")  # a LoRA head is no plain nn.Linear
    with pytest.warns(LossFallbackWarning, match="chunked PyTorch loss runs instead of Liger's"):
        plan = LossPlan.for_model(model, "liger")
    assert plan.impl == "chunked" and plan.note


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns (forward and backward)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_loss_never_makes_a_tokens_by_vocab_tensor():
    # 512 tokens x 4096 entries = 2M elements, twice the largest weight (the 4096 x 256 embedding).
    model = _lora_model()
    ids = torch.randint(1, 4096, (1, 512), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    sizes = {}
    for name, fn in [("plain", _plain(model)), ("chunked", _planned(model, chunk_tokens=64))]:
        with _LargestOutput() as watch:
            _run(model, fn, inputs)
        sizes[name] = watch.largest
    assert sizes["plain"] >= 512 * 4096  # the watcher sees the full logits when they exist
    assert sizes["chunked"] <= 4096 * 256, sizes


# ---- through the Trainer --------------------------------------------------------------------------------------

STEPS = ["--max-steps", "4", "--grad-accum", "2", "--packing", "--lora-dropout", "0", "--lr", "1e-2", "--save-steps", "2",
         "--no-save-adapter"]  # fmt: skip


def test_trainer_chunked_equals_plain_with_accumulation_offload_and_resume(run_finetune, tmp_path):
    # Packed micro-batches hold different numbers of targets: the Trainer's num_items_in_batch must be
    # honoured for the losses to agree. A large learning rate makes a wrong gradient show in the next loss.
    code, out, err, plain = run_finetune(*STEPS, "--loss", "plain", out=tmp_path / "plain")
    assert code == 0, err
    assert "loss: plain" in out
    split = tmp_path / "split"
    code, out, err, _ = run_finetune(*STEPS, "--stop-after", "2", "--offload-activations", "--gradient-checkpointing",
                                     out=split)  # fmt: skip
    assert code == 0, err
    assert "loss: chunked (" in out and "activations offloaded to CPU" in out
    assert run_finetune(*STEPS, "--resume", out=split)[0] == 0
    expected, got = read_steps(plain), read_steps(split)
    assert [s["step"] for s in got] == [1, 2, 3, 4]
    # fp32 rounding (another summation order) grows over steps at this learning rate: 1.5e-5 by step 4
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in got] == pytest.approx([s[key] for s in expected], rel=1e-4), key


def test_options_are_checked():
    with pytest.raises(UsageError, match="unknown --loss 'fused'"):
        validate(FinetuneConfig(loss="fused"))
    with pytest.raises(UsageError, match="--loss-chunk-tokens must be at least 1"):
        validate(FinetuneConfig(loss_chunk_tokens=0))
    assert extend_positions(resolve_model(preset="llama-3.2-1b"), 262144).config.max_position_embeddings == 262144
    assert resolve_model(preset="llama-3.2-1b").config.max_position_embeddings == 131072  # presets stay as published


def test_max_positions_refused_for_checkpoints(tmp_path):
    from hf_flash.training.models import embedded_checkpoint

    spec = resolve_model(embedded_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(UsageError, match="applies to random-init models"):
        extend_positions(spec, 16384)


def test_help_mentions_the_loss_and_offload(finetune_script):
    text = finetune_script.build_parser().format_help()
    assert "--loss {auto,chunked,liger,plain}" in text and "--offload-activations" in text


def test_script_accepts_the_options(finetune_script):
    args = finetune_script.build_parser().parse_args(["--loss", "liger", "--loss-chunk-tokens", "512",
                                                      "--offload-activations", "--max-position-embeddings", "9"])  # fmt: skip
    cfg = FinetuneConfig(**vars(args))
    assert (cfg.loss, cfg.loss_chunk_tokens, cfg.offload_activations, cfg.max_position_embeddings) == (
        "liger", 512, True, 9)  # fmt: skip
    validate(cfg)
    assert FinetuneConfig().loss == finetune_script.build_parser().parse_args([]).loss == "auto"
