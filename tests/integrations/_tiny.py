"""Tiny random-init decoder models for the integration tests (no downloads).

Each family exercises a different part of the attention contract: GQA everywhere, a sliding window on
every layer (Mistral), on some layers plus q/k/v biases (Qwen2), Gemma 2's softcap, custom scaling
and alternating windows, Qwen3's q/k norms. Weights use a larger init than the default so that
attention patterns are far from uniform and a masking mistake shows in the logits.

On CPU the kernels run in Triton's interpreter in fp16 (its bf16 dots are wrong); on a GPU in bf16.
"""

from __future__ import annotations

import copy

import torch
import transformers

import hf_flash  # noqa: F401  (registers attn_implementation="hf_flash")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16
VOCAB = 128

_COMMON = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2, "pad_token_id": 0, "eos_token_id": None,
    "bos_token_id": None,
}  # fmt: skip

# family -> (model class name, config class name, extra config)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 5}),
    "qwen2": (
        "Qwen2ForCausalLM", "Qwen2Config", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    ),
    "gemma2": (
        "Gemma2ForCausalLM", "Gemma2Config",
        {"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 3.0, "final_logit_softcapping": 30.0,
         "sliding_window": 5},
    ),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}),
}  # fmt: skip

# Families outside the common model tests (test_models.py), with tests of their own. gpt-oss: attention sinks
# (``s_aux``) on every layer, a window on the first layer and full attention on the second, a small MoE.
OTHER_FAMILIES = {
    "gpt_oss": (
        "GptOssForCausalLM", "GptOssConfig",
        # every expert active: top-k routing is discontinuous, and a rounding difference that picks another
        # expert for a token would move its output far more than the attention's own error (seen in bf16)
        {"head_dim": 16, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 4,
         "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
         "max_position_embeddings": 131072},  # the YaRN defaults' length (4.56 warns about any other)
    ),
}  # fmt: skip
_ALL_FAMILIES = {**FAMILIES, **OTHER_FAMILIES}


def make_config(family: str):
    _, config_cls, extra = _ALL_FAMILIES[family]
    return getattr(transformers, config_cls)(**{**_COMMON, **extra})


def make_model(family: str, attn: str, dtype=None, seed: int = 0, config=None):
    """A tiny model of ``family`` with ``attn_implementation=attn``; the same ``seed`` gives the same weights
    whatever the implementation. The config is copied: implementations must not share one config object."""
    model_cls = getattr(transformers, _ALL_FAMILIES[family][0])
    config = copy.deepcopy(config if config is not None else make_config(family))
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    return model.to(device=DEVICE, dtype=dtype or DTYPE)


def models(family: str, seed: int = 0):
    """(hf_flash in the test dtype, eager in the test dtype, eager in fp32): the three runs of the
    tolerance rule ``err(ours vs fp32) <= factor * err(eager same dtype vs fp32)``."""
    return (
        make_model(family, "hf_flash", seed=seed),
        make_model(family, "eager", seed=seed),
        make_model(family, "eager", dtype=torch.float32, seed=seed),
    )


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator).to(DEVICE)


def pad_batch(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``[L_i]`` -> (input_ids ``[B, max L]``, attention_mask) padded on ``side`` with id 0."""
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        cols = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
        ids[row, cols] = seq
        mask[row, cols] = 1
    return ids, mask


def greedy_equal_up_to_ties(ours, eager, eager_fp32_model, prompt_mask) -> None:
    """Greedy outputs ``[B, L]`` must match; a different token is only accepted where the fp32 model's
    top-2 logits are closer than the test dtype can resolve (a tie that half precision may break either way)."""
    if torch.equal(ours, eager):
        return
    prompt_len = prompt_mask.shape[1]
    for row in range(ours.shape[0]):
        diff = (ours[row] != eager[row]).nonzero()
        if diff.numel() == 0:
            continue
        col = int(diff[0])
        assert col >= prompt_len, "the prompt itself differs"
        mask = torch.cat([prompt_mask[row], prompt_mask.new_ones(col - prompt_len)])[None]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = eager_fp32_model(eager[row : row + 1, :col], attention_mask=mask, position_ids=position_ids).logits
        last = logits[0, -1].float()
        top2 = last.topk(2).values
        resolution = 8 * torch.finfo(DTYPE).eps * last.abs().max()
        assert top2[0] - top2[1] < resolution, (
            f"row {row}: tokens differ at {col} (top-2 gap {top2[0] - top2[1]:.3g}): "
            f"{ours[row].tolist()} vs {eager[row].tolist()}"
        )


def positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids of a padded batch as generate builds them: count real tokens, pads get 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
