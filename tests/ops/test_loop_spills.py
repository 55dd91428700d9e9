"""benchmarks/loop_spills.py: the SASS loop parser, and one real sm90 cross-compile through it.

The tool is how spill cliffs in the kernels' hot loops are found without a GPU (docs/DESIGN.md), so
its parser must find loops where the listing has them, and nest them right.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("loop_spills", REPO / "benchmarks" / "loop_spills.py")

# nvdisasm -c shape: labels on their own lines, instructions as /*address*/ text ;
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*0020*/                   LDL R2, [R1+0x10] ;
.L_x_1:
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   STL [R1+0x10], R3 ;
        /*0050*/              @P0 BRA `(.L_x_1) ;
        /*0060*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ;
        /*0070*/              @P1 BRA `(.L_x_0) ;
        /*0080*/              @P2 BRA `(.L_x_2) ;
.L_x_2:
        /*0090*/                   EXIT ;
"""


def _module():
    module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(module)
    return module


def test_parser_finds_innermost_loops_only():
    found = _module().loops(SASS)
    # the inner loop (0x30-0x50) only; the outer one (0x10-0x70) contains it; the forward branch is no loop
    assert [(lp["span"], lp["size"], lp["hgmma"], lp["ldl"], lp["stl"], lp["mufu"]) for lp in found] == [
        ((0x30, 0x50), 3, 0, 0, 1, 1)
    ]


def test_cross_compiled_kernel_has_a_tensor_core_loop():
    """One sm90 compile of the dQ kernel (no GPU needed): its loops use HGMMA, and the report says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # triton.compile needs real kernels
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loop_spills.py"), "--kernels", "dq", "--head-dims", "64",
         "--layouts", "dense"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum("programs per SM" in line for line in lines) == 2, result.stdout  # causal and not
    assert any("loop of" in line and "HGMMA   0" not in line for line in lines), result.stdout
