#!/usr/bin/env python
"""Does the working tree compile to the same code as another revision? The check for refactors that must
change nothing (e.g. calling the kernels' inner loops by keyword).

    python benchmarks/same_code.py --base HEAD             # the uncommitted change, sm80 + sm90
    python benchmarks/same_code.py --base HEAD~1 --chips sm90 --kernels fwd,dq
    /path/to/triton-3.6-venv/bin/python benchmarks/same_code.py --base HEAD   # with the device's Triton

Each case is a specialisation the launchers build (``tests/ops/test_chips.py``'s ``_case``: the chip's
table tiles, flags as constexprs), cross-compiled on the CPU twice: with the working tree's ``hf_flash`` and
with the base revision's (``git archive`` into a temporary folder), by the same Triton and the same case
builder. Compared:

* PTX, without its ``.loc`` / ``.file`` lines, the ``$L__tmp`` labels they use and the debug sections
  (source line numbers move in a refactor);
* TTGIR, without locations and SSA value names (Triton names values after source variables, which a
  refactor may rename): the same operations in the same order, with the same types and attributes.

Then the launches: both revisions' launchers run a set of forward + backward calls (dense, varlen, decoding;
causal, window, softcap, dropout, sinks; GQA; atomic and deterministic dQ) on CPU tensors with each kernel
replaced by a recorder, and every launch's grid, options and arguments, bound to the kernel's parameter names
(tensors as shape, strides and dtype), must match. (No TMA descriptors there: the CPU has no TMA.)

One line per case; exit status 1 and the first differing lines where anything differs.
"""

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "ops"))  # test_chips; hf_flash comes from PYTHONPATH in the workers

# (kernel, head dim, flag set of test_chips.FLAG_SETS, dK/dV with atomic dQ, constexpr overrides): the main
# variants of each kernel. Sinks are off except in one forward case.
CASES = [
    ("fwd", 64, "plain", None, {}),
    ("fwd", 128, "causal", None, {}),
    ("fwd", 80, "window-varlen", None, {}),
    ("fwd", 128, "all", None, {"HAS_SINKS": False}),
    ("fwd", 64, "all", None, {"HAS_SINKS": True}),
    ("fwd_short", 128, "causal", None, {}),
    ("dkdv", 128, "plain", False, {}),
    ("dkdv", 64, "causal", False, {}),
    ("dkdv", 128, "window-varlen", False, {"IS_GQA": True}),
    ("dkdv", 64, "all", True, {}),
    ("dq", 128, "causal", None, {}),
    ("dq", 64, "window-varlen", None, {}),
    ("dq", 128, "all", None, {}),
    ("delta", 128, "plain", None, {}),
    ("delta", 64, "all", None, {}),
]


def build_cases(chips, kernels) -> list[dict]:
    import test_chips

    cases = []
    for chip in chips:
        for kernel, head_dim, flags, atomic_dq, overrides in CASES:
            if kernel.removesuffix("_short") not in kernels:
                continue
            case = test_chips._case(chip, kernel, head_dim, flags, atomic_dq=bool(atomic_dq))
            case["constexprs"].update(overrides)
            case["label"] = f"{chip} {kernel} D{head_dim} {flags}" + "".join(f" {k}={v}" for k, v in overrides.items())
            cases.append(case)
    return cases


def normalize_ptx(ptx: str) -> str:
    lines = []
    for line in ptx.splitlines():
        stripped = line.strip()
        if stripped.startswith(".section") and ".debug" in stripped:
            break  # the debug sections close the file: line tables and names only
        if stripped.startswith((".loc", ".file", "//")) or not stripped or re.fullmatch(r"\$L__tmp\d+:", stripped):
            continue  # line-table directives and the labels only they use
        lines.append(line.rstrip())
    return "\n".join(lines)


def normalize_ttgir(ttgir: str) -> str:
    text = "\n".join(line for line in ttgir.splitlines() if not line.startswith("#loc"))
    text = re.sub(r"\s*loc\((?:[^()]|\([^()]*\))*\)", "", text)  # loc(#loc3), loc("x"(#loc4)), ...
    # SSA names erased: Triton names values after source variables (which a refactor may rename) or numbers
    # them per region, so no renumbering lines both sides up. The operations, their order, types and
    # attributes remain; the PTX, compared as text, pins the data flow.
    return re.sub(r"%[\w.$-]+", "%", text)


def compile_all(root: Path, cases: list[dict], out: Path) -> subprocess.Popen:
    """Compile ``cases`` with the ``hf_flash`` under ``root`` in a fresh process (no interpreter, a throwaway
    Triton cache); writes {label: {"ptx": ..., "ttgir": ...} or {"error": ...}} to ``out``."""
    cases_file = out.with_suffix(".cases.json")
    cases_file.write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_CACHE_DIR=str(out.with_suffix(".cache")), TRITON_DEFAULT_FP_FUSION="1")
    return subprocess.Popen([sys.executable, __file__, "--worker", str(cases_file), str(out)], env=env, cwd=root)


def worker(cases_file: str, out_file: str) -> None:
    import test_chips

    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        try:
            asm = test_chips.compile_case(case, asm=("ttgir", "ptx"))["asm"]
            results[case["label"]] = {"ptx": normalize_ptx(asm["ptx"]), "ttgir": normalize_ttgir(asm["ttgir"])}
        except Exception as err:  # noqa: BLE001 - reported per case
            results[case["label"]] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    Path(out_file).write_text(json.dumps(results))


KERNEL_NAMES = {"forward": ("_fwd_kernel",), "backward": ("_bwd_delta", "_bwd_dkdv", "_bwd_dq")}


def _launch_calls():
    """(label, function of no arguments) for the launch comparison: forward and backward of each."""
    import torch

    from hf_flash import flash_attn_func, flash_attn_varlen_func

    def run(fn, *shapes, **kwargs):
        tensors = [torch.zeros(*shape, dtype=torch.float16, requires_grad=True) for shape in shapes]
        out = fn(*tensors, **kwargs)
        out.backward(torch.zeros_like(out))

    cu_q = torch.tensor([0, 5, 5, 22], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13, 30], dtype=torch.int32)
    sinks = torch.zeros(4)
    varlen = lambda q, k, v, **kw: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 17, **kw)
    dense = [(2, 37, 4, 64), (2, 41, 2, 64), (2, 41, 2, 64)]
    packed = [(22, 4, 80), (30, 4, 80), (30, 4, 80)]
    return [
        ("dense causal gqa", lambda: run(flash_attn_func, *dense, causal=True)),
        ("dense window softcap sinks", lambda: run(flash_attn_func, *dense, window_size=(7, 3), softcap=5.0,
                                                   sinks=sinks)),
        ("dense block-aligned causal det", lambda: run(flash_attn_func, (1, 128, 4, 128), (1, 128, 4, 128),
                                                       (1, 128, 4, 128), causal=True, deterministic=True)),
        ("dense dropout atomic d256", lambda: run(flash_attn_func, (1, 33, 2, 256), (1, 33, 1, 256),
                                                  (1, 33, 1, 256), dropout_p=0.1)),
        ("decode", lambda: run(flash_attn_func, (2, 1, 4, 64), (2, 50, 2, 64), (2, 50, 2, 64), causal=True)),
        ("varlen causal", lambda: run(varlen, *packed, causal=True)),
        ("varlen window sinks det", lambda: run(varlen, *packed, window_size=(4, 0), sinks=sinks,
                                                deterministic=True)),
    ]


def launch_worker(out_file: str) -> None:
    """Record every kernel launch of :func:`_launch_calls` (run under the interpreter's device rules, kernels
    replaced) as JSON: {label: [[kernel, grid, options, {parameter: value}], ...]}."""
    import importlib
    import inspect

    import torch

    from hf_flash.ops import config

    config._pick = lambda kernel, head_dim, device, max_seqlen_q=None, varlen=False: config.SM90.config(
        kernel, head_dim, max_seqlen_q, varlen)
    log = []

    def describe(value):
        if isinstance(value, torch.Tensor):
            return ["tensor", list(value.shape), list(value.stride()), str(value.dtype)]
        return repr(value)

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = inspect.signature(self.kernel.fn).parameters
                options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
                bound = inspect.signature(self.kernel.fn).bind(*args, **kwargs).arguments
                log.append([self.kernel.fn.__name__, list(grid), options, {k: describe(v) for k, v in bound.items()}])
            return launch

    for module_name, kernels in KERNEL_NAMES.items():
        module = importlib.import_module(f"hf_flash.ops.{module_name}")
        for name in kernels:
            setattr(module, name, Recorder(getattr(module, name)))
    from hf_flash.ops import function

    function.ATOMIC_DQ_MIN_HEAD_DIM = 129  # as shipped (a test may lower it)
    results = {}
    for label, call in _launch_calls():
        log.clear()
        torch.manual_seed(0)  # the dropout seed
        call()
        results[label] = list(log)
    Path(out_file).write_text(json.dumps(results))


def compare_launches(base: Path, tmp: str) -> int:
    """Run :func:`launch_worker` with the working tree and with ``base``; print and count the differences."""
    outs = {}
    for name, root in (("tree", REPO), ("base", base)):
        outs[name] = Path(tmp, f"launches_{name}.json")
        env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, __file__, "--launch-worker", str(outs[name])], env=env, cwd=root, check=True)
    tree, old = (json.loads(outs[k].read_text()) for k in ("tree", "base"))
    differ = 0
    for label in tree:
        same = tree[label] == old[label]
        kernels = ", ".join(launch[0] for launch in tree[label])
        print(f"{'same ' if same else 'DIFF '} launches of {label}: {kernels}")
        if not same:
            differ += 1
            for mine, theirs in zip(tree[label], old[label]):
                for part, a, b in zip(("kernel", "grid", "options", "arguments"), mine, theirs):
                    if a != b:
                        keys = sorted(set(a) ^ set(b)) if isinstance(a, dict) else []
                        changed = [k for k in a if isinstance(a, dict) and k in b and a[k] != b[k]]
                        print(f"    {mine[0]} {part}: only one side has {keys}, values differ for {changed}")
    return differ


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    p.add_argument("--chips", default="sm80,sm90")
    p.add_argument("--kernels", default="fwd,dkdv,dq,delta")
    p.add_argument("--launches-only", action="store_true", help="compare the launches, compile nothing")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))  # the case builder reads this checkout's tile tables, whatever is installed
    import triton

    cases = [] if a.launches_only else build_cases(a.chips.split(","), a.kernels.split(","))
    print(f"triton {triton.__version__}: {len(cases)} cases, working tree vs {a.base}")
    with tempfile.TemporaryDirectory(prefix="hf_flash_same_code_") as tmp:
        base = Path(tmp, "base")
        base.mkdir()
        archive = subprocess.run(["git", "archive", a.base, "hf_flash"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        outs = {"tree": Path(tmp, "tree.json"), "base": Path(tmp, "base.json")}
        procs = [compile_all(REPO, cases, outs["tree"]), compile_all(base, cases, outs["base"])]
        if any(proc.wait() != 0 for proc in procs):
            print("a compile worker failed")
            return 1
        tree, old = (json.loads(outs[k].read_text()) for k in ("tree", "base"))
        launch_differ = compare_launches(base, tmp)
    differ = 0
    for label in (c["label"] for c in cases):
        mine, theirs = tree[label], old[label]
        if "error" in mine or "error" in theirs:
            print(f"ERROR  {label}: {mine.get('error') or theirs.get('error')}")
            differ += 1
            continue
        same = {stage: mine[stage] == theirs[stage] for stage in ("ptx", "ttgir")}
        print(f"{'same ' if all(same.values()) else 'DIFF '} {label}: " + ", ".join(
            f"{stage} {'identical' if ok else 'differs'} ({len(mine[stage].splitlines())} lines)"
            for stage, ok in same.items()))
        if not all(same.values()):
            if not differ:
                stage = "ptx" if not same["ptx"] else "ttgir"
                diff = difflib.unified_diff(theirs[stage].splitlines(), mine[stage].splitlines(), a.base, "tree",
                                            lineterm="", n=2)
                print("\n".join(list(diff)[:60]))
            differ += 1
    print(f"{len(cases) - differ} of {len(cases)} cases compile to the same code; "
          f"{'no launch differs' if not launch_differ else f'{launch_differ} sets of launches differ'}")
    return 1 if differ or launch_differ else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:4])
    elif sys.argv[1:2] == ["--launch-worker"]:
        launch_worker(sys.argv[2])
    else:
        sys.exit(main())
