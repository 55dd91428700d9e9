"""Where a training step's time goes: ``--profile-steps A:B`` wraps optimizer steps A..B (1-based) in
``torch.profiler`` and writes ``profile.md`` to the output folder.

The summary splits the steps' wall time into GPU kernel time by kind (hf_flash's kernels, other attention,
matrix multiplies, the rest) and the time the GPU had nothing to run (wall minus kernel time on one stream:
the host, or a sync, was the limit), then lists the kernels and the host-side operators that took longest.
The profiler adds host time of its own, so the idle share is an upper bound.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

PROFILE_FILE = "profile.md"

# kernel name fragments -> kind (first match wins); hf_flash's Triton kernels are named _fwd/_bwd_* in ops/
_KINDS = (
    ("hf_flash attention", ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_delta", "_bwd_kernel")),
    ("other attention", ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "softmax")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_", "wgmma")),
    ("cross-entropy / loss", ("cross_entropy", "nll", "log_softmax", "liger")),
    ("copy / gather / scatter", ("copy", "index", "gather", "scatter", "cat", "memcpy", "memset")),
)


def parse_steps(spec: str) -> tuple[int, int]:
    """``"A:B"`` (or ``"A"``) -> (first, last) optimizer steps, 1-based, first <= last."""
    parts = spec.split(":")
    try:
        first, last = int(parts[0]), int(parts[-1])
    except ValueError:
        first = last = 0
    if len(parts) > 2 or not 1 <= first <= last:
        raise ValueError(f"--profile-steps takes A:B, optimizer steps 1 <= A <= B (e.g. 30:32), got {spec!r}")
    return first, last


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, fragments in _KINDS:
        if any(f.lower() in name for f in fragments):
            return kind
    return "other"


def summarize(events, wall_s: float, steps: tuple[int, int], device: str) -> str:
    """Markdown summary of ``torch.profiler`` events over ``wall_s`` seconds of steps ``steps``."""
    from torch.autograd import DeviceType

    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [us, calls]
    host: dict[str, float] = defaultdict(float)  # operator -> own host us
    for e in events:
        if e.device_type == DeviceType.CUDA:
            kernels[e.name][0] += e.time_range.elapsed_us()
            kernels[e.name][1] += 1
        elif e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
            host[e.name] += e.self_cpu_time_total
    busy = sum(us for us, _ in kernels.values()) / 1e6
    by_kind: dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        by_kind[kind_of(name)] += us / 1e6
    n = steps[1] - steps[0] + 1
    idle = max(wall_s - busy, 0.0)
    head = (f"wall {wall_s:.3f} s ({wall_s / n * 1e3:.1f} ms a step); GPU kernels {busy:.3f} s "
            f"({busy / max(wall_s, 1e-9):.0%}); GPU idle {idle:.3f} s (host or syncs)")  # fmt: skip
    lines = [f"# Profile of optimizer steps {steps[0]}-{steps[1]} ({device})", "", head, "",
             "| kind | s | share of wall |", "|---|---|---|"]  # fmt: skip
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {seconds:.3f} | {seconds / max(wall_s, 1e-9):.0%} |")
    lines.append(f"| idle | {idle:.3f} | {idle / max(wall_s, 1e-9):.0%} |")
    lines += ["", "| kernel | kind | ms | calls |", "|---|---|---|---|"]
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]:
        lines.append(f"| `{name[:90]}` | {kind_of(name)} | {us / 1e3:.1f} | {calls} |")
    lines += ["", "| host operator (own time) | ms |", "|---|---|"]
    for name, us in sorted(host.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| `{name}` | {us / 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def profile_callback_class():
    from transformers import TrainerCallback

    class ProfileCallback(TrainerCallback):
        """Starts ``torch.profiler`` before step ``first`` and writes the summary after step ``last``. Added
        after the step meter's callback, so the meter's syncs bound the profiled window."""

        def __init__(self, steps: tuple[int, int], out_dir: Path, device: str, is_main: bool):
            self.steps, self.out_dir, self.device, self.is_main = steps, Path(out_dir), device, is_main
            self.prof, self.start = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == self.steps[0] and self.is_main:
                import torch
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU]
                if torch.cuda.is_available() and self.device.startswith("cuda"):
                    activities.append(ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.prof = profile(activities=activities)
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step >= self.steps[1]:
                wall = time.perf_counter() - self.start  # the meter synced the device before this hook
                self.prof.__exit__(None, None, None)
                text = summarize(self.prof.events(), wall, self.steps, self.device)
                (self.out_dir / PROFILE_FILE).write_text(text)
                self.prof = None

    return ProfileCallback
