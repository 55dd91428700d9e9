"""How long a context can each backend train? A sweep of one-sequence LoRA steps, each in its own process.

For each backend the length doubles from ``start`` while a run trains; after the first run that runs out
of memory, the point halfway between the last length that trained and the first that did not is tried
once. Every probe is ``scripts/finetune_lora.py`` on random tokens (``--lengths lognormal:L:0:N``: N
documents of exactly L tokens, one per step), so no data set has to hold hundreds of thousands of
tokens, and its peak memory and tokens/s are kept. ``compare_backends.py --find-max-context`` runs it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .compare import _fmt, _md_table, _styles, _where, run_one


def probe_args(seq_len: int, steps: int) -> list[str]:
    """finetune_lora.py options of one probe: ``steps`` steps of one ``seq_len``-token sequence each."""
    return ["--lengths", f"lognormal:{seq_len}:0:{steps}", "--max-steps", str(steps), "--batch-size", "1"]


def sweep_backend(finetune_cmd, backend: str, out_dir: Path, extra: list[str], start: int, limit: int, steps: int,
                  timeout: float | None, warmup: int, reuse: bool = False, progress=print) -> list[dict]:  # fmt: skip
    """The probes of one backend, shortest first; the last one is the reason the sweep stopped (or
    ``limit``)."""
    rows, seq_len, last_ok, first_bad = [], start, None, None

    def probe(length: int) -> dict:
        progress(f"    {backend} at {length} tokens ...")
        row = run_one(finetune_cmd, backend, length, out_dir / backend / f"L{length}",
                      [*extra, *probe_args(length, steps)], timeout, warmup, reuse)  # fmt: skip
        progress(f"        {row['status']}" + (f": {row['error'][:120]}" if row.get("error") else
                 f", peak {_fmt(row.get('peak_mem_gib'), '.2f', ' GiB')}, {_fmt(row.get('median_tokens_per_s'), ',.0f')} tokens/s"))  # fmt: skip
        rows.append(row)
        return row

    while seq_len <= limit:
        row = probe(seq_len)
        if row["status"] != "ok":
            first_bad = seq_len
            break
        last_ok, seq_len = seq_len, seq_len * 2
    if last_ok is not None and first_bad is not None and rows[-1]["status"] == "oom":
        middle = (last_ok + first_bad) // 2 // 1024 * 1024 or (last_ok + first_bad) // 2
        if last_ok < middle < first_bad:
            probe(middle)
    return rows


def longest(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["status"] == "ok"]
    return max(ok, key=lambda r: r["seq_len"]) if ok else None


def context_table(rows: list[dict], header: str = "") -> str:
    """Markdown: per backend the longest context that trained, its peak memory and speed, and what
    stopped the sweep."""
    cols = ("backend", "longest context trained", "peak GiB there", "tokens/s there", "stopped by")
    cells = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        best = longest(mine)
        failed = [r for r in mine if r["status"] != "ok"]
        stop = (f"{failed[0]['status'].upper()} at {min(r['seq_len'] for r in failed):,}" if failed
                else "the sweep's limit")  # fmt: skip
        cells.append((
            backend, f"{best['seq_len']:,}" if best else "none", _fmt((best or {}).get("peak_mem_gib"), ".2f"),
            _fmt((best or {}).get("median_tokens_per_s"), ",.0f"), stop,
        ))  # fmt: skip
    probes = []
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status'].upper()}: {r.get('error', '')[:100]}"
        probes.append((r["backend"], f"{r['seq_len']:,}", status.replace("|", "/"), _fmt(r.get("peak_mem_gib"), ".2f"),
                       _fmt(r.get("median_tokens_per_s"), ",.0f")))  # fmt: skip
    lines = [header, ""] if header else []
    lines += _md_table(cols, cells)
    lines += ["", "Every probe:", "", *_md_table(("backend", "context", "status", "peak GiB", "tokens/s"), probes)]
    return "\n".join(lines) + "\n"


def plot_context(rows: list[dict], path: Path, title: str) -> Path:
    """Peak memory against the context length, one line per backend; the failed probes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(list(dict.fromkeys(r["backend"] for r in rows)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for backend, style in styles.items():
        ok = sorted((r["seq_len"], r["peak_mem_gib"]) for r in rows
                    if r["backend"] == backend and r["status"] == "ok" and r.get("peak_mem_gib") is not None)  # fmt: skip
        if ok:
            ax.plot(*zip(*ok), label=backend, **style)
        for r in rows:
            if r["backend"] == backend and r["status"] != "ok":
                ax.annotate(f"{backend}: {r['status'].upper()}", (r["seq_len"], 0.03), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=8, color=style["color"], va="bottom")  # fmt: skip
    lengths = sorted({r["seq_len"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths], rotation=45)
    ax.set(title=textwrap.fill(title, 90), xlabel="context (tokens, one sequence)", ylabel="peak GPU memory (GiB)")
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def find_max_context(finetune_cmd: list[str], backends: list[str], out_dir: Path, extra: list[str], start: int,
                     limit: int, steps: int = 2, timeout: float | None = None, warmup: int = 1, title: str = "",
                     progress=print, reuse: bool = False) -> dict:  # fmt: skip
    """Sweep every backend; write context.json, context.md and context_memory.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in backends:
        progress(f"{backend}: doubling the context from {start:,} tokens up to {limit:,}")
        rows += sweep_backend(finetune_cmd, backend, out_dir, extra, start, limit, steps, timeout, warmup, reuse,
                              progress)  # fmt: skip
    env = next((r["environment"] for r in rows if r.get("environment")), {}) or {}
    header = f"How long can I train? {title} — {_where(rows, env)}, torch {env.get('torch', '?')}"
    table = context_table(rows, header)
    results = {"title": title, "environment": env, "backends": backends, "start": start, "limit": limit, "rows": rows,
               "longest": {b: (longest([r for r in rows if r["backend"] == b]) or {}).get("seq_len") for b in backends}}  # fmt: skip
    (out_dir / "context.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "context.md").write_text(table)
    results["plots"] = [str(plot_context(rows, out_dir / "context_memory.png", title))]
    results["table"] = table
    return results
