#!/usr/bin/env python
"""Compare attention backends on the same LoRA fine-tune, each backend in its own process.

    python scripts/compare_backends.py                    # embedded tiny Llama; on CPU: padded and packed, fp16
    python scripts/compare_backends.py --model-preset llama-3.2-1b --gradient-checkpointing \\
        --lengths lognormal:600:1.0:100 --max-len 8192     # variable-length documents, padded and packed
    python scripts/compare_backends.py --model-preset llama-3.2-1b --seq-lens 2048,8192,32768 \\
        --layout blocks --max-steps 8 --gradient-checkpointing   # one long sequence per step
    python scripts/compare_backends.py --model-preset llama-3.2-1b --gradient-checkpointing \\
        --find-max-context --backends sdpa,hf_flash       # the longest context each backend trains

Layouts (--layout): padded and packed train two passes over the same variable-length documents (--data,
or --lengths for random tokens) at learning rate 0, so every row sees the same weights and their loss per
real target must agree; the second pass gives the steady real tokens/s (pads excluded), the first pass's
time is reported apart (compiles). blocks trains --max-steps steps of one --seq-lens row each.

Several GPUs: run this script with plain python and give the launcher; every backend then trains
under it (DDP or FSDP), and --baseline-dir adds speed-up and scaling efficiency against a 1-GPU run:

    python scripts/compare_backends.py --model-preset llama-3.2-1b --seq-lens 8192 --output-dir runs/1gpu
    python scripts/compare_backends.py --model-preset llama-3.2-1b --seq-lens 8192 --output-dir runs/ddp2 \\
        --launcher "accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2" \\
        --baseline-dir runs/1gpu

(`accelerate launch scripts/compare_backends.py` would start one whole comparison per GPU, each
running single-process fine-tunes on the same GPU; the script refuses to run that way.)

Writes OUTPUT_DIR/results.json, results.md (Markdown tables), loss_curves.png and speed_memory.png
(--find-max-context: context.json, context.md and context_memory.png). An out-of-memory run is a row saying OOM. Options not listed here go unchanged to
scripts/finetune_lora.py (e.g. --packing, --gradient-checkpointing, --lora-r, --data).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
BACKENDS = ("hf_flash", "sdpa", "eager", "flex_attention", "flash_attention_2")
LAYOUTS = ("padded", "packed", "blocks")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _names(choices: tuple[str, ...], what: str):
    """An argparse type: comma-separated names, each one of ``choices`` (duplicates dropped, order kept)."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            bad = ", ".join(unknown) if unknown else repr(text)
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {bad}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(names))

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="Other options (--lr, --packing, --lora-r, ...) go to finetune_lora.py unchanged;\n"
                                "`python scripts/finetune_lora.py --help` lists them with their defaults.")  # fmt: skip
    p.add_argument("--backends", type=_names(BACKENDS, "backend"),
                   help="comma-separated (default: eager,sdpa,hf_flash, plus flex_attention and\n"
                   "flash_attention_2 when they can run here)")  # fmt: skip
    p.add_argument("--layout", type=_names(LAYOUTS, "layout"),
                   help="comma-separated from padded,packed,blocks (default: padded,packed, plus blocks\n"
                   "when --seq-lens is given)")  # fmt: skip
    p.add_argument("--seq-lens", type=_int_list, help="blocks: comma-separated row lengths (default: 2048,8192 on a\n"
                   "GPU, 128 on CPU)")  # fmt: skip
    p.add_argument("--lengths", metavar="lognormal:MEDIAN:SIGMA:N",
                   help="padded/packed: N documents of random tokens with log-normal lengths (default:\n"
                   "the real lengths of --data; without --data, lognormal:600:1.0:100 on a GPU and\n"
                   "the first 8 documents of the default corpus on CPU)")  # fmt: skip
    p.add_argument("--max-len", type=_positive_int, help="padded/packed: documents cut at this many tokens (default: 8192\n"
                   "on a GPU, 64 on CPU)")  # fmt: skip
    p.add_argument("--pack-len", type=_positive_int, help="packed: tokens per packed row (default: 2 x --max-len)")
    p.add_argument("--passes", type=_positive_int, default=2, help="padded/packed: passes over the documents (default 2)")
    p.add_argument("--max-steps", type=_positive_int, help="blocks: steps per run (default: 8 on a GPU, 3 on CPU)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="rows per micro-step (default: 4 padded, 1 blocks; packed takes one packed row)")  # fmt: skip
    p.add_argument("--find-max-context", action="store_true",
                   help="instead of a comparison: per backend, the longest one-sequence context that\n"
                   "trains (doubling from --context-start, then halfway after an OOM)")  # fmt: skip
    p.add_argument("--context-start", type=_positive_int, default=4096, help="first length of the sweep (default 4096)")
    p.add_argument("--context-limit", type=_positive_int, default=1 << 20,
                   help="longest length the sweep tries (default 1048576)")  # fmt: skip
    p.add_argument("--model", help="local model folder (default: the embedded tiny Llama)")
    p.add_argument("--model-preset", help="random-init real shape, e.g. llama-3.2-1b")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"),
                   help="default: auto (bf16) on a GPU; fp16 on CPU, where hf_flash's kernels run in\n"
                   "Triton's interpreter, which takes fp16 (its bf16 dots are wrong) and not fp32")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-measure-steps", type=int, default=1,
                   help="first steps of each run left out of the medians (default 1)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (default 1800)")
    p.add_argument("--output-dir", default="outputs/compare",
                   help="results.json, results.md, the plots and one folder per run (default: outputs/compare)")  # fmt: skip
    p.add_argument("--launcher",
                   help="command that starts each fine-tune on several processes, e.g.\n"
                   "\"accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2\"\n"
                   "or \"torchrun --nproc_per_node 2\" (default: one plain python process per run)")  # fmt: skip
    p.add_argument("--baseline-dir",
                   help="output folder of an earlier 1-process comparison (same backends and lengths):\n"
                   "adds speed-up and scaling efficiency to results.md")  # fmt: skip
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs already in --output-dir that had the same arguments\n"
                   "(split a long comparison over several invocations; the last one writes all)")  # fmt: skip
    return p


def finetune_command(launcher: str | None) -> list[str]:
    """How each run starts: the interpreter, or the launcher followed by the script (launchers such as
    accelerate and torchrun take the script's path and start their own interpreters)."""
    script = str(SCRIPTS / "finetune_lora.py")
    return [*shlex.split(launcher), script] if launcher else [sys.executable, script]


def main(argv=None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: compare_backends.py is running under a launcher, so every rank would run its own comparison; "
              'run it with plain python and pass --launcher "accelerate launch ..." instead', file=sys.stderr)  # fmt: skip
        return 2
    if args.baseline_dir and not (Path(args.baseline_dir) / "results.json").exists():
        print(f"error: --baseline-dir {args.baseline_dir} has no results.json (run the 1-process comparison first)",
              file=sys.stderr)  # fmt: skip
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(SCRIPTS.parent))
    import torch

    from hf_flash.training import MissingExtra, output_dir_problem

    if problem := output_dir_problem(args.output_dir):  # before any run, not when the results are written
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        from hf_flash.training.compare import compare, default_backends
    except MissingExtra as exc:  # one line: which package, and the extra to install
        print(f"error: {exc}", file=sys.stderr)
        return 2

    cuda = torch.cuda.is_available()
    backends = args.backends or default_backends(cuda)
    dtype = args.dtype or ("auto" if cuda else "fp16")
    extra = ["--seed", str(args.seed), "--dtype", dtype]
    if args.model:
        extra += ["--model", args.model]
    if args.model_preset:
        extra += ["--model-preset", args.model_preset]
    model = args.model_preset or args.model or "embedded tiny-llama"
    per = " per process" if args.launcher else ""
    command = finetune_command(args.launcher)
    if args.find_max_context:
        from hf_flash.training.context import find_max_context

        title = f"LoRA fine-tune, {model}, one sequence per step"
        results = find_max_context(command, backends, Path(args.output_dir), extra + passthrough, args.context_start,
                                   args.context_limit, steps=args.max_steps or 2, timeout=args.timeout,
                                   warmup=args.warmup_measure_steps, title=title, reuse=args.reuse)  # fmt: skip
        print()
        print(results["table"])
        print(f"wrote {args.output_dir}/context.json, context.md, context_memory.png")
        return 0 if any(results["longest"].values()) else 1
    cases = build_cases(args, cuda, any(a == "--data" or a.startswith("--data=") for a in passthrough))
    title = f"LoRA fine-tune, {model}{per}"
    results = compare(command, backends, cases, Path(args.output_dir), extra + passthrough, args.timeout,
                      args.warmup_measure_steps, title, reuse=args.reuse,
                      baseline=Path(args.baseline_dir) if args.baseline_dir else None)  # fmt: skip
    print()
    print(results["table"])
    print(f"wrote {args.output_dir}/results.json, results.md, " + ", ".join(Path(p).name for p in results["plots"]))
    failed = [r for r in results["rows"] if r["status"] in ("error", "timeout")]
    return 1 if failed and len(failed) == len(results["rows"]) else 0


def build_cases(args, cuda: bool, has_data: bool) -> list:
    """The comparison's workloads from the arguments and the device's defaults (see the module docstring)."""
    from hf_flash.training.compare import Case

    layouts = args.layout or ["padded", "packed", *(["blocks"] if args.seq_lens else [])]
    cases = []
    max_len = args.max_len or (8192 if cuda else 64)
    if args.lengths:
        documents = ["--lengths", args.lengths]
    elif has_data:
        documents = []  # --data goes to every run; its real lengths are the workload
    else:
        documents = ["--lengths", "lognormal:600:1.0:100"] if cuda else ["--max-docs", "8"]
    varlen = [*documents, "--max-doc-len", str(max_len), "--epochs", str(args.passes), "--lr", "0"]
    for layout in layouts:
        if layout == "padded":
            batch = args.batch_size or 4
            cases.append(Case("padded", max_len, ["--layout", "padded", *varlen, "--batch-size", str(batch)]))
        elif layout == "packed":
            pack_len = args.pack_len or 2 * max_len
            cases.append(Case("packed", pack_len, ["--layout", "packed", *varlen, "--batch-size", "1"]))
    if "blocks" in layouts:
        steps, batch = args.max_steps or (8 if cuda else 3), args.batch_size or 1
        for seq_len in args.seq_lens or ([2048, 8192] if cuda else [128]):
            cases.append(Case("blocks", seq_len, ["--max-steps", str(steps), "--batch-size", str(batch)]))
    return cases


if __name__ == "__main__":
    sys.exit(main())
