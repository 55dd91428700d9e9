#!/usr/bin/env python
"""Benchmark hf_flash's attention kernels against PyTorch's and flash-attn's, in one run on one GPU.

    python scripts/bench_attention.py --quick            # bf16, D 64/128, L 1k/4k/16k, causal and not (~3 min)
    python scripts/bench_attention.py --full             # issue 6's grid: bf16+fp16, D 64/128/256, L 512..32k,
                                                         # GQA 32/8 and varlen (see --time-budget)
    python scripts/bench_attention.py --dtypes bf16 --head-dims 128 --seqlens 4096 --causal yes --backends hf_flash,sdpa_cudnn

Backends: hf_flash; SDPA with each backend forced (flash, cuDNN, memory-efficient, via sdpa_kernel);
FlexAttention (torch.compile'd); eager (matmul + softmax); flash-attn when installed. A backend that is
missing is noted and skipped; one that fails or runs out of memory on a shape becomes a row with the error.

Setup (as in shared/ANCHORS.md): 16k tokens per batch (B = 16384 / L, at least 1), hidden 2048 (H = 2048 / D),
each backend fed its native contiguous layout: [B, H, L, D] for SDPA / Flex / eager, [B, L, H, D] for hf_flash
and flash-attn. Forward is timed with inputs that require grad (the training setting); backward alone is
``out.backward`` on a saved graph; fwd_bwd both. Median of triton.testing.do_bench after a warm-up call.
FLOPs = 4 B H L^2 D, halved when causal; backward = 2.5x forward (two matmul passes plus the recompute).
Extra memory = peak allocated during one forward + backward minus what the inputs held before.

Writes OUT/bench_attention.json (rows as they are measured), OUT/bench_attention_<dtype>.png, and prints a
Markdown table (TFLOP/s, extra MiB, hf_flash's ratio to each backend) last.

This file holds the grid of shapes, the runner (timings, memory, rounds), the table, the plot and the command line;
each backend's inputs and forward callable are built in scripts/attention_backends.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

# tests/scripts/test_bench_attention.py loads this file by its path, when scripts/ need not be on sys.path; the
# sibling module is found from here either way (run as a script, scripts/ is sys.path[0] already)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from attention_backends import (
    _FLEX,
    DENSE_BACKENDS,
    DTYPES,
    VARLEN_BACKENDS,
    Shape,
    backend_builders,
    unavailable_backends,
)

TOKENS_PER_BATCH = 16384
HIDDEN = 2048
MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def tflops(shape, mode, ms):
    """TFLOP/s of ``mode`` on ``shape`` (a ``Shape``) taking ``ms`` milliseconds: the forward's FLOPs times the
    mode's factor."""
    return shape.fwd_flops() * FLOP_FACTOR[mode] / (ms * 1e-3) / 1e12


# ---- measuring ----


def _zero_grads(inputs):
    for t in inputs:
        t.grad = None


def measure(build, shape, modes, bench):
    """Time each mode and the extra peak memory of one forward + backward; returns {mode: ms, "extra_mib": ..}."""
    forward, inputs, dout = build(shape)
    forward().backward(dout)  # compile / autotune / cuDNN plan, outside the timings
    _zero_grads(inputs)
    result = {}
    if "fwd" in modes:
        result["fwd"] = bench(forward, grad_to_none=inputs)
    if "bwd" in modes:
        out = forward()
        result["bwd"] = bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=inputs)
        del out
    if "fwd_bwd" in modes:
        result["fwd_bwd"] = bench(lambda: forward().backward(dout), grad_to_none=inputs)
    _zero_grads(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward().backward(dout)
    torch.cuda.synchronize()
    result["extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def run_case(name, build, shape, modes, bench):
    row = {"shape": asdict(shape), "label": shape.label, "backend": name}
    try:
        result = measure(build, shape, modes, bench)
        for mode in modes:
            row[f"{mode}_ms"] = result[mode]
            row[f"{mode}_tflops"] = tflops(shape, mode, result[mode])
        row["extra_mib"] = result["extra_mib"]
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as err:  # noqa: BLE001 (a backend that cannot run this shape is a row, not a crash)
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    finally:
        gc.collect()  # drop what a failed attempt left behind before the next backend allocates
        torch.cuda.empty_cache()
    return row


# ---- the grid ----


def mixed_lengths(total, longest, seed=0):
    """Lengths between longest / 16 and longest that add up to ``total`` (the last one trimmed)."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(max(1, longest // 16), longest), total - sum(lengths)))
    return lengths


def build_shapes(args):
    shapes = []
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            for causal in args.causal:
                for seqlen in args.seqlens:
                    batch = max(1, TOKENS_PER_BATCH // seqlen)
                    nheads = HIDDEN // head_dim
                    shapes.append(Shape(dtype, head_dim, causal, seqlen, batch, nheads, nheads))
        for head_dim in args.head_dims if args.gqa else []:
            for causal in args.causal:
                for seqlen in args.seqlens:  # 32 query heads, 8 kv heads: Llama-3.2-1B's attention at D 64, 8B's at 128
                    shapes.append(Shape(dtype, head_dim, causal, seqlen, max(1, TOKENS_PER_BATCH // seqlen), 32, 8))
        for causal in args.causal if args.varlen else []:
            for longest in (2048, 8192):
                lengths = mixed_lengths(TOKENS_PER_BATCH, longest)
                shapes.append(Shape(dtype, 128, causal, max(lengths), len(lengths), 16, 16, lengths))
    return shapes


# ---- output ----


def merge_rounds(rounds):
    """One row from a backend's rows of several rounds (same shape): each mode's median time, and the times of
    every round (``<mode>_ms_rounds``) so that ratios can be taken round by round. A round that failed makes the
    row its error."""
    failed = [row for row in rounds if "error" in row]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    row = {key: rounds[0][key] for key in ("shape", "label", "backend")}
    shape = Shape(**rounds[0]["shape"])
    for mode in [key[: -len("_ms")] for key in rounds[0] if key.endswith("_ms")]:
        times = [r[f"{mode}_ms"] for r in rounds]
        row[f"{mode}_ms"] = statistics.median(times)
        row[f"{mode}_tflops"] = tflops(shape, mode, row[f"{mode}_ms"])
        row[f"{mode}_ms_rounds"] = times
    row["extra_mib"] = max(r["extra_mib"] for r in rounds)
    return row


def _ratio(ours, row, mode):
    """hf_flash's speed over the row's backend: the ratio of the medians, or with rounds the median of the
    round-by-round ratios and their range (a drift of the GPU's clock hits both sides of a round alike)."""
    if f"{mode}_tflops" not in ours:
        return "-"
    mine, theirs = ours.get(f"{mode}_ms_rounds"), row.get(f"{mode}_ms_rounds")
    if not mine or not theirs or len(mine) != len(theirs):
        return f"{ours[f'{mode}_tflops'] / row[f'{mode}_tflops']:.2f}"
    ratios = sorted(t / m for m, t in zip(mine, theirs))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def markdown_table(rows, modes, gpu):
    by_case = {}
    for row in rows:
        by_case.setdefault(row["label"], {})[row["backend"]] = row
    mode_heads = " | ".join(f"{m} TFLOP/s" for m in modes)
    lines = [
        f"GPU: {gpu}. hf_flash ratio = hf_flash's TFLOP/s / the backend's (>1: hf_flash faster).",
        "",
        f"| case | backend | {mode_heads} | extra MiB | " + " | ".join(f"hf_flash ratio {m}" for m in modes) + " |",
        "|" + "---|" * (3 + 2 * len(modes)),
    ]
    for label, backends in by_case.items():
        ours = backends.get("hf_flash", {})
        for name, row in backends.items():
            if "error" in row:
                lines.append(f"| {label} | {name} | {row['error']} |" + " |" * (2 * len(modes)))
                continue
            speeds = " | ".join(f"{row[f'{m}_tflops']:.0f}" for m in modes)
            ratios = " | ".join(_ratio(ours, row, m) for m in modes)
            lines.append(f"| {label} | {name} | {speeds} | {row['extra_mib']:.0f} | {ratios} |")
    return "\n".join(lines)


def plot(rows, modes, out_dir):
    """One PNG per dtype: TFLOP/s against L, a row of panels per (kind, D, causal), a column per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for dtype in sorted({r["shape"]["dtype"] for r in rows}):
        ok = [r for r in rows if r["shape"]["dtype"] == dtype and "error" not in r and not r["shape"]["lengths"]]
        panels = sorted(
            {(r["shape"]["nheads_k"] != r["shape"]["nheads"], r["shape"]["head_dim"], r["shape"]["causal"]) for r in ok}
        )
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), len(modes), figsize=(5 * len(modes), 3.2 * len(panels)), squeeze=False)
        for (gqa, head_dim, causal), ax_row in zip(panels, axes):
            for mode, ax in zip(modes, ax_row):
                for backend in DENSE_BACKENDS:
                    pts = sorted(
                        (r["shape"]["seqlen"], r[f"{mode}_tflops"])
                        for r in ok
                        if r["backend"] == backend
                        and (
                            r["shape"]["nheads_k"] != r["shape"]["nheads"],
                            r["shape"]["head_dim"],
                            r["shape"]["causal"],
                        )
                        == (gqa, head_dim, causal)
                    )
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=backend, linewidth=2.5 if backend == "hf_flash" else 1)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{'GQA 32/8 ' if gqa else ''}D{head_dim} {'causal' if causal else 'full'} {mode}")
                ax.set_xlabel("L")
                ax.set_ylabel("TFLOP/s")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"bench_attention_{dtype}.png", dpi=90)
        plt.close(fig)


# ---- command line ----


def _csv(kind):
    def parse(text):
        return [kind(x) for x in text.split(",") if x.strip()]

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick", action="store_true", help="bf16, D 64/128, L 1k/4k/16k, causal and not; no GQA/varlen"
    )
    preset.add_argument("--full", action="store_true", help="the whole grid (also the default)")
    p.add_argument("--dtypes", type=_csv(str), help="comma-separated from bf16,fp16")
    p.add_argument("--head-dims", type=_csv(int), help="e.g. 64,128,256")
    p.add_argument("--seqlens", type=_csv(int), help="e.g. 512,1024,...,32768")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--backends", type=_csv(str), help=f"subset of {','.join(DENSE_BACKENDS + VARLEN_BACKENDS[-1:])}")
    p.add_argument("--modes", type=_csv(str), default=list(MODES), help="subset of fwd,bwd,fwd_bwd")
    p.add_argument("--no-gqa", dest="gqa", action="store_false", help="leave out the GQA 32/8 rows")
    p.add_argument("--no-varlen", dest="varlen", action="store_false", help="leave out the varlen rows")
    p.add_argument("--eager-max-len", type=int, default=8192, help="skip eager above this L (quadratic memory)")
    p.add_argument("--rep-ms", type=float, default=50, help="do_bench's rep: ms of timed runs per number (default 50)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time each shape's backends this many times, alternating; rows keep each mode's median and\n"
        "the table hf_flash's median ratio over the rounds with its range (a cell moves ~8%% run to run)",
    )
    p.add_argument(
        "--flex-dynamic",
        action="store_true",
        help="compile FlexAttention with dynamic shapes: far fewer compiles, maybe slower kernels",
    )
    p.add_argument("--time-budget", type=float, default=0, help="seconds; stop starting new shapes after it (0: none)")
    p.add_argument(
        "--resume",
        help="a bench_attention.json of an earlier run: keep its rows, measure only the\n"
        "shapes it lacks (a long grid over several invocations; every shape's backends still run together)",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/bench_attention", help="output folder")
    p.add_argument("--list", action="store_true", help="print the shapes and exit (no GPU needed)")
    args = p.parse_args(argv)
    quick = args.quick
    args.dtypes = args.dtypes or (["bf16"] if quick else ["bf16", "fp16"])
    args.head_dims = args.head_dims or ([64, 128] if quick else [64, 128, 256])
    # the lengths between the powers of two are where tile choices fall off (issue 18: no cliff at any length)
    full_lengths = [512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384, 32768]
    args.seqlens = args.seqlens or ([1024, 4096, 16384] if quick else full_lengths)
    args.causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    if quick:
        args.gqa = args.varlen = False
    bad = [d for d in args.dtypes if d not in DTYPES] + [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown dtype/mode {bad}: dtypes are bf16,fp16 and modes fwd,bwd,fwd_bwd")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def run_shapes(shapes, args, bench, skipped, rows, meta, out_dir):
    """Measure every backend on each shape in turn, saving the JSON after each row."""
    start = time.time()
    for i, shape in enumerate(shapes):
        if args.time_budget and time.time() - start > args.time_budget:
            print(f"time budget spent: {len(shapes) - i} shapes not run (--resume the JSON to go on)", flush=True)
            meta["not_run"] = [s.label for s in shapes[i:]]
            break
        builders = {
            name: build
            for name, build in backend_builders(bool(shape.lengths)).items()
            if name not in skipped and (not args.backends or name in args.backends)
            and not (name == "eager" and shape.seqlen > args.eager_max_len)
        }
        # the backends alternate round by round, so that the GPU's drift over a shape's minutes hits each alike
        rounds = {name: [] for name in builders}
        for r in range(args.rounds):
            for name, build in builders.items():
                row = run_case(name, build, shape, args.modes, bench)
                rounds[name].append(row)
                speeds = row.get("error") or " ".join(f"{m} {row[f'{m}_tflops']:.0f}" for m in args.modes)
                tag = f" (round {r + 1})" if args.rounds > 1 else ""
                print(f"[{time.time() - start:6.0f}s] {shape.label:45s} {name:15s} {speeds}{tag}", flush=True)
        for name in builders:
            rows.append(merge_rounds(rounds[name]))
        (out_dir / "bench_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out_dir / "bench_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def main(argv=None):
    args = parse_args(argv)
    shapes = build_shapes(args)
    if args.list:
        for shape in shapes:
            print(shape.label)
        print(f"{len(shapes)} shapes")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU (use --list to see the shapes)")
    import functools

    from triton.testing import do_bench

    import hf_flash  # noqa: F401  (fails early if the package is broken)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    skipped = unavailable_backends()
    for name, why in skipped.items():
        print(f"note: skipping {name}: {why}", flush=True)
    bench = functools.partial(do_bench, warmup=10, rep=args.rep_ms, return_mode="median")
    _FLEX["dynamic"] = args.flex_dynamic
    rows = []
    if args.resume:
        earlier = json.loads(Path(args.resume).read_text())
        rows = earlier["rows"]
        if earlier["meta"]["gpu"] != gpu:
            print(f"note: resuming rows measured on {earlier['meta']['gpu']}; this GPU is {gpu}", flush=True)
        done = {row["label"] for row in rows}
        shapes = [shape for shape in shapes if shape.label not in done]
        print(f"resuming: {len(done)} shapes kept, {len(shapes)} to measure", flush=True)
    meta = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "skipped": skipped,
        "tokens_per_batch": TOKENS_PER_BATCH,
        "hidden": HIDDEN,
        "modes": args.modes,
        "layouts": "SDPA/Flex/eager [B, H, L, D]; hf_flash/flash-attn [B, L, H, D]; each contiguous",
        "flex_dynamic": args.flex_dynamic,
        "timing": f"triton do_bench median, rep {args.rep_ms} ms; median of {args.rounds} alternating round(s)",
    }
    run_shapes(shapes, args, bench, skipped, rows, meta, out_dir)
    plot(rows, args.modes, out_dir)
    print()
    print(markdown_table(rows, args.modes, gpu))


if __name__ == "__main__":
    main()
