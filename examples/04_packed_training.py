"""Padding-free (packed) LoRA training with hf_flash: no pad tokens, no attention across examples.

    python examples/04_packed_training.py

With TRL installed this is SFTTrainer(padding_free=True); otherwise plain Transformers with
DataCollatorWithFlattening, which is what TRL uses underneath. Either way a batch is one row of
concatenated conversations plus their boundaries (cu_seq_lens / position_ids), which hf_flash turns
into a variable-length kernel call. Runs on the embedded tiny Llama and the shipped Q&A data.
"""

import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before hf_flash is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_flash  # noqa: E402,F401  (registers "hf_flash" with Transformers)
from hf_flash.training.models import embedded_checkpoint  # noqa: E402

cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float16  # the kernels' dtypes; LoRA weights stay fp32
path = embedded_checkpoint()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hf_flash", dtype=dtype)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))

rows = [json.loads(line) for line in (ROOT / "hf_flash/assets/data/attention_qa.jsonl").read_text().splitlines()]
conversations = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]
                 for r in rows]  # fmt: skip
common = dict(output_dir="outputs/example_packed", max_steps=2, per_device_train_batch_size=2, learning_rate=2e-4,
              logging_steps=1, report_to="none", save_strategy="no", use_cpu=not cuda, bf16=cuda, fp16=not cuda)  # fmt: skip

try:
    from trl import SFTConfig, SFTTrainer
except ImportError:
    SFTTrainer = None

if SFTTrainer is not None:
    from datasets import Dataset

    print("TRL found: SFTTrainer with padding_free=True")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(padding_free=True, max_length=None, **common),  # the Q&A rows are short: nothing to cut
        train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
        processing_class=tokenizer,
    )
else:
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    print("TRL not installed: Trainer with DataCollatorWithFlattening")

    def encode(conversation):
        ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)
        return {"input_ids": ids["input_ids"][:256]}  # labels = input_ids, -100 at each sequence start

    trainer = Trainer(
        model=model,
        args=TrainingArguments(remove_unused_columns=False, **common),
        train_dataset=[encode(c) for c in conversations],
        data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True),
    )

batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
print(f"one packed batch: input_ids {tuple(batch['input_ids'].shape)}, no padding; sequence starts at "
      f"{(batch['position_ids'][0] == 0).nonzero().flatten().tolist()}")  # fmt: skip
result = trainer.train()
print(f"trained {result.global_step} steps, final loss {trainer.state.log_history[-2]['loss']:.4f}")
