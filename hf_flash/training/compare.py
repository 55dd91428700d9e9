"""Compare attention backends on the same LoRA fine-tune: one subprocess per backend and length.

Each run is ``scripts/finetune_lora.py`` in a fresh process, so one backend's allocator state,
compiled kernels or caches cannot change another's speed or peak memory. The runs share seed,
data, model and steps; the rows report medians, ratios to sdpa and the loss gap to eager.

A run may also be a launcher command (``accelerate launch --config_file ... --num_processes 2``)
followed by the script: then each backend trains with DDP or FSDP, tokens/s is the whole job's, and
:func:`scaling_table` sets the rows beside a 1-process comparison of the same backends and lengths.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import require
from .loop import SUMMARY_FILE, read_steps, summarize

require("matplotlib")  # the plots come after every run: say so before the first

DEFAULT_BACKENDS = ("eager", "sdpa", "hf_flash")
OPTIONAL_BACKENDS = ("flex_attention", "flash_attention_2")  # added to the default when they can run
OOM_EXIT, USAGE_EXIT = 3, 2
ROW_FILE = "row.json"  # a finished run's row, for --reuse


def default_backends(cuda: bool) -> list[str]:
    backends = list(DEFAULT_BACKENDS)
    if cuda:
        from transformers.utils import is_torch_flex_attn_available

        if is_torch_flex_attn_available():
            backends.append("flex_attention")
        if importlib.util.find_spec("flash_attn") is not None:
            backends.append("flash_attention_2")
    return backends


def _usage_error(text: str) -> str | None:
    """finetune_lora.py's one-line ``error: ...`` for bad input, also when a launcher prefixed it."""
    for line in text.splitlines():
        line = re.sub(r"^\[(default)?\d+\]:", "", line.strip()).strip()  # torchrun's "[rank]:" prefixes
        if line.startswith("error: "):
            return line[:300]
    return None


def _last_error_line(text: str) -> str:
    usage = _usage_error(text)
    if usage:  # under a launcher, its own traceback comes after the script's message
        return usage
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):  # the one-line message of a UsageError or the exception line
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _fallback_note(log: str) -> str | None:
    """hf_flash warns when a call runs through PyTorch instead of its kernels; a row must say so."""
    for line in log.splitlines():
        if "instead of the hf_flash kernels" in line:
            reason = line.split("kernels:", 1)[-1].split(". Set HF_FLASH_STRICT")[0]
            return "fell back to PyTorch: " + reason.split(" by the hf_flash kernels")[0].strip()
    return None


def run_one(finetune_cmd: list[str], backend: str, seq_len: int, run_dir: Path, extra: list[str],
            timeout: float | None, warmup: int, reuse: bool = False, layout: str = "blocks") -> dict:  # fmt: skip
    """Run one fine-tune in its own process; always returns a row, whatever happened.

    With ``reuse``, a finished run of the very same command in ``run_dir`` is read back instead of
    run again, so a long comparison can be split over several invocations into one output folder.
    """
    cmd = [*finetune_cmd, "--attn", backend, "--seq-len", str(seq_len), "--output-dir", str(run_dir),
           "--save-steps", "0", "--no-save-adapter", "--warmup-measure-steps", str(warmup), *extra]  # fmt: skip
    row_path = run_dir / ROW_FILE
    if reuse and row_path.exists():
        previous = json.loads(row_path.read_text())
        # The interpreter and script paths may differ between machines; the arguments must not.
        if previous.get("argv", [])[2:] == cmd[2:] and previous["status"] in ("ok", "oom", "unavailable"):
            return {**previous, "reused": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (run_dir / SUMMARY_FILE, run_dir / "steps.jsonl", row_path):
        stale.unlink(missing_ok=True)
    row = {"backend": backend, "layout": layout, "seq_len": seq_len, "command": " ".join(cmd), "argv": cmd}
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        code = _run_in_own_group(cmd, log, timeout)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if code is None:
        row.update(status="timeout", error=f"no result within {timeout:.0f} s")
    elif code == OOM_EXIT or (summary and summary["status"] == "oom"):
        row.update(status="oom", error=(summary or {}).get("error", "out of memory"))
    elif code != 0 or summary is None:
        text = (run_dir / "log.txt").read_text(errors="replace")
        # A launcher turns the script's exit status 2 into its own 1; the message says what it was.
        unavailable = code == USAGE_EXIT or _usage_error(text) is not None
        row.update(status="unavailable" if unavailable else "error", error=_last_error_line(text))
    else:
        row["status"] = "ok"
    if summary:
        row["environment"], row["dtype"] = summary.get("environment"), summary.get("dtype")
        row["parallelism"] = summary.get("parallelism") or {"mode": "single", "world_size": 1}
    fallback = _fallback_note((run_dir / "log.txt").read_text(errors="replace"))
    if fallback:
        row["note"] = fallback
    steps = read_steps(run_dir)
    row.update({k: v for k, v in summarize(steps, warmup).items() if k != "steps"}, steps=len(steps))
    row_path.write_text(json.dumps(row, indent=2) + "\n")
    return row


def _run_in_own_group(cmd: list[str], log, timeout: float | None) -> int | None:
    """Exit status, or None after a timeout. The run gets its own process group, so a timeout stops a
    launcher's workers too: killing only ``accelerate launch`` would leave them holding the GPUs."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    except BaseException:  # Ctrl-C in the comparison: do not leave a training run behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def add_relative_columns(rows: list[dict]) -> None:
    """Ratios to sdpa (same layout and length), the largest per-step loss gap to eager (same layout and
    length); rows of variable-length layouts also get their speed against sdpa padded and their loss per
    token against the first row that has one (every row of a run trains on the same documents)."""
    by_key = {(r["backend"], r.get("layout", "blocks"), r["seq_len"]): r for r in rows}
    reference_loss = next((r["loss_per_token"] for r in rows if r.get("loss_per_token")), None)
    padded = next((r for r in rows if r["backend"] == "sdpa" and r.get("layout") == "padded"), None)
    for row in rows:
        layout = row.get("layout", "blocks")
        sdpa = by_key.get(("sdpa", layout, row["seq_len"]))
        eager = by_key.get(("eager", layout, row["seq_len"]))
        speed = "median_tokens_per_s" if layout == "blocks" else "real_tokens_per_s"
        for key, out in ((speed, "tokens_per_s_vs_sdpa"), ("median_step_time_s", "step_time_vs_sdpa"),
                         ("peak_mem_gib", "peak_mem_vs_sdpa")):  # fmt: skip
            row[out] = _ratio(row, sdpa, key)
        pairs = list(zip(row.get("losses") or [], (eager or {}).get("losses") or []))
        row["max_abs_loss_diff_vs_eager"] = max(abs(a - b) for a, b in pairs) if pairs else None
        if layout != "blocks":
            row["tokens_per_s_vs_sdpa_padded"] = _ratio(row, padded, speed, "real_tokens_per_s")
            mine = row.get("loss_per_token")
            row["loss_per_token_rel_diff"] = abs(mine / reference_loss - 1) if mine and reference_loss else None


def _ratio(row: dict, base: dict | None, key: str, base_key: str | None = None) -> float | None:
    base_key = base_key or key
    ok = row["status"] == "ok" and base and base["status"] == "ok" and row.get(key) and base.get(base_key)
    return row[key] / base[base_key] if ok else None


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _md_table(cols, cells) -> list[str]:
    """Markdown lines: the header row of ``cols``, its rule, one row per tuple of ``cells``."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *("| " + " | ".join(c) + " |" for c in cells)]


def _status(r: dict) -> str:
    status = r["status"] if r["status"] == "ok" else f"{r['status'].upper()}: {r.get('error', '')}"
    if r.get("note"):
        status += f" ({r['note']})"
    return status.replace("|", "/")


def markdown_table(rows: list[dict], header: str = "") -> str:
    """One table for the fixed-length rows (``blocks``), one for the variable-length layouts."""
    lines = [header, ""] if header else []
    blocks = [r for r in rows if r.get("layout", "blocks") == "blocks"]
    varlen = [r for r in rows if r.get("layout", "blocks") != "blocks"]
    if varlen:
        cols = ("backend", "layout", "status", "real tokens/s", "× sdpa (same layout)", "× sdpa padded",
                "first pass (s)", "peak GiB", "loss / real target", "rel. Δ loss")  # fmt: skip
        lines += _md_table(cols, ((
            r["backend"], r["layout"], _status(r), _fmt(r.get("real_tokens_per_s"), ",.0f"),
            _fmt(r.get("tokens_per_s_vs_sdpa"), ".2f", "×"), _fmt(r.get("tokens_per_s_vs_sdpa_padded"), ".2f", "×"),
            _fmt(r.get("first_pass_s"), ".1f"), _fmt(r.get("peak_mem_gib"), ".2f"),
            _fmt(r.get("loss_per_token"), ".5f"), _fmt(r.get("loss_per_token_rel_diff"), ".1e"),
        ) for r in varlen))  # fmt: skip
        if blocks:
            lines.append("")
    if blocks or not varlen:
        cols = ("backend", "seq len", "status", "tokens/s", "× sdpa", "step (s)", "peak GiB", "mem × sdpa",
                "final loss", "max \\|Δloss\\| vs eager")  # fmt: skip  (pipes escaped: they would split the cell)
        lines += _md_table(cols, ((
            r["backend"], str(r["seq_len"]), _status(r),
            _fmt(r.get("median_tokens_per_s"), ",.0f"), _fmt(r.get("tokens_per_s_vs_sdpa"), ".2f", "×"),
            _fmt(r.get("median_step_time_s"), ".3f"), _fmt(r.get("peak_mem_gib"), ".2f"),
            _fmt(r.get("peak_mem_vs_sdpa"), ".2f", "×"), _fmt(r.get("final_loss"), ".4f"),
            _fmt(r.get("max_abs_loss_diff_vs_eager"), ".2e"),
        ) for r in blocks))  # fmt: skip
    return "\n".join(lines) + "\n"


def add_scaling_columns(rows: list[dict], baseline_rows: list[dict]) -> None:
    """Against a 1-process run of the same backend and length: speed-up, and scaling efficiency =
    job tokens/s / (processes x 1-process tokens/s), where 1.0 means every added GPU added a whole GPU."""
    base = {(r["backend"], r["seq_len"]): r for r in baseline_rows if r["status"] == "ok"}
    for row in rows:
        one = base.get((row["backend"], row["seq_len"]))
        world = (row.get("parallelism") or {}).get("world_size", 1)
        ok = row["status"] == "ok" and one is not None and row.get("median_tokens_per_s") and one["median_tokens_per_s"]
        row["one_process_tokens_per_s"] = one["median_tokens_per_s"] if one else None
        row["one_process_peak_mem_gib"] = one.get("peak_mem_gib") if one else None
        row["speedup_vs_one_process"] = row["median_tokens_per_s"] / one["median_tokens_per_s"] if ok else None
        row["scaling_efficiency"] = row["speedup_vs_one_process"] / world if ok else None


def scaling_table(rows: list[dict]) -> str:
    """Markdown for rows that went through :func:`add_scaling_columns`."""
    cols = ("backend", "seq len", "processes", "tokens/s (job)", "1-process tokens/s", "speed-up",
            "scaling efficiency", "peak GiB per GPU", "1-process peak GiB")  # fmt: skip
    cells = []
    for r in rows:
        layout = r.get("parallelism") or {}
        procs = f"{layout.get('world_size', 1)} ({layout.get('mode', '?')})"
        cells.append((
            r["backend"], str(r["seq_len"]), procs, _fmt(r.get("median_tokens_per_s"), ",.0f"),
            _fmt(r.get("one_process_tokens_per_s"), ",.0f"), _fmt(r.get("speedup_vs_one_process"), ".2f", "×"),
            _fmt(r.get("scaling_efficiency"), ".0%"), _fmt(r.get("peak_mem_gib"), ".2f"),
            _fmt(r.get("one_process_peak_mem_gib"), ".2f"),
        ))  # fmt: skip
    return "\n".join(_md_table(cols, cells)) + "\n"


def _where(rows: list[dict], env: dict) -> str:
    """The device, and how many processes shared the work (\"2 x NVIDIA H100 ..., ddp over nccl\")."""
    device = env.get("gpu") or env.get("device", "?")
    layout = next((r["parallelism"] for r in rows if r.get("parallelism")), {"world_size": 1})
    if layout["world_size"] == 1:
        return device
    return f"{layout['world_size']} x {device}, {layout['mode']} over {layout.get('backend', '?')}"


def _styles(backends: list[str]) -> dict[str, dict]:
    """One colour and marker per backend across all panels; eager drawn wide and dashed underneath,
    so a backend whose curve lies exactly on it stays visible."""
    markers = "os^Dvx*"
    styles = {}
    for i, name in enumerate(backends):
        styles[name] = dict(color=f"C{i}", marker=markers[i % len(markers)], markersize=4, linewidth=1.5, zorder=3 + i)
        if name == "eager":
            styles[name].update(linestyle="--", linewidth=4, alpha=0.45, markersize=8, zorder=2)
    return styles


def _panel(row: dict) -> str:
    layout = row.get("layout", "blocks")
    return f"seq len {row['seq_len']}" if layout == "blocks" else f"{layout} (<= {row['seq_len']} tokens)"


def plot(rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    """loss_curves.png (all backends, one panel per length or layout) and speed_memory.png (against the
    length for fixed-length rows; bars per layout for the variable-length ones)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = _styles(list(dict.fromkeys(r["backend"] for r in rows)))
    panels = list(dict.fromkeys(_panel(r) for r in rows))
    paths = [out_dir / "loss_curves.png", out_dir / "speed_memory.png"]
    width = max(7, 5 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for r in rows:
            if _panel(r) == panel and r.get("losses"):
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["backend"], **styles[r["backend"]])
        ax.set(title=panel, xlabel="step", ylabel="training loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(textwrap.fill(f"Loss per step: {title}", width * 11))  # ~11 characters per inch
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    blocks = [r for r in rows if r.get("layout", "blocks") == "blocks"]
    varlen = [r for r in rows if r.get("layout", "blocks") != "blocks"]
    groups = [g for g in (blocks, varlen) if g]
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.5 * len(groups)), squeeze=False)
    for (speed_ax, mem_ax), group in zip(axes, groups):
        if group is blocks:
            _length_panels(speed_ax, mem_ax, group, styles)
        else:
            _layout_bars(speed_ax, mem_ax, group, styles)
    if not any(r.get("peak_mem_gib") for r in rows):
        for ax in axes[:, 1]:
            ax.text(0.5, 0.5, "no GPU: not measured", ha="center", transform=ax.transAxes)
    fig.suptitle(textwrap.fill(title, 120))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _length_panels(speed_ax, mem_ax, rows: list[dict], styles: dict) -> None:
    """Median tokens/s and peak memory against the sequence length, one line per backend."""
    seq_lens = sorted({r["seq_len"] for r in rows})
    for backend, style in styles.items():
        mine = [r for r in rows if r["backend"] == backend]
        ok = [r for r in mine if r["status"] == "ok"]
        if not mine:
            continue
        speed_ax.plot([r["seq_len"] for r in ok], [r["median_tokens_per_s"] for r in ok], label=backend, **style)
        mem = [(r["seq_len"], r["peak_mem_gib"]) for r in ok if r.get("peak_mem_gib") is not None]
        if mem:
            mem_ax.plot(*zip(*mem), label=backend, **style)
        for r in mine:  # a failed run is a result too: write it where its point would be
            if r["status"] != "ok":
                for ax in (speed_ax, mem_ax):
                    ax.annotate(f"{backend}: {r['status'].upper()}", (r["seq_len"], 0.03), xycoords=("data", "axes fraction"),
                                rotation=90, fontsize=8, color=style["color"], va="bottom")  # fmt: skip
    speed_ax.set(title="median tokens/s", xlabel="sequence length", ylabel="tokens/s")
    mem_ax.set(title="peak GPU memory", xlabel="sequence length", ylabel="GiB")
    for ax in (speed_ax, mem_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seq_lens, [str(s) for s in seq_lens])
        ax.set_xlim(seq_lens[0] / 1.5, seq_lens[-1] * 1.5)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()


def _layout_bars(speed_ax, mem_ax, rows: list[dict], styles: dict) -> None:
    """Real tokens/s and peak memory as bars: one group per layout, one bar per backend."""
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    backends = [b for b in styles if any(r["backend"] == b for r in rows)]
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        for ax, key in ((speed_ax, "real_tokens_per_s"), (mem_ax, "peak_mem_gib")):
            xs, ys = [], []
            for j, layout in enumerate(layouts):
                row = next((r for r in rows if r["backend"] == backend and r["layout"] == layout), None)
                if row is not None:
                    xs.append(j + (i - (len(backends) - 1) / 2) * width)
                    ys.append(row.get(key) or 0.0 if row["status"] == "ok" else 0.0)
                    if row["status"] != "ok":
                        ax.annotate(row["status"].upper(), (xs[-1], 0), rotation=90, fontsize=8, va="bottom",
                                    ha="center", color=styles[backend]["color"])  # fmt: skip
            ax.bar(xs, ys, width, label=backend, color=styles[backend]["color"])
    speed_ax.set(title="real tokens/s (pads excluded)", ylabel="tokens/s")
    mem_ax.set(title="peak GPU memory", ylabel="GiB")
    for ax in (speed_ax, mem_ax):
        ax.set_xticks(range(len(layouts)), layouts)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()


@dataclass
class Case:
    """One workload of a comparison: every backend runs it in its own process.

    ``layout`` blocks: rows of exactly ``seq_len`` tokens; padded / packed: variable-length documents,
    padded to the micro-batch's longest (at most ``seq_len``) or packed into bins of ``seq_len`` tokens.
    ``args``: the case's own finetune_lora.py options (after the comparison's shared ones).
    """

    layout: str
    seq_len: int
    args: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return f"L{self.seq_len}" if self.layout == "blocks" else self.layout

    def describe(self) -> str:
        return f"seq len {self.seq_len}" if self.layout == "blocks" else f"{self.layout} (<= {self.seq_len} tokens)"


def compare(finetune_cmd: list[str], backends: list[str], cases: list[Case], out_dir: Path, extra: list[str],
            timeout: float | None = None, warmup: int = 1, title: str = "", progress=print,
            reuse: bool = False, baseline: Path | None = None) -> dict:  # fmt: skip
    """Run every (case, backend) pair, then write results.json, results.md and the plots.

    ``baseline``: an earlier comparison's output folder (1 process, same backends and lengths); its
    rows give the speed-up and scaling efficiency of these (multi-process) rows.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        for backend in backends:
            progress(f"[{len(rows) + 1}/{len(cases) * len(backends)}] {backend}, {case.describe()} ...")
            run_dir = out_dir / case.folder / backend
            row = run_one(finetune_cmd, backend, case.seq_len, run_dir, [*extra, *case.args], timeout, warmup, reuse,
                          layout=case.layout)  # fmt: skip
            speed = row.get("median_tokens_per_s") if case.layout == "blocks" else row.get("real_tokens_per_s")
            done = f"{row['status']}" + (f": {row['error']}" if row.get("error") else f", {_fmt(speed, ',.0f')} tokens/s")
            progress(f"    {done}" + (" (reused from an earlier invocation)" if row.get("reused") else ""))
            rows.append(row)
    add_relative_columns(rows)
    env = next((r["environment"] for r in rows if r.get("environment")), {}) or {}
    where = _where(rows, env)
    dtype = next((r["dtype"] for r in rows if r.get("dtype")), None)
    title += f", {dtype}" if dtype else ""
    header = (f"{title} — {where}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}; "
              f"ratios are to sdpa in the same run")  # fmt: skip
    if env.get("device") == "cpu" and "hf_flash" in backends:
        header += "; on CPU hf_flash runs in Triton's interpreter: its speed means nothing here, its loss does"
    table = markdown_table(rows, header)
    if baseline is not None:
        add_scaling_columns(rows, json.loads((Path(baseline) / "results.json").read_text())["rows"])
        table += f"\nScaling against the 1-process runs in {baseline}:\n\n" + scaling_table(rows)
    results = {"title": title, "environment": env, "backends": backends,
               "cases": [dataclasses.asdict(c) for c in cases], "rows": rows}  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(table)
    results["plots"] = [str(p) for p in plot(rows, out_dir, f"{title} ({where})")]
    results["table"] = table
    return results
