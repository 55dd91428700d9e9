#!/bin/bash
# Seventeenth session, second device call (~250 s cold). call17a.sh's bounds: half of dQ's fp32 stores +5.4%
# (their 2-way bank conflicts), no reductions +4.2%, no delta loads +2.4%; the register-order patch lost 6% (its
# strided copy in dQ's cast). hopper-bwd-dq-blocks.patch stores each group's part as [8-column blocks, 64 rows, 8]
# (a warp's STS.64 of a register pair 256 contiguous bytes: conflict-free) and adds it through one 5D TMA box per
# group from a descriptor of the same buffer as [B, H, D/8, L, 8]: no copy, the same 16 STS.64 a step (offline,
# Triton 3.6 and 3.9). If it wins: README's D128 backward cells against cuDNN with it, and its GPU tests.
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if WIN=hopper-bwd-dq-blocks SPEED=bwd bash benchmarks/experiments/hopper_ab.sh main hopper-bwd-dq-blocks.patch; then
  git apply benchmarks/experiments/hopper-bwd-dq-blocks.patch && echo "dq-blocks applied to the tree"
  timeout 120 python scripts/bench_attention.py --dtypes bf16 --head-dims 128 --causal both --modes bwd --no-varlen \
    --backends hf_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --rounds 3 --out /tmp/grid 2>&1 |
    tee $OUT/verdict128_bwd.log | tail -12
  cp /tmp/grid/*.json $OUT/ 2>/dev/null
  timeout 150 python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -4 | tee $OUT/test_hopper_bwd.log
fi
