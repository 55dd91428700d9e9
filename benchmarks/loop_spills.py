#!/usr/bin/env python
"""Spill instructions in each loop of the sm90 kernels, cross-compiled here (no GPU needed).

    python benchmarks/loop_spills.py                          # dK/dV, dQ, forward at D128, bf16
    python benchmarks/loop_spills.py --kernels dkdv --head-dims 64,128 --layouts varlen
    python benchmarks/loop_spills.py --kernels dkdv --set IS_GQA=1     # an experiment's constexpr
    python benchmarks/loop_spills.py --kernels fwd_short --tiles 64x64w4s3,128x64w8s3   # candidate tiles
    python benchmarks/loop_spills.py --kernels hopper_bwd --head-dims 64,128   # the Gluon backward (dense only)
    python benchmarks/loop_spills.py --kernels hopper_fwd --head-dims 64,128   # the Gluon forward (dense only)

ptxas' total ("1352 bytes spill stores") does not say where the spills are: in a loop that runs once per
program they cost nothing, in the unmasked loop that does nearly all the work they cost a lot. This
compiles each specialisation the launchers build (the chip table's tiles, as ``tests/ops/test_chips.py``
does), disassembles it with the ``nvdisasm`` that Triton's wheel carries, and counts, for every loop (a
backward branch), its instructions, tensor-core instructions (HGMMA), local loads and stores (LDL/STL:
the spills) and special-function instructions (MUFU: the exponentials). Loops are listed smallest first;
the unmasked loop is the smallest one with HGMMA. Each kernel's line also gives its registers, shared
memory and how many of its programs fit one SM at once (a register count just above a threshold costs a
program per SM).

Layouts: ``dense`` (lengths multiples of the blocks: the causal diagonal joins the backward's main loop),
``ragged`` (dense, other lengths) and ``varlen`` (lengths read from cu_seqlens). No layout tells the
compiler that a length is a multiple of 16: the kernels keep lengths out of Triton's specialization
(``common.UNSPECIALIZED``), so that new lengths do not compile new kernels.

Register allocation differs between Triton versions (the varlen dK/dV cliff fixed in a721ecf shows with
3.6, not with 3.9), so run it with the device's version, e.g. in a scratch venv:
``python3.11 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 torch pytest`` and
``PYTHONPATH=. /tmp/t36/bin/python benchmarks/loop_spills.py``.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ops"))
import test_chips  # noqa: E402  (the launchers' specialisations and the offline compile)

LAYOUTS = ("dense", "ragged", "varlen")
KERNELS = ["dkdv", "dq", "fwd", "fwd_short"]  # the portable kernels, as test_chips._case names them
GLUON = {"hopper_bwd", "hopper_fwd"}  # the Gluon kernels: dense only, their own compile cases
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def nvdisasm() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> list[dict]:
    """The innermost loops of a kernel's SASS (``nvdisasm -c`` text; a loop: the span from a backward
    branch's target to the branch), smallest first."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = INSTRUCTION.match(line)
        if ins:
            address = int(ins.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            instructions.append((address, ins.group(2)))
    found = []
    for address, text in instructions:
        branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if branch and labels.get(branch.group(1), address + 1) <= address:
            body = [t for a, t in instructions if labels[branch.group(1)] <= a <= address]
            count = lambda pattern: sum(1 for t in body if re.search(pattern, t))  # noqa: E731
            found.append(dict(span=(labels[branch.group(1)], address), size=len(body), hgmma=count(r"\bHGMMA"),
                              ldl=count(r"\bLDL"), stl=count(r"\bSTL"), mufu=count(r"\bMUFU")))
    # innermost loops only: a loop around others (e.g. around a kernel's segment loops) repeats their counts
    inner = [lp for lp in found if not any(o is not lp and lp["span"][0] <= o["span"][0] and o["span"][1] <= lp["span"][1]
                                           for o in found)]
    return sorted(inner, key=lambda loop: loop["size"])


def programs_per_sm(result: dict) -> int:
    """Programs that fit one sm90 SM at once: 64K registers (allocated per warp in units of 256), 228 KB of
    shared memory (1 KB of it reserved per program), 64 warps. ``warps``: the program's, partitions included (the Gluon
    kernels launch 4 and specialize 12 or 16)."""
    warps = result["warps"]
    regs_per_warp = -(-(result["regs"] or 255) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = 228 * 1024 // (result["shared"] + 1024)
    return min(by_regs, by_smem, 64 // warps)


def case_for(kernel: str, head_dim: int, causal: bool, layout: str, overrides: dict, tile=None) -> dict:
    """``kernel``: as ``test_chips._case`` names them ("fwd_short": the forward's short-sequence tiles), or
    "hopper_bwd" / "hopper_fwd" (the Gluon kernels as ``test_hopper_bwd`` / ``test_hopper_fwd`` compile them, the
    forward with ``hopper_fwd.TILES``' tile; dense lengths only, no tiles to swap); ``tile``: (block_m, block_n,
    num_warps, num_stages) in place of the table's."""
    if kernel in GLUON:
        if kernel == "hopper_bwd":
            cases = test_chips.hopper_bwd_cases()
        else:
            from hf_flash.ops import hopper_fwd

            cases = test_chips.hopper_fwd_cases(hopper_fwd.TILES)
        case = next(c for c in cases
                    if c["head_dim"] == head_dim and c["constexprs"]["CAUSAL"] == causal and c["dtype"] == "bf16")
        case["constexprs"].update(overrides)
        return case
    case = test_chips._case("sm90", kernel, head_dim, "causal" if causal else "plain", dtype="bf16",
                            atomic_dq=False, varlen=layout == "varlen")
    if tile:
        case["constexprs"].update(BLOCK_M=tile[0], BLOCK_N=tile[1])
        case.update(num_warps=tile[2], num_stages=tile[3])
        case.pop("maxnreg", None)  # a candidate tile runs without the table's register cap
    if layout != "dense" and "DIAG_IN_LOOP" in case["constexprs"]:
        # the causal diagonal joins the main loop only for dense lengths that are multiples of the blocks
        # (backward._diag_in_loop); a length Triton does not see as a multiple of 16 is not one
        case["constexprs"]["DIAG_IN_LOOP"] = False
    case["constexprs"].update(overrides)
    return case


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="dkdv,dq,fwd",
                   help="of dkdv, dq, fwd, fwd_short (the short-sequence tiles), hopper_bwd, hopper_fwd")
    p.add_argument("--head-dims", default="128")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--set", default="", help="constexpr overrides, e.g. IS_GQA=1 (an experiment's flag)")
    p.add_argument("--tiles", default="", help="tiles in place of the table's, e.g. 64x64w4s3,128x64w8s3")
    a = p.parse_args()
    unknown = sorted(set(a.kernels.split(",")) - set(KERNELS) - GLUON)
    if unknown:
        p.error(f"--kernels: {', '.join(unknown)} unknown; accepted: {', '.join(KERNELS + sorted(GLUON))}")
    if a.tiles and GLUON & set(a.kernels.split(",")):
        p.error("--tiles: the Hopper kernels have no tile table to swap; run --kernels hopper_bwd / hopper_fwd "
                "without it")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sweep_tiles import parse_tiles  # its --tiles syntax (imports torch and hf_flash: only here)

    tiles = parse_tiles(a.tiles) or [None]
    overrides = {k: int(v) for k, v in (item.split("=") for item in filter(None, a.set.split(",")))}
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas' totals (registers, spilled bytes)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # a cached kernel skips ptxas and its log
    print("triton", triton.__version__, "| sm90, bf16,", f"tiles {a.tiles}" if a.tiles else "the chip table's tiles")
    for kernel in a.kernels.split(","):
        for head_dim in (int(d) for d in a.head_dims.split(",")):
            for causal in (False, True):
                layouts = ["dense"] if kernel in GLUON else a.layouts.split(",")
                for layout, tile in ((lay, t) for lay in layouts for t in tiles):
                    case = case_for(kernel, head_dim, causal, layout, overrides, tile)
                    r = test_chips.compile_case(case, with_cubin=True)
                    cx = r["constexprs"]
                    block = f"{cx['BLOCK_M']}x{cx['BLOCK_N']}" if "BLOCK_M" in cx else "Hopper tile"
                    # no ptxas log: Triton's cache answered, i.e. the same compiled kernel as a line above
                    totals = (f"{r['regs']} registers, {r['spill_bytes']} B spilled" if r["regs"] is not None
                              else "the same kernel as a line above (cached: ptxas did not run)")
                    print(f"{kernel} D{head_dim} causal={causal} {layout} ({block}, "
                          f"{r['warps']} warps, {r['num_stages']} stages): {totals}, {r['shared']} B shared, "
                          f"{programs_per_sm(r)} programs per SM")
                    for loop in (loop for loop in loops(disassemble(r["cubin"])) if loop["hgmma"]):
                        print(f"    loop of {loop['size']:5d} instructions: HGMMA {loop['hgmma']:3d}, "
                              f"LDL {loop['ldl']:4d}, STL {loop['stl']:4d}, MUFU {loop['mufu']:3d}")


if __name__ == "__main__":
    main()
