"""What hf_flash does on this machine: ``hf_flash.info()`` or ``python -m hf_flash``.

Prints the versions that matter (torch, Triton, Transformers), whether Triton's interpreter is on, and
for each GPU its chip, the tile table picked for it and, per dtype, whether attention runs on the
hf_flash kernels or falls back to PyTorch SDPA, and why; then which path ``attn_implementation="hf_flash"``
takes (on a T4, PyTorch SDPA's memory-efficient kernel for dense batches: :mod:`hf_flash.dispatch`).
:func:`report` returns the same as a dict.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

from hf_flash import dispatch
from hf_flash.ops import config, hopper_bwd, hopper_fwd

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FALLBACK = "PyTorch SDPA"  # what the Transformers integration runs instead (hf_flash.fallback)
# what the kernels' API (flash_attn_func and friends) computes, and what it refuses
FEATURES = (
    "causal (bottom-right aligned when Lq != Lk)", "sliding window", "softcap", "dropout", "MQA/GQA",
    "varlen (packed / padded)", "attention sinks (sinks=, gpt-oss s_aux)", "deterministic backward",
    "torch.compile (custom ops)",
)
NOT_SUPPORTED = ("alibi_slopes", "block_table (paged KV cache)")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _env_flag(name: str) -> str:
    value = os.environ.get(name, "")
    return "off" if value in ("", "0") else f"on ({name}={value})"


def _paths(device: torch.device, dot_on: str, chip: tuple[config.ChipTable, str] | None = None) -> dict:
    """dtype name -> {"path": "kernels" | "fallback", "why": ..., "transformers": {"path", "summary", "why"}}.

    "path" is where the kernels' API runs the dtype; "transformers" what the Transformers integration runs,
    which differs on a chip (``chip``: its table and name) without tensor-core ``tl.dot``.
    """
    try:
        mode, mode_error = dispatch.sm75_path(), None
    except ValueError as err:
        mode, mode_error = None, str(err)
    paths = {}
    for dtype in DTYPES:
        reason = config.kernels_unavailable_reason(device, dtype)
        name = str(dtype).removeprefix("torch.")
        if reason is not None:
            integration = {"path": "fallback", "summary": f"{FALLBACK} (fallback)", "why": reason}
            paths[name] = {"path": "fallback", "why": f"fallback to {FALLBACK}: {reason}", "transformers": integration}
            continue
        if chip is None:
            integration = {"path": "kernels", "summary": "hf_flash kernels", "why": dot_on}
        elif mode_error is not None:
            integration = {"path": "error", "summary": f"unknown {dispatch.SM75_PATH_ENV}", "why": mode_error}
        else:
            integration = dispatch.describe(chip[0], dtype, mode, chip[1])
        paths[name] = {"path": "kernels", "why": dot_on, "transformers": integration}
    return paths


def _tiles(table: config.ChipTable) -> dict[str, dict[str, str]]:
    """head-dim class -> kernel -> "block_m x block_n, warps, stages" (+ " tma" where tiles stream through TMA
    descriptors, " maxnreg N" under a register cap); "fwd_short" is the forward up to ``config.SHORT_SEQLEN``
    queries and "dkdv_varlen" the dK/dV kernel of varlen calls, where they differ."""
    def describe(c: config.KernelConfig) -> str:
        return (f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}" + (" tma" if c.tma else "")
                + (f" maxnreg {c.maxnreg}" if c.maxnreg else ""))

    out = {}
    for head_class in sorted(table.fwd):
        row = {kernel: describe(table.config(kernel, head_class)) for kernel in ("fwd", "dkdv", "dq")}
        short = describe(table.config("fwd", head_class, config.SHORT_SEQLEN))
        if short != row["fwd"]:
            row["fwd_short"] = short
        varlen = describe(table.config("dkdv", head_class, varlen=True))
        if varlen != row["dkdv"]:
            row["dkdv_varlen"] = varlen
        out[f"D<={head_class}"] = row
    return out


def _gpu(index: int) -> dict:
    device = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    capability, smem, _ = config.device_facts(device)
    table = config.table_for(capability, smem)
    if table.tensor_cores:
        dot_on = "tensor cores (mma)"
    else:
        dot_on = ("CUDA cores: Triton emits no mma.sync below sm80, so tl.dot runs as FMA; PyTorch SDPA's "
                  "memory-efficient backend uses this GPU's tensor cores")
    return {
        "index": index,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "treated_as": None if config.forced_arch() is None else "{}.{}".format(*capability),
        "smem_per_block_kb": smem // config.KB,
        "table": table.name,
        "table_chips": table.chips,
        "table_source": table.source,
        "matmuls": dot_on,
        "paths": _paths(device, "tensor cores" if table.tensor_cores else "CUDA cores (FMA), see tl.dot above",
                        (table, props.name)),
        "tiles": _tiles(table),
        "hopper_forward": _hopper_forward(device),
        "hopper_backward": _hopper_backward(device),
    }


def _hopper_forward(device: torch.device) -> str:
    """Whether the forward runs the Hopper kernel on this GPU (``hf_flash/ops/hopper_fwd.py``), where, and why not."""
    return _hopper_kernel(device, hopper_fwd, f"{hopper_fwd.ENV}=0",
                          f"{hopper_fwd.coverage()}, dense or varlen (mean length), Lq == Lk, no "
                          "window/softcap/dropout/sinks (Gluon, warp-specialized)")


def _hopper_backward(device: torch.device) -> str:
    """Whether the backward runs the Hopper kernel on this GPU (``hf_flash/ops/hopper_bwd.py``), where, and why not."""
    return _hopper_kernel(device, hopper_bwd, f"{hopper_bwd.ENV}=0",
                          f"{hopper_bwd.coverage()}, dense or varlen (mean length), Lq == Lk, deterministic=False, no "
                          "window/softcap/dropout/sinks (Gluon, dQ by TMA reductions / atomics)")


def _hopper_kernel(device: torch.device, module, when_off: str, coverage: str) -> str:
    """``on for <coverage>``, or ``off: <why>`` (not sm90, no Gluon, or ``when_off``: its switch) for the Hopper
    kernel of ``module`` (``hopper_fwd`` or ``hopper_bwd``)."""
    if not hopper_fwd.on_sm90(device):
        return "off: sm90 only (wgmma)"
    reason = module.unavailable_reason() or (None if module.enabled() else when_off)
    return f"off: {reason}" if reason else f"on for {coverage}"


def report() -> dict:
    """Everything :func:`info` prints, as plain data."""
    from hf_flash import __version__

    gpus = [_gpu(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    cpu_note = "Triton's interpreter (slow: tests and debugging)" if config.interpreter_enabled() else ""
    return {
        "hf_flash": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "interpreter": _env_flag("TRITON_INTERPRET"),
        "forced_arch": config.forced_arch_name(),
        "strict": _env_flag("HF_FLASH_STRICT"),
        "sm75_path": os.environ.get(dispatch.SM75_PATH_ENV) or "auto",
        "gpus": gpus,
        "cpu_paths": _paths(torch.device("cpu"), cpu_note),
        "max_head_dim": config.MAX_HEAD_DIM,
        "features": list(FEATURES),
        "not_supported": list(NOT_SUPPORTED),
    }


def format_report(r: dict) -> str:
    cuda = f" (CUDA {r['cuda']})" if r["cuda"] else " (no CUDA)"
    lines = [
        f"hf_flash {r['hf_flash']}",
        f"  python {r['python']} | torch {r['torch']}{cuda} | triton {r['triton']} | transformers {r['transformers']}",
        (
            f"  TRITON_INTERPRET {r['interpreter']} | {config.ARCH_ENV} {r['forced_arch'] or 'not set'} | "
            f"HF_FLASH_STRICT {r['strict']} (fallbacks {'raise' if r['strict'] != 'off' else 'warn once'}) | "
            f"{dispatch.SM75_PATH_ENV} {r['sm75_path']}"
        ),
        f"  kernels support: {', '.join(r['features'])}; not: {', '.join(r['not_supported'])}",
    ]
    for gpu in r["gpus"]:
        treated = f", treated as {gpu['treated_as']} ({config.ARCH_ENV})" if gpu["treated_as"] else ""
        lines += [
            (
                f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}{treated}, "
                f"{gpu['smem_per_block_kb']} KB shared memory per block"
            ),
            f"  tile table {gpu['table']}, for {gpu['table_chips']}: {gpu['table_source']}",
            f"  tl.dot on {gpu['matmuls']}",
        ]
        lines += _format_paths(gpu["paths"])
        lines.append(f"  Hopper forward: {gpu['hopper_forward']}")
        lines.append(f"  Hopper backward: {gpu['hopper_backward']}")
        lines.append("  tiles (block_m x block_n, warps, stages; tma: loads through TMA descriptors):")
        for head_class, row in gpu["tiles"].items():
            short = f"; forward up to {config.SHORT_SEQLEN} queries {row['fwd_short']}" if "fwd_short" in row else ""
            lines.append(f"    {head_class:<7} forward {row['fwd']:<18} dK/dV {row['dkdv']:<18} dQ {row['dq']}{short}")
    if not r["gpus"]:
        lines.append("no CUDA GPU")
    lines.append("CPU tensors:")
    lines += _format_paths(r["cpu_paths"])
    lines.append(f"any device: head dim > {r['max_head_dim']} -> fallback ({FALLBACK})")
    return "\n".join(lines)


def _format_paths(paths: dict) -> list[str]:
    lines = []
    for dtype, p in paths.items():
        why = f": {p['why']}" if p["path"] == "kernels" and p["why"] else ""
        lines.append(f"  {dtype:<9} -> {'hf_flash kernels' + why if p['path'] == 'kernels' else p['why']}")
        integration = p["transformers"]
        if integration["path"] != "fallback" and integration["summary"] != "hf_flash kernels":
            # only where attn_implementation="hf_flash" does something other than the line above
            lines.append(f"  {'':<9}    attn_implementation=\"hf_flash\": {integration['summary']}")
            lines.append(f"  {'':<9}    why: {integration['why']}")
    return lines


def info(file=None) -> None:
    """Print which attention path hf_flash takes here, per GPU and dtype, and why (see module doc)."""
    print(format_report(report()), file=file or sys.stdout)
