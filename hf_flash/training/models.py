"""Which model to fine-tune: the embedded default, a random-init preset of a real shape, or a local
checkpoint; which attention backends exist here; and the LoRA wrapper.

Nothing is ever downloaded: a Hugging Face id is looked up in the local cache only.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_MODEL = ASSETS / "tiny-llama"
BACKENDS = ("hf_flash", "sdpa", "eager", "flex_attention", "flash_attention_2")


class UsageError(ValueError):
    """Bad input from the user; the scripts print its one-line message and exit with status 2."""


# Published shapes of real models (random init: speed and memory work only, the weights are noise).
# Keys follow the long-standing Transformers names, which 4.56 and 5.x both accept.
_LLAMA3_ROPE = {"rope_type": "llama3", "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192}  # fmt: skip
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama-3.2-3b": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
        max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
}  # fmt: skip
# gpt-oss-20b's shape (attention sinks, window-128 layers alternating with full ones, 32 experts, 4 active)
# cut to 4 of its 24 layers: what the attention backends differ on, at a fraction of the memory.
PRESETS["gpt-oss-20b-4l"] = dict(
    model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=4, num_attention_heads=64,
    num_key_value_heads=8, head_dim=64, vocab_size=201088, num_local_experts=32, num_experts_per_tok=4,
    sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip
PRESETS["llama-3-8b"] = PRESETS["llama-3.1-8b"]  # same shape; 8b is what people type


@dataclass
class ModelSpec:
    """Where the config, the weights (None: random init) and the tokenizer come from."""

    name: str
    config: object  # transformers.PretrainedConfig
    weights: str | None
    tokenizer: str


def _has_weights(folder: Path) -> bool:
    return (
        any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.safetensors.index.json"))
    )


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()


def resolve_model(model: str | None = None, preset: str | None = None) -> ModelSpec:
    """Find the model without loading weights, so bad input fails before anything slow happens."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if model and preset:
        raise UsageError("pass either --model or --model-preset, not both")
    if preset:
        if preset not in PRESETS:
            raise UsageError(f"unknown --model-preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        fields = dict(PRESETS[preset])
        config = CONFIG_MAPPING[fields.pop("model_type")](**fields)
        return ModelSpec(preset, config, None, str(EMBEDDED_MODEL))
    if not model:
        config = AutoConfig.from_pretrained(EMBEDDED_MODEL)
        return ModelSpec("embedded tiny-llama", config, None, str(EMBEDDED_MODEL))

    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise UsageError(f"--model {model}: the folder has no config.json; pass a Transformers model folder")
        config = AutoConfig.from_pretrained(folder)
        weights = str(folder) if _has_weights(folder) else None
        # A config-only folder is a shape to try at random init; it borrows the embedded tokenizer.
        tokenizer = str(folder) if _has_tokenizer(folder) else str(EMBEDDED_MODEL)
        return ModelSpec(str(folder), config, weights, tokenizer)
    if folder.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--model {model}: no such folder")
    try:  # a hub id: only the local cache is allowed
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except OSError:
        raise UsageError(
            f"--model {model}: not a local folder and not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); nothing can be downloaded here, so copy "
            "the model to a folder and pass its path, or use --model-preset for a random-init shape"
        ) from None
    return ModelSpec(model, config, model, model)


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def check_seq_len(spec: ModelSpec, seq_len: int) -> None:
    limit = max_positions(spec.config)
    if limit is not None and seq_len > limit:
        raise UsageError(
            f"--seq-len {seq_len} is above the model's max_position_embeddings ({limit}) for {spec.name}; "
            f"use --seq-len {limit} or less"
        )


def extend_positions(spec: ModelSpec, positions: int | None) -> ModelSpec:
    """``spec`` with ``max_position_embeddings = positions`` (None: unchanged), for context sweeps past a preset's
    published limit (Llama 3's RoPE is computed for any position; the weights are noise anyway). Random-init
    models only: a checkpoint loads its own config, and past its trained length it would need RoPE scaling."""
    if positions is None:
        return spec
    if spec.weights is not None:
        raise UsageError(
            f"--max-position-embeddings applies to random-init models (--model-preset, the embedded model or a "
            f"config-only folder), not to the checkpoint in {spec.weights}"
        )
    spec.config.max_position_embeddings = positions
    return spec


def backend_unavailable_reason(name: str, device: str) -> str | None:
    """None when ``attn_implementation=name`` can run on ``device`` ("cpu"/"cuda"), else why not."""
    if name not in BACKENDS:
        raise UsageError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "hf_flash":
        try:
            from transformers import AttentionInterface

            import hf_flash  # noqa: F401  (importing registers the backend with Transformers)
        except ImportError as exc:
            return f"hf_flash cannot be imported: {exc}"
        if "hf_flash" not in AttentionInterface._global_mapping:
            return "importing hf_flash did not register the 'hf_flash' attention with Transformers"
    if name == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            return "flex_attention needs torch >= 2.5"
        if device != "cuda":
            return "flex_attention is only compared on a CUDA GPU here (on CPU it compiles for minutes)"
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attention_2 needs the flash-attn package"
        if device != "cuda":
            return "flash_attention_2 needs a CUDA GPU"
    return None


def resolve_dtype(name: str, device: str, attn: str | None = None):
    """``auto``: bf16 on a GPU that has it; on CPU fp16 for hf_flash, whose kernels run there only in Triton's
    interpreter, which takes fp16 (fp32 would send every call to PyTorch, and its bf16 dots are wrong); else fp32."""
    import torch

    if name == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if attn == "hf_flash" and device == "cpu" else torch.float32
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise UsageError(f"unknown --dtype {name!r}; choose auto, bf16, fp16 or fp32")
    return dtypes[name]


def attn_note(attn: str, device: str, dtype) -> str:
    """What runs behind ``--attn hf_flash`` here, for the run's header: " (Triton interpreter)" on CPU,
    " (falls back to SDPA: float32)" when the kernels cannot take the call; "" for the kernels on a GPU."""
    if attn != "hf_flash":
        return ""
    import torch

    from hf_flash.ops.config import SUPPORTED_DTYPES, kernels_unavailable_reason

    if dtype not in SUPPORTED_DTYPES:
        return f" (falls back to SDPA: {str(dtype).removeprefix('torch.')})"
    reason = kernels_unavailable_reason(device, dtype)
    if reason:
        return f" (falls back to SDPA: {reason})"
    return " (Triton interpreter)" if torch.device(device).type == "cpu" else ""


def _dtype_kwarg(dtype) -> dict:
    # Transformers 5 names the keyword `dtype`; 4.x reads `torch_dtype` in from_config.
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, local_files_only=True)
    if tokenizer.pad_token is None:  # only the collators' bookkeeping needs one; no batch is padded
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: ModelSpec, attn: str, dtype, device: str, seed: int):
    """The base model on ``device``; random init (seeded, so a saved adapter finds the same base) or
    the checkpoint's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    if spec.weights is not None:
        model = AutoModelForCausalLM.from_pretrained(
            spec.weights, attn_implementation=attn, local_files_only=True, **_dtype_kwarg(dtype)
        )
        model.to(device)
    else:
        torch.manual_seed(seed)
        # Initialise directly on the device and in the final dtype: an 8B model never exists in fp32.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(spec.config, attn_implementation=attn, **_dtype_kwarg(dtype))
    model.config.use_cache = False  # training never reuses keys/values; the cache would only cost memory
    return model


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: str):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft names the modules it could not find; keep its words, on one line
        raise UsageError(f"--target-modules {target_modules}: {' '.join(str(exc).split())}") from None


def embedded_checkpoint(folder: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Save the embedded tiny Llama (random init, fixed seed) with its tokenizer as an ordinary
    checkpoint folder and return its path, so examples can call ``from_pretrained`` as users do.

    Default folder: ``$HF_FLASH_CACHE`` or ``~/.cache/hf_flash``, then ``tiny-llama-seed{seed}``;
    an existing checkpoint there is reused.
    """
    import torch

    root = Path(folder or os.environ.get("HF_FLASH_CACHE", Path.home() / ".cache" / "hf_flash"))
    path = root / f"tiny-llama-seed{seed}" if folder is None else root
    if (path / "config.json").exists() and _has_weights(path):
        return str(path)
    spec = resolve_model()
    model = build_model(spec, "sdpa", torch.float32, "cpu", seed)
    model.config.use_cache = True  # a checkpoint for generation too
    model.save_pretrained(path)
    load_tokenizer(spec).save_pretrained(path)
    return str(path)
