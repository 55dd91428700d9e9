#!/usr/bin/env python
"""LoRA fine-tuning of a causal language model with a chosen attention backend.

    python scripts/finetune_lora.py                       # embedded tiny Llama, stdlib docstrings, hf_flash
    python scripts/finetune_lora.py --attn sdpa --max-steps 20
    python scripts/finetune_lora.py --model-preset llama-3.2-1b --seq-len 8192 --gradient-checkpointing
    python scripts/finetune_lora.py --model /models/llama --data train.jsonl --layout packed
    python scripts/finetune_lora.py --layout padded --lengths lognormal:600:1.0:100 --seq-len 8192 --batch-size 4
    accelerate launch --config_file examples/accelerate/ddp.yaml scripts/finetune_lora.py ...   # DDP, 2 GPUs
    accelerate launch --config_file examples/accelerate/fsdp.yaml scripts/finetune_lora.py ...  # FSDP

Ctrl-C saves a checkpoint; rerun with --resume to continue. Per-step numbers go to
OUTPUT_DIR/steps.jsonl, the adapter to OUTPUT_DIR/adapter. See hf_flash/training/loop.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BACKENDS = ("hf_flash", "sdpa", "eager", "flex_attention", "flash_attention_2")
LOSSES = ("auto", "chunked", "liger", "plain")
OOM_EXIT, USAGE_EXIT = 3, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", help="local model folder or a Hugging Face id already in the local cache\n"
                   "(default: the embedded tiny Llama, random init)")  # fmt: skip
    m.add_argument("--model-preset", help="random-init real shape: llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, gpt-oss-20b-4l,\n"
                   "qwen2.5-1.5b, mistral-7b")  # fmt: skip
    m.add_argument("--attn", default="hf_flash", choices=BACKENDS, help="attention backend (default: hf_flash)")
    m.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on a GPU that has it; on CPU fp16 for hf_flash (its kernels run there\n"
                   "in Triton's interpreter, which takes fp16), else fp32")  # fmt: skip
    m.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    m.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                   help="let PyTorch use at most this much of the GPU, as if the card were smaller\n"
                   "(what fits on an 80 GB card, measured on a larger one: 79)")  # fmt: skip
    m.add_argument("--max-position-embeddings", type=int, metavar="N",
                   help="random-init models: raise the config's limit on --seq-len to N\n"
                   "(context sweeps past a preset's 131072)")  # fmt: skip
    d = p.add_argument_group("data")
    d.add_argument("--data", help="json/jsonl/csv/parquet/txt file or a folder of them\n"
                   "(default: docstrings of Python's standard library)")  # fmt: skip
    d.add_argument("--text-field", help="column holding plain text (default: 'text' when present)")
    d.add_argument("--prompt-field", help="instruction column (default: instruction/prompt/question/input)")
    d.add_argument("--response-field", help="answer column (default: response/output/answer/completion)")
    d.add_argument("--max-docs", type=int, help="use only the first N rows")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    d.add_argument("--layout", default="blocks", choices=("blocks", "padded", "packed"),
                   help="blocks: documents joined and cut into rows of --seq-len tokens (default);\n"
                   "padded: one document per row, padded to the micro-batch's longest;\n"
                   "packed: whole documents flattened into one row of <= --seq-len tokens per bin,\n"
                   "attention kept within each (DataCollatorWithFlattening)")  # fmt: skip
    d.add_argument("--packing", action="store_true", help="same as --layout packed")
    d.add_argument("--max-doc-len", type=int,
                   help="padded/packed: documents cut at this many tokens (default: --seq-len)")  # fmt: skip
    d.add_argument("--lengths", metavar="lognormal:MEDIAN:SIGMA:N",
                   help="instead of --data: N documents of random tokens with log-normal lengths\n"
                   "(clipped to --max-doc-len), for speed work on variable lengths without a data set")  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=1,
                   help="rows (or packed bins) per process per micro-step; one optimizer step\n"
                   "takes batch size x grad accum x number of processes rows (default 1)")  # fmt: skip
    t.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    t.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--max-steps", type=int, help="optimizer steps, overriding --epochs (default: as many as\n"
                   "--epochs takes)")  # fmt: skip
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--loss", default="auto", choices=LOSSES,
                   help="auto (default): liger where it can run (liger-kernel installed, CUDA, a plain\n"
                   "Linear output layer), else chunked;\n"
                   "chunked: the same loss as the model's, computed over chunks of tokens without\n"
                   "ever holding the [tokens, vocab] logits (at 32k tokens and Llama 3's\n"
                   "vocabulary those are 8.4 GB in bf16, 16.8 GB upcast to fp32);\n"
                   "liger: the same through Liger-Kernel's fused linear cross-entropy (CUDA);\n"
                   "plain: the model's own loss on the full logits")  # fmt: skip
    t.add_argument("--loss-chunk-tokens", type=int, metavar="N",
                   help="tokens per chunk of --loss chunked (default: 1 GiB of fp32 logits,\n"
                   "2048 tokens at a 128256 vocabulary)")  # fmt: skip
    t.add_argument("--offload-activations", action="store_true",
                   help="keep the activations saved for backward in CPU memory (pinned) instead of\n"
                   "on the GPU: with --gradient-checkpointing the layer inputs it keeps, without\n"
                   "it every activation (slow, a lot of CPU memory); for contexts whose\n"
                   "checkpoints alone do not fit")  # fmt: skip
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--lora-alpha", type=float, default=32.0)
    t.add_argument("--lora-dropout", type=float, default=0.05)
    t.add_argument("--target-modules", default="all-linear",
                   help="comma-separated module names, e.g. q_proj,v_proj (default: all linear projections)")  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="outputs/finetune",
                   help="steps.jsonl, checkpoints, the adapter and summary.json (default: outputs/finetune)")  # fmt: skip
    o.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps (0: none)")
    o.add_argument("--save-total-limit", type=int, default=2, help="keep this many checkpoints")
    o.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    o.add_argument("--no-save-adapter", dest="save_adapter", action="store_false", help="skip OUTPUT_DIR/adapter")
    o.add_argument("--warmup-measure-steps", type=int, default=1,
                   help="first steps left out of the median speed (default 1)")  # fmt: skip
    o.add_argument("--profile-steps", metavar="A:B",
                   help="torch.profiler over optimizer steps A..B: OUTPUT_DIR/profile.md splits their time into\n"
                        "GPU kernels by kind and GPU idle (host-bound), with the top kernels and host ops")  # fmt: skip
    o.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # acts as Ctrl-C after N steps (tests)
    return p


def _prepare_environment(args) -> None:
    # Must happen before anything imports hf_flash, transformers or huggingface_hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be downloaded here: fail fast, locally
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.attn == "hf_flash" and "TRITON_INTERPRET" not in os.environ:
        import torch

        if args.device == "cpu" or not torch.cuda.is_available():
            # Without a GPU the Triton kernels can only run in Triton's (slow) interpreter, which is
            # chosen when hf_flash is imported. fp32 calls still go to hf_flash's PyTorch fallback.
            os.environ["TRITON_INTERPRET"] = "1"
            if args.dtype != "fp32" and os.environ.get("RANK", "0") == "0":
                print("note: no GPU, so hf_flash's kernels run in Triton's interpreter: minutes per step at "
                      "--seq-len 512; --seq-len 64 --max-steps 3 checks them quickly, --attn sdpa trains faster")  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _usage_error(message: str) -> int:
    if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake; say it once
        print(f"error: {message}", file=sys.stderr)
    return USAGE_EXIT


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_environment(args)
    from hf_flash.training import MissingExtra, output_dir_problem
    from hf_flash.training.distributed import end_processes

    if problem := output_dir_problem(args.output_dir):  # before anything loads, not when the first file is written
        return _usage_error(problem)
    try:
        from hf_flash.training.loop import FinetuneConfig, finetune
    except MissingExtra as exc:  # one line: which package, and the extra to install
        return _usage_error(str(exc))
    from hf_flash.training.models import UsageError

    try:
        summary = finetune(FinetuneConfig(**vars(args)))
    except UsageError as exc:
        return _usage_error(str(exc))
    if summary["status"] == "oom":  # any rank that ran out reports it: the launcher stops the others
        print(f"out of memory at --seq-len {args.seq_len} with --attn {args.attn}: {summary['error']}", file=sys.stderr)
        return OOM_EXIT
    end_processes()  # after an OOM there is none: the launcher stops the other ranks, none could wait
    if not summary["main_process"]:  # under a launcher, rank 0 alone reports
        return 0
    if summary["status"] == "interrupted":
        print(f"stopped after step {summary['steps']}; checkpoint in {args.output_dir}; "
              "rerun the same command with --resume to continue")  # fmt: skip
        return 0
    speed, peak, world = summary["median_tokens_per_s"], summary["peak_mem_gib"], summary["parallelism"]["world_size"]
    where = f" over {world} processes ({summary['parallelism']['mode']})" if world > 1 else ""
    per_gpu = " per GPU (the most of any rank)" if world > 1 else ""
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, median {speed:,.0f} tokens/s{where}"
          + (f", peak {peak:.2f} GiB{per_gpu}" if peak is not None else "") + f"; outputs in {args.output_dir}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
