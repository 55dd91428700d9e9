"""Generation with hf_flash: a left-padded batch of prompts, greedy decoding with the KV cache.

    python examples/03_generate.py

The embedded tiny Llama has random weights, so the text is noise; what matters is that hf_flash
picks the same tokens as PyTorch's SDPA for the same prompts (padding and cache included).
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before hf_flash is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_flash  # noqa: E402,F401  (registers "hf_flash" with Transformers)
from hf_flash.training.models import embedded_checkpoint  # noqa: E402

path = embedded_checkpoint()
device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float16)
tokenizer = AutoTokenizer.from_pretrained(path)
tokenizer.padding_side = "left"  # decoder-only generation continues from the right end of each row
prompts = ["Attention weighs the values by", "A causal mask hides the keys that come after the query, so"]
batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)

outputs = {}
for attn in ("hf_flash", "sdpa"):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(device).eval()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    outputs[attn] = generated[:, batch["input_ids"].shape[1] :]

for i, prompt in enumerate(prompts):
    print(f"{prompt!r} -> {tokenizer.decode(outputs['hf_flash'][i])!r}")
same = (outputs["hf_flash"] == outputs["sdpa"]).float().mean().item()
print(f"tokens equal to sdpa's: {same:.0%}")  # a near-tie between two logits may flip in low precision
