"""The user story: import hf_flash, pass attn_implementation="hf_flash", use the model as usual.

    python examples/01_three_lines.py

Runs on the embedded tiny Llama (random weights, saved once as an ordinary checkpoint). On a GPU
the hf_flash kernels run in bf16; without one they run in Triton's interpreter on CPU, in fp16.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before hf_flash is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hf_flash.training.models import embedded_checkpoint  # noqa: E402

path = embedded_checkpoint()
device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float16)

# --- the three lines ---------------------------------------------------------------------------
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_flash  # noqa: E402,F401  (registers "hf_flash" with Transformers)

model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hf_flash", dtype=dtype).to(device)
# ------------------------------------------------------------------------------------------------

ids = torch.randint(3, model.config.vocab_size, (2, 48), device=device)
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device)
with torch.no_grad():
    expected = reference(input_ids=ids, labels=ids).loss
print(f"hf_flash loss {loss.item():.5f}, sdpa loss {expected.item():.5f}; gradients: "
      f"{sum(p.grad is not None for p in model.parameters())} tensors")  # fmt: skip
assert abs(loss.item() - expected.item()) < 2e-2  # same model; only rounding differs
