"""Regenerate the embedded default model description: ``hf_flash/assets/tiny-llama/``.

    python hf_flash/assets/build_tiny_llama.py

Writes a small Llama config (GQA: 4 query heads share 2 key/value heads) and a byte-level BPE
tokenizer trained on the standard library's docstrings (hf_flash.training.corpus), with BOS/EOS/PAD
and a minimal chat template, loadable offline with ``AutoTokenizer.from_pretrained``. There are no
weights: scripts initialise the model randomly from the config with a fixed seed, which keeps the
repository small and the model identical on every machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny-llama"
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each turn: a role marker, the text, then EOS so the model learns where an answer stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def model_config(vocab_size: int, special_ids: dict[str, int]) -> dict:
    # Written by hand in the long-standing key names so Transformers 4.56 and 5.x both read it.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": special_ids["<s>"],
        "eos_token_id": special_ids["</s>"],
        "pad_token_id": special_ids["<pad>"],
        "torch_dtype": "float32",
    }


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown token
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama, plain encodes start with BOS; the chat template writes its own BOS instead.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    from hf_flash.training.corpus import stdlib_documents

    texts = [doc["text"] for doc in stdlib_documents()]
    qa = HERE / "data" / "attention_qa.jsonl"
    texts += [json.dumps(json.loads(line)) for line in qa.read_text().splitlines() if line.strip()]
    tok = train_tokenizer(texts)
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.iterdir():
        stale.unlink()
    tok.save(str(OUT / "tokenizer.json"))
    # Written by hand, not by save_pretrained: Transformers 5.x would name its own tokenizer class,
    # which 4.x cannot load; PreTrainedTokenizerFast + tokenizer.json loads on both.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "model_max_length": 8192,
        "chat_template": CHAT_TEMPLATE,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = model_config(tok.get_vocab_size(), special_ids)
    (OUT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(OUT.iterdir())}
    print(f"wrote {OUT}: {sizes}")


if __name__ == "__main__":
    main()
