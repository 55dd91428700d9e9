"""Per-chip tile tables, compiled for every chip (CPU, so CI runs it); ``test_chips_gpu.py`` runs them
on the GPU at hand.

Only Hopper GPUs and CPUs are at hand, so each chip's configuration is checked twice without its
hardware:

* cross-compiled for its target (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``,
  which needs no GPU) and held to the chip's limits: shared memory per block and register spills;
* forced on the GPU at hand (``config.force_arch``) and compared against the fp32 reference
  (``test_chips_gpu.py``).

The compiles run in fresh worker processes of this file (``python test_chips.py --worker``): the test
process has ``TRITON_INTERPRET=1`` on a CPU-only machine (tests/conftest.py), which turns every
``@triton.jit`` function into an interpreter object that ``triton.compile`` cannot take.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------
# Cross-compilation (worker side: imports Triton and the kernels without the interpreter)
# ------------------------------------------------------------------------------------------------

# the kernels' scalar arguments by type; pointers are the capitalised names (Q, Out, dK, ...)
_FLOAT_ARGS = {"sm_scale", "softcap", "dropout_p"}
_INT_PREFIXES = ("stride_", "seqlen_", "n_", "window_", "desc_")
_FP32_POINTERS = {"Lse", "Delta", "Lse_desc", "Delta_desc", "DQacc", "Sinks"}
_INT_POINTERS = {"cu_seqlens_q", "cu_seqlens_k"}


def _arg_type(name: str, dtype: str) -> str:
    if name in _FLOAT_ARGS:
        return "fp32"
    if name == "seed" or name.startswith(_INT_PREFIXES):
        return "i32"
    if name in _FP32_POINTERS:
        return "*fp32"
    if name in _INT_POINTERS:
        return "*i32"
    if re.fullmatch(r"d?[A-Z]\w*", name):
        return f"*{dtype}"
    raise AssertionError(f"kernel argument {name!r} has no type rule in test_chips._arg_type; add one")


def _kernel(name: str):
    from hf_flash.ops import backward, forward

    if name == "hopper_fwd":  # Gluon: imported only where asked for (Triton without Gluon has no such kernel)
        from hf_flash.ops import _hopper_fwd_kernel

        return _hopper_fwd_kernel._fwd_hopper
    if name == "hopper_bwd":
        from hf_flash.ops import _hopper_bwd_kernel

        return _hopper_bwd_kernel._bwd_hopper
    return {"fwd": forward._fwd_kernel, "fwd_short": forward._fwd_kernel, "dkdv": backward._bwd_dkdv,
            "dq": backward._bwd_dq, "delta": backward._bwd_delta}[name]


def _hopper_source(fn, case: dict):
    """The Gluon source of the Hopper forward or backward (``case``: dtype, head_dim, block_n (forward) and the
    kernel's constexprs): its descriptors carry their shared-memory layouts, as ``_hopper_fwd_kernel.box_descriptor``
    builds them."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from hf_flash.ops import hopper_fwd

    dtype, d = case["dtype"], case["head_dim"]
    gl_dtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def box(dt, block, layout):  # the kernels' 4D (3D: LSE, delta) boxes of one (batch, head)
        return f"tensordesc<{dt}[{','.join(map(str, block))}],{layout!r}>"

    def desc(rows):
        return box(dtype, [1, 1, rows, d], gl.NVMMASharedLayout.get_default_for([1, 1, rows, d], gl_dtype))

    if case["kernel"] == "hopper_bwd":
        from hf_flash.ops import _hopper_bwd_kernel as K

        rows = K.tile_rows(d)
        tiles = {n: box("fp32", [1, 1, r], K._STAT_LAYOUT) if n in ("lse_desc", "delta_desc") else desc(r)
                 for n, r in rows.items()}
        dq_block = [1, 1, K.ROWS, 32]
        tiles.update({"dq_desc": box("fp32", dq_block, gl.NVMMASharedLayout.get_default_for(dq_block, gl.float32)),
                      "dq_ptr": "*fp32", "cu_seqlens": "*i32", "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}",
                      "qk_scale": "fp32", "sm_scale": "fp32"})
        pointer = "dq_ptr"
    else:
        tiles = {"q_desc": desc(hopper_fwd.SPLIT_M), "o_desc": desc(hopper_fwd.SPLIT_M),
                 "k_desc": desc(case["block_n"]), "v_desc": desc(case["block_n"]), "lse_ptr": "*fp32",
                 "cu_seqlens": "*i32", "o_ptr": f"*{dtype}", "qk_scale": "fp32"}
        pointer = "lse_ptr"
    signature = {n: "constexpr" if n in case["constexprs"] else tiles.get(n, "i32") for n in fn.arg_names}
    aligned = list(fn.arg_names).index(pointer)
    return GluonASTSource(fn, signature, constexprs=dict(case["constexprs"]),
                          attrs={(aligned,): [["tt.divisibility", 16]]})


def _resources(ptxas_log: str) -> dict:
    """Registers and spilled bytes per thread, from ptxas' verbose log (Triton prints it with
    TRITON_DUMP_PTXAS_LOG=1 when it runs ptxas); None when it did not run."""
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores", ptxas_log)
    return {"regs": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None}


def compile_case(case: dict, with_cubin: bool = False, asm: tuple = ()) -> dict:
    """Compile one kernel specialisation for one target; returns its shared memory and registers
    (and the compiled binary as ``cubin`` with ``with_cubin``; the texts of the stages in ``asm``, e.g.
    ``("ttgir", "ptx")``, as ``asm``).

    ``case``: kernel ("fwd" / "dkdv" / "dq" / "delta"), cc (e.g. 75), dtype ("fp16" / "bf16"),
    constexprs (name -> value, as the launcher passes them), num_warps, num_stages; optionally
    ``divisible``: integer arguments that a launch would pass as multiples of 16 and Triton specializes on
    (never the lengths and LSE strides of ``common.UNSPECIALIZED``, which no launch specializes).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(case["kernel"])
    if case["kernel"] in ("hopper_fwd", "hopper_bwd"):
        return _compiled(_hopper_source(fn, case), case, with_cubin, asm)
    constexprs = case["constexprs"]
    names = list(fn.arg_names)
    declared = {p.name for p in fn.params if p.is_constexpr}
    assert declared == set(constexprs), (
        f"{case['kernel']} declares constexprs {sorted(declared)}, the test sets {sorted(constexprs)}: "
        "update test_chips._case to what the launcher passes"
    )
    signature = {n: "constexpr" if n in constexprs else _arg_type(n, case["dtype"]) for n in names}
    if constexprs.get("USE_TMA"):
        # host-side descriptors of one tile each: key blocks (fwd, dq) or query blocks (dkdv) x head dim
        rows = constexprs["BLOCK_M"] if case["kernel"] == "dkdv" else constexprs["BLOCK_N"]
        signature.update({n: f"tensordesc<{case['dtype']}[{rows}, {constexprs['HEAD_DIM']}]>"
                          for n in names if n.endswith("_desc") and n not in ("Lse_desc", "Delta_desc")})
    if constexprs.get("STATS_TMA"):
        # the dK/dV kernel's LSE and delta rows: fp32 tiles of one row of BLOCK_M (common.stats_pair)
        signature.update({n: f"tensordesc<fp32[1, {constexprs['BLOCK_M']}]>" for n in ("Lse_desc", "Delta_desc")})
    # Triton marks 16-byte aligned pointers and strides divisible by 16 at launch (contiguous inputs
    # with D % 8 == 0); give the compiler the same facts so the code matches what runs
    from hf_flash.ops.common import UNSPECIALIZED

    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in UNSPECIALIZED and (
               signature[n].startswith("*") or n.startswith("stride_") or n in case.get("divisible", ()))}
    return _compiled(ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=aligned), case,
                     with_cubin, asm)


def _compiled(source, case: dict, with_cubin: bool, asm: tuple) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        options = {k: case[k] for k in ("num_warps", "num_stages", "maxnreg") if k in case}
        compiled = triton.compile(source, target=GPUTarget("cuda", case["cc"], 32), options=options)
    seconds = time.perf_counter() - start
    # warps: all of the program's (a warp-specialized kernel's partitions add theirs to the launch's num_warps)
    result = dict(case, shared=compiled.metadata.shared, warps=compiled.metadata.num_warps, seconds=round(seconds, 2),
                  **_resources(log.getvalue()))
    if with_cubin:
        result["cubin"] = compiled.asm["cubin"]
    if asm:
        result["asm"] = {stage: compiled.asm[stage] for stage in asm}
    return result


def _worker(cases_path: str, results_path: str) -> None:
    """Compile the JSON list of cases in ``cases_path``; one JSON result per line to ``results_path``
    (a failed compile is a result too, with its error)."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with open(cases_path) as f:
        cases = json.load(f)
    with open(results_path, "w") as out:
        for case in cases:
            try:
                result = compile_case(case)
            except Exception as err:  # noqa: BLE001 - any failure is a result, reported with its case
                result = dict(case, error=f"{type(err).__name__}: {err}"[:2000])
            out.write(json.dumps(result) + "\n")
            out.flush()


def run_workers(cases: list[dict], processes: int = 2, timeout: float = 1800) -> list[dict]:
    """Compile ``cases`` in ``processes`` fresh interpreters at once, without TRITON_INTERPRET, always from
    scratch (a cached kernel skips ptxas, whose log is where registers and spills come from) and into a
    throwaway cache, so the user's Triton cache neither answers nor grows."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    env["TRITON_ALWAYS_COMPILE"] = "1"
    # the longest compiles first, dealt round-robin, so the workers finish together
    ordered = sorted(cases, key=_cost, reverse=True)
    shares = [ordered[i::processes] for i in range(processes)]
    results = []
    with tempfile.TemporaryDirectory(prefix="hf_flash_xcompile_") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        procs = []
        for i, share in enumerate(shares):
            Path(tmp, f"cases{i}.json").write_text(json.dumps(share))
            log = open(Path(tmp, f"log{i}.txt"), "w")  # noqa: SIM115 - closed with its process below
            cmd = [sys.executable, __file__, "--worker", str(Path(tmp, f"cases{i}.json")), str(Path(tmp, f"out{i}"))]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
        deadline = time.monotonic() + timeout
        for i, ((proc, log), share) in enumerate(zip(procs, shares)):
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            finally:
                log.close()
                if proc.poll() is None:
                    proc.kill()
            out = Path(tmp, f"out{i}")
            lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
            tail = Path(tmp, f"log{i}.txt").read_text()[-3000:]
            assert proc.returncode == 0 and len(lines) == len(share), f"compile worker {i} failed:\n{tail}"
            results += lines
    return results


def _cost(case: dict) -> int:
    # compile time grows with the tile, and FMA code (sm75) unrolls every multiply-add
    c = case["constexprs"]
    work = c.get("BLOCK_M", 128) * c.get("BLOCK_N", 16) * c.get("BLOCK_D", 128) // (case["num_warps"] * 32)
    return work * (4 if case["cc"] < 80 else 1) * (2 if case["flags"] == "all" else 1)


# ------------------------------------------------------------------------------------------------
# The compile matrix
# ------------------------------------------------------------------------------------------------

# target capability -> the table hf_flash picks there (sm89 runs the sm86 table)
TARGETS = {"sm75": 75, "sm80": 80, "sm89": 89, "sm90": 90}
HEAD_DIMS = (64, 80, 128, 256)  # one per head-dim class; 80 pads to 128 (masked columns)
FLAG_SETS = {
    "plain": {},
    "causal": {"MASK_RIGHT": True},
    "window-varlen": {"IS_VARLEN": True, "MASK_LEFT": True, "MASK_RIGHT": True},
    "all": {"IS_VARLEN": True, "MASK_LEFT": True, "MASK_RIGHT": True, "HAS_SOFTCAP": True, "HAS_DROPOUT": True},
}
# Registers: the launch needs regs x threads <= the 64K registers of an SM (true of every chip here).
# Spills: the backward kernels hold K, V, dK and dV tiles at once and spill a little on every chip
# (hundreds of bytes per thread, more with every flag on). The budget catches tiles far too big for the
# register file (an H100 tile on a T4 spills ~10 KB). The sm90 tiles won a timed sweep on an H100,
# their spills priced in, so theirs are only reported.
REGISTERS_PER_SM = 64 * 1024
SPILL_BUDGET = {"plain": 4096, "causal": 4096, "window-varlen": 4096, "all": 8192}  # bytes per thread
SPILL_CHECKED = {"sm75", "sm80", "sm89"}


def hopper_fwd_cases(tiles: dict) -> list[dict]:
    """The compile cases of the Hopper forward for ``tiles`` ((head dim, causal) -> ``hopper_fwd.Tile``), bf16 and
    fp16 dense, and varlen (packed sequences) in bf16 (``test_hopper_fwd``, ``benchmarks/loop_spills.py``)."""
    from hf_flash.ops._hopper_fwd_kernel import max_registers

    return [{"kernel": "hopper_fwd", "cc": 90, "dtype": dtype, "flags": "varlen" if varlen else "plain",
             "num_warps": 4, "num_stages": 1, "maxnreg": max_registers(t.groups), "head_dim": d, "block_n": t.block_n,
             "constexprs": {"CAUSAL": causal, "STAGES": t.stages, "GROUPS": t.groups, "VARLEN": varlen}}
            for (d, causal), t in tiles.items()
            for dtype, varlen in (("bf16", False), ("fp16", False), ("bf16", True))]  # fmt: skip


def hopper_bwd_cases() -> list[dict]:
    """The compile cases of the Hopper backward (``test_hopper_bwd``, ``benchmarks/loop_spills.py``): head dims 128
    and 64, causal or not, bf16 and fp16, dense; and varlen (packed sequences) in bf16."""
    from hf_flash.ops import hopper_bwd
    from hf_flash.ops._hopper_bwd_kernel import MAX_REGISTERS

    return [{"kernel": "hopper_bwd", "cc": 90, "dtype": dtype, "flags": "varlen" if varlen else "plain",
             "num_warps": 4, "num_stages": 1, "maxnreg": MAX_REGISTERS, "head_dim": head_dim,
             "constexprs": {"CAUSAL": causal, "STAGES": hopper_bwd.STAGES, "KEYS_OUTER": causal, "VARLEN": varlen}}
            for head_dim, causal in sorted(hopper_bwd.MIN_SEQLEN)
            for dtype, varlen in (("bf16", False), ("fp16", False), ("bf16", True))]  # fmt: skip


def _case(chip: str, kernel: str, head_dim: int, flags: str, dtype: str = "fp16", atomic_dq: bool = True,
          varlen: bool = False) -> dict:
    """The specialisation the launchers build for this chip's table (forward.flash_fwd, backward.flash_bwd).
    ``atomic_dq``: the dK/dV kernel also adds dQ by atomics (what ``deterministic=False`` runs for head
    dims above ``function.ATOMIC_DQ_MIN_HEAD_DIM``); else the dQ kernel computes it. ``varlen``: lengths from
    cu_seqlens on top of ``flags`` (the flag sets named "varlen" have them already)."""
    from hf_flash.ops import config

    table = config.table_for(config.parse_arch(chip))
    block_d = config.block_d_for(head_dim)
    case = {"chip": chip, "table": table.name, "kernel": kernel, "cc": TARGETS[chip], "dtype": dtype, "flags": flags}
    if kernel == "delta":
        # flash_bwd launches it with BLOCK_M=64 and Triton's default warps and stages
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": 64, "BLOCK_D": block_d, "IS_VARLEN": flags != "plain"}
        return {**case, "constexprs": constexprs, "num_warps": 4, "num_stages": 3}
    # "fwd_short": the forward's tiles for short sequences (ChipTable.fwd_short), same kernel
    short = config.SHORT_SEQLEN if kernel.endswith("_short") else None
    varlen = varlen or FLAG_SETS[flags].get("IS_VARLEN", False)
    c = table.config(kernel.removesuffix("_short"), head_dim, short, varlen)
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_D": c.block_d}
    constexprs.update(dict.fromkeys(("IS_VARLEN", "MASK_LEFT", "MASK_RIGHT", "HAS_SOFTCAP", "HAS_DROPOUT"), False))
    constexprs.update(FLAG_SETS[flags], IS_VARLEN=varlen)
    if kernel != "delta":
        # "causal" stands for dense block-aligned lengths, whose diagonal blocks join the main loop
        # (common.diag_in_loop); ragged causal lengths split the loop like the varlen sets do
        constexprs["DIAG_IN_LOOP"] = flags == "causal"
    if kernel == "dq":
        constexprs["DELTA_HERE"] = True  # the dQ kernel computes delta whenever it runs (backward.flash_bwd)
    if kernel == "dkdv":
        constexprs["ATOMIC_DQ"] = atomic_dq
        constexprs["IS_GQA"] = False  # the flattened head loop of GQA groups: a register budget like MHA's
    # the launchers read tiles through TMA where the table asks and the chip and head dim allow
    constexprs["USE_TMA"] = c.tma and TARGETS[chip] >= 90 and head_dim == block_d
    if kernel == "dkdv":
        # the LSE and delta rows through TMA only beside Q and dO's descriptors, dense (common.stats_pair)
        constexprs["STATS_TMA"] = constexprs["USE_TMA"] and not constexprs["IS_VARLEN"]
    constexprs["TMA_HEAD_MAJOR"] = False  # descriptors over [B, L, H, D] (the KV cache's [B, H, L, D]: True)
    if kernel.startswith("fwd"):
        constexprs["HAS_SINKS"] = flags == "all"  # attention sinks change only the forward's row init
    return {**case, "constexprs": constexprs, **c.launch_options()}


def quick_matrix() -> list[dict]:
    """Every entry of every chip's table once (chip x kernel x head-dim class; the 128 class as D = 128
    or, on every other chip, D = 80), the flag sets rotating so that each kernel meets each of them
    somewhere. Shared memory depends on the tiles, not the flags, so this checks every table's fit;
    the full matrix adds the remaining flag sets for the registers. 40 compiles, under a minute on two
    cores."""
    flag_sets = list(FLAG_SETS)
    cases = []
    for i, chip in enumerate(TARGETS):
        for j, kernel in enumerate(("fwd", "dkdv", "dq")):
            for k, head_dim in enumerate((64, 80 if i % 2 else 128, 256)):
                atomic_dq = (i + k) % 2 == 0  # each dK/dV entry with and without dQ on some chip
                cases.append(_case(chip, kernel, head_dim, flag_sets[(i + j + k) % 4], atomic_dq=atomic_dq))
        cases.append(_case(chip, "delta", HEAD_DIMS[i], flag_sets[3 * (i % 2)]))  # plain / all: varlen off / on
    cases += [_case("sm90", "fwd_short", d, "causal") for d in (64, 128)]
    return cases


def full_matrix() -> list[dict]:
    """Every chip x kernel x head dim x flag set (dK/dV with and without dQ), plus bf16 where it runs."""
    cases = [_case(chip, kernel, d, flags) for chip in TARGETS for kernel in ("fwd", "dkdv", "dq")
             for d in HEAD_DIMS for flags in FLAG_SETS]
    cases += [_case(chip, "dkdv", d, flags, atomic_dq=False) for chip in TARGETS for d in HEAD_DIMS
              for flags in FLAG_SETS]
    cases += [_case(chip, "delta", d, flags) for chip in TARGETS for d in HEAD_DIMS for flags in ("plain", "all")]
    cases += [_case(chip, kernel, 128, "causal", "bf16") for chip in ("sm80", "sm89", "sm90")
              for kernel in ("fwd", "dkdv", "dq")]
    cases += [_case("sm90", "fwd_short", d, flags) for d in (64, 128) for flags in FLAG_SETS]
    return cases


def _describe(r: dict) -> str:
    c = r["constexprs"]
    tile = f"{c['BLOCK_M']}x{c.get('BLOCK_N', '-')}"
    kernel = r["kernel"] + ("" if c.get("ATOMIC_DQ", True) else "-det")  # -det: dQ left to the dQ kernel
    return (f"{r['chip']:<5} {kernel:<9} D{c['HEAD_DIM']:<4} {r['flags']:<13} {r['dtype']} {tile:<8} "
            f"w{r['num_warps']} s{r['num_stages']}: smem {r.get('shared')} regs {r.get('regs')} "
            f"spill {r.get('spill_bytes')} ({r.get('seconds')} s)")


def check_results(results: list[dict]) -> list[str]:
    """Every limit a result breaks, as readable lines (empty when all fit)."""
    from hf_flash.ops import config

    problems = []
    for r in results:
        if "error" in r:
            problems.append(f"{_describe(r)}\n    compile failed: {r['error']}")
            continue
        limit = config.TABLES[r["table"]].smem_per_block
        if r["shared"] > limit:
            problems.append(f"{_describe(r)}\n    shared memory {r['shared']} B > the chip's {limit} B per block")
        if r["regs"] is not None and r["regs"] * 32 * r["num_warps"] > REGISTERS_PER_SM:
            problems.append(f"{_describe(r)}\n    {r['regs']} registers x {32 * r['num_warps']} threads > 64K")
        if r["regs"] is None:
            problems.append(f"{_describe(r)}\n    no ptxas log: registers and spills unknown")
        elif r["chip"] in SPILL_CHECKED and r["spill_bytes"] > SPILL_BUDGET[r["flags"]]:
            budget = SPILL_BUDGET[r["flags"]]
            problems.append(f"{_describe(r)}\n    spills {r['spill_bytes']} B per thread > {budget} B allowed")
    return problems


def _compile_and_check(cases: list[dict]) -> None:
    processes = max(1, min(len(cases), os.cpu_count() or 1))
    start = time.perf_counter()
    results = run_workers(cases, processes=processes)
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s on {processes} processes")
    for r in results:
        print("  " + _describe(r))
    problems = check_results(results)
    assert not problems, "kernels that do not fit their chip:\n" + "\n".join(problems)


def _cross_compile_unavailable() -> str | None:
    """Why this Triton cannot run the matrix (ASTSource / GPUTarget as in Triton 3.6 to 3.9), or None."""
    import inspect

    import triton

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as err:
        return f"Triton {triton.__version__} has no cross-compilation API: {err}"
    params = set(inspect.signature(ASTSource).parameters)
    if not {"fn", "signature", "constexprs", "attrs"} <= params:
        return f"Triton {triton.__version__}'s ASTSource takes {sorted(params)}, not (fn, signature, constexprs, attrs)"
    return None


def test_compile_matrix_quick():
    """Each chip's tiles compile for that chip and fit its shared memory and registers."""
    reason = _cross_compile_unavailable()
    if reason:
        pytest.skip(reason)
    _compile_and_check(quick_matrix())


@pytest.mark.skipif(not os.environ.get("HF_FLASH_FULL_MATRIX"),
                    reason="the full matrix (212 compiles) takes ~10 min on 2 cores; set HF_FLASH_FULL_MATRIX=1")
def test_compile_matrix_full():
    reason = _cross_compile_unavailable()
    if reason:
        pytest.skip(reason)
    _compile_and_check(full_matrix())


# ------------------------------------------------------------------------------------------------
# Picking a table (CPU: the GPU is described to config.py by monkeypatching)
# ------------------------------------------------------------------------------------------------


# ``fake_gpu`` (tests/conftest.py) makes config.py and info.py see a CUDA GPU of a given capability


@pytest.mark.parametrize("text, expected", [("sm75", (7, 5)), ("sm_80", (8, 0)), ("86", (8, 6)), ("8.9", (8, 9)),
                                            ("SM90", (9, 0)), ("sm120", (12, 0))])
def test_parse_arch(text, expected):
    from hf_flash.ops import config

    assert config.parse_arch(text) == expected


def test_bad_arch_names_the_setting():
    from hf_flash.ops import config

    with pytest.raises(ValueError, match="HF_FLASH_ARCH.*'sm75'"):
        config.force_arch("volta")


@pytest.mark.parametrize("capability, smem_kb, table", [
    ((7, 5), 64, "sm75"), ((8, 0), 163, "sm80"), ((8, 6), 99, "sm86"), ((8, 7), 163, "sm80"), ((8, 9), 99, "sm86"),
    ((9, 0), 227, "sm90"), ((10, 0), 227, "sm90"), ((12, 0), 99, "sm86"),
    ((9, 0), 99, "sm86"),  # a Hopper part with less shared memory gets tiles that fit it
    ((8, 0), 64, "sm75"),
], ids=lambda x: f"sm{x[0]}{x[1]}" if isinstance(x, tuple) else f"{x}KB" if isinstance(x, int) else f"->{x}")
def test_table_follows_capability_and_shared_memory(capability, smem_kb, table):
    from hf_flash.ops import config

    assert config.table_for(capability, smem_kb * 1024).name == table
    if smem_kb * 1024 == config.default_smem_per_block(capability):  # torch without the smem property
        assert config.table_for(capability).name == table


@pytest.mark.parametrize("name", ["sm75", "sm80", "sm86", "sm90"])
def test_tables_cover_every_head_dim(name):
    from hf_flash.ops import config

    table = config.TABLES[name]
    for kernel in ("fwd", "dkdv", "dq"):
        assert sorted(getattr(table, kernel)) == [64, 128, 256]
        for head_dim in (1, 16, 59, 64, 80, 111, 128, 160, 256):
            c = table.config(kernel, head_dim)
            assert c.block_d >= head_dim and c.block_d >= 16
            for block in (c.block_m, c.block_n):
                assert block >= 16 and block & (block - 1) == 0  # tl.dot needs powers of two >= 16
    assert table.config("fwd", 80) == table.config("fwd", 128)


def test_varlen_calls_take_the_varlen_dkdv_tile(fake_gpu):
    """sm90's D64 dK/dV: 64 query rows for dense batches, 32 rows under a 168-register cap for varlen ones
    (config.SM90.dkdv_varlen); other kernels and head dims do not depend on varlen."""
    from hf_flash.ops import config

    device = fake_gpu((9, 0), name="NVIDIA H100")
    dense, varlen = config.backward_config(64, device), config.backward_config(64, device, varlen=True)
    assert (dense[0].block_m, dense[0].maxnreg) == (64, None)
    assert (varlen[0].block_m, varlen[0].maxnreg) == (32, 168) and varlen[0].tma
    assert dense[1] == varlen[1]
    assert config.backward_config(128, device) == config.backward_config(128, device, varlen=True)


def test_configs_follow_the_gpu(fake_gpu):
    from hf_flash.ops import config

    device = fake_gpu((7, 5), name="Tesla T4")
    assert config.forward_config(64, device) == config.SM75.config("fwd", 64)
    assert config.backward_config(256, device) == (config.SM75.config("dkdv", 256), config.SM75.config("dq", 256))
    device = fake_gpu((8, 9), name="NVIDIA L4")
    assert config.forward_config(128, device) == config.SM86.config("fwd", 128)


def test_forced_arch_replaces_the_table_and_restores(fake_gpu):
    from hf_flash.ops import config

    device = fake_gpu((9, 0), name="NVIDIA H100")  # the fixture restores the forced arch afterwards
    assert config.chip_table(device).name == "sm90"
    assert config.force_arch("sm75") is None
    assert config.chip_table(device).name == "sm75"
    assert config.forward_config(64, device) == config.SM75.config("fwd", 64)
    assert config.device_facts(device)[:2] == ((7, 5), 64 * 1024)
    assert config.force_arch(None) == "sm75" and config.forced_arch() is None
    assert config.chip_table(device).name == "sm90"


def test_hf_flash_arch_is_read_at_import():
    code = "from hf_flash.ops import config; print(config.forced_arch(), config.forced_arch_name())"
    env = dict(os.environ, HF_FLASH_ARCH="sm_89")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300, check=False)
    assert out.stdout.split("\n")[-2:] == ["(8, 9) sm_89", ""], out.stdout + out.stderr[-2000:]


def test_t4_runs_fp16_and_refuses_bf16_with_a_reason(fake_gpu):
    import torch

    from hf_flash.ops import config

    device = fake_gpu((7, 5), name="Tesla T4")
    assert config.kernels_unavailable_reason(device, torch.float16) is None
    reason = config.kernels_unavailable_reason(device, torch.bfloat16)
    assert "bfloat16" in reason and "8.0" in reason and "7.5" in reason


def test_forcing_an_older_chip_brings_its_limits_but_a_newer_one_lifts_none(fake_gpu):
    import torch

    from hf_flash.ops import config

    h100 = fake_gpu((9, 0))
    config.force_arch("sm75")
    assert "HF_FLASH_ARCH=sm75" in config.kernels_unavailable_reason(h100, torch.bfloat16)
    t4 = fake_gpu((7, 5))
    config.force_arch("sm90")
    assert config.kernels_unavailable_reason(t4, torch.bfloat16) is not None


def test_fp16_on_sm70_is_refused(fake_gpu):
    import torch

    from hf_flash.ops import config

    assert "below 7.5" in config.kernels_unavailable_reason(fake_gpu((7, 0)), torch.float16)


# ------------------------------------------------------------------------------------------------
# hf_flash.info / python -m hf_flash
# ------------------------------------------------------------------------------------------------


def test_info_on_a_t4_says_cuda_cores_and_bf16_fallback(fake_gpu):
    from hf_flash.info import info, report

    fake_gpu((7, 5), name="Tesla T4")
    r = report()
    gpu = r["gpus"][0]
    assert (gpu["name"], gpu["capability"], gpu["table"], gpu["smem_per_block_kb"]) == ("Tesla T4", "7.5", "sm75", 64)
    assert gpu["paths"]["float16"]["path"] == "kernels" and "CUDA cores" in gpu["paths"]["float16"]["why"]
    assert gpu["paths"]["bfloat16"]["path"] == "fallback" and "bfloat16" in gpu["paths"]["bfloat16"]["why"]
    assert gpu["paths"]["float32"]["path"] == "fallback"
    out = io.StringIO()
    info(file=out)
    text = out.getvalue()
    for needle in ("Tesla T4", "compute capability 7.5", "tile table sm75", "triton", "TRITON_INTERPRET", "D<=256"):
        assert needle in text, (needle, text)


def test_info_says_where_the_hopper_forward_runs(fake_gpu, monkeypatch):
    from hf_flash.info import info, report
    from hf_flash.ops import hopper_fwd

    fake_gpu((9, 0), name="NVIDIA H100")
    expected = "off: " + hopper_fwd.unavailable_reason() if hopper_fwd.unavailable_reason() else "on for head dim 128"
    assert report()["gpus"][0]["hopper_forward"].startswith(expected)
    out = io.StringIO()
    info(file=out)
    assert "Hopper forward: " + expected in out.getvalue()
    monkeypatch.setenv(hopper_fwd.ENV, "0")
    assert report()["gpus"][0]["hopper_forward"] in (f"off: {hopper_fwd.ENV}=0", expected)
    fake_gpu((8, 0), name="NVIDIA A100")
    assert report()["gpus"][0]["hopper_forward"] == "off: sm90 only (wgmma)"


def test_info_says_where_the_hopper_backward_runs(fake_gpu, monkeypatch):
    from hf_flash.info import info, report
    from hf_flash.ops import hopper_bwd

    fake_gpu((9, 0), name="NVIDIA H100")
    monkeypatch.setenv(hopper_bwd.ENV, "1")
    reason = hopper_bwd.unavailable_reason()
    expected = f"off: {reason}" if reason else f"on for {hopper_bwd.coverage()}"
    assert report()["gpus"][0]["hopper_backward"].startswith(expected)
    out = io.StringIO()
    info(file=out)
    assert "Hopper backward: " + expected in out.getvalue()
    monkeypatch.setenv(hopper_bwd.ENV, "0")
    assert report()["gpus"][0]["hopper_backward"] == (f"off: {reason}" if reason else f"off: {hopper_bwd.ENV}=0")
    fake_gpu((8, 0), name="NVIDIA A100")
    assert report()["gpus"][0]["hopper_backward"] == "off: sm90 only (wgmma)"


def test_info_shows_a_forced_arch(fake_gpu):
    from hf_flash.info import report
    from hf_flash.ops import config

    fake_gpu((9, 0), name="NVIDIA H100")
    config.force_arch("sm80")
    gpu = report()["gpus"][0]
    assert (gpu["capability"], gpu["treated_as"], gpu["table"]) == ("9.0", "8.0", "sm80")


def test_python_m_hf_flash_prints_the_report(capsys, monkeypatch):
    import runpy

    import triton

    monkeypatch.setattr(sys, "argv", ["hf_flash"])  # not pytest's arguments: the module parses them
    runpy.run_module("hf_flash", run_name="__main__")  # what ``python -m hf_flash`` runs, in this process
    out = capsys.readouterr().out
    assert f"triton {triton.__version__}" in out and "float16" in out and "CPU tensors" in out, out


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*sys.argv[2:4])
