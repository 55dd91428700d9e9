"""scripts/bench_attention.py's rounds (no GPU): a backend's rows of several rounds merge into medians, and the
table's ratio is the median of the round-by-round ratios with its range."""

import importlib.util
import sys

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "scripts" / "bench_attention.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_attention"] = bench  # its dataclasses look their module up
spec.loader.exec_module(bench)

SHAPE = bench.Shape(dtype="bf16", head_dim=128, causal=True, seqlen=4096, batch=4, nheads=32, nheads_k=8)


def row(backend, fwd_ms, bwd_ms, extra=100.0):
    r = {"shape": bench.asdict(SHAPE), "label": SHAPE.label, "backend": backend, "extra_mib": extra}
    for mode, ms in (("fwd", fwd_ms), ("bwd", bwd_ms)):
        r[f"{mode}_ms"] = ms
        r[f"{mode}_tflops"] = bench.tflops(SHAPE, mode, ms)
    return r


def test_rounds_merge_into_medians_and_keep_every_time():
    merged = bench.merge_rounds([row("hf_flash", 1.0, 3.0, 90), row("hf_flash", 1.2, 2.0, 110),
                                 row("hf_flash", 0.9, 2.5, 100)])
    assert merged["fwd_ms"] == 1.0 and merged["bwd_ms"] == 2.5 and merged["extra_mib"] == 110
    assert merged["fwd_ms_rounds"] == [1.0, 1.2, 0.9]
    assert merged["fwd_tflops"] == pytest.approx(SHAPE.fwd_flops() / 1e-3 / 1e12)
    assert bench.merge_rounds([row("sdpa_cudnn", 1.0, 2.0)]) == row("sdpa_cudnn", 1.0, 2.0)
    failed = {**row("sdpa_cudnn", 1.0, 2.0), "error": "out of memory"}
    assert bench.merge_rounds([row("sdpa_cudnn", 1.0, 2.0), failed])["error"] == "out of memory"


def test_table_ratio_is_the_median_of_the_rounds_ratios():
    # the GPU slows in round 2 for both: ratio by round 2.0, 2.0, 1.0; the ratio of the medians would read 1.5
    ours = bench.merge_rounds([row("hf_flash", 1.0, 1.0), row("hf_flash", 2.0, 2.0), row("hf_flash", 1.5, 1.5)])
    theirs = bench.merge_rounds([row("sdpa_cudnn", 2.0, 1.0), row("sdpa_cudnn", 4.0, 2.0),
                                 row("sdpa_cudnn", 1.5, 1.5)])
    table = bench.markdown_table([ours, theirs], ["fwd", "bwd"], "test GPU")
    line = next(line for line in table.splitlines() if "sdpa_cudnn" in line)
    assert line.endswith("| 2.00 (1.00-2.00) | 1.00 (1.00-1.00) |"), line
    single = bench.markdown_table([row("hf_flash", 1.0, 1.0), row("sdpa_cudnn", 2.0, 1.0)], ["fwd", "bwd"], "g")
    assert next(line for line in single.splitlines() if "sdpa_cudnn" in line).endswith("| 2.00 | 1.00 |")


def test_rounds_below_one_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
