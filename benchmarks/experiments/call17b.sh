#!/bin/bash
# Seventeenth session, second device call (~560 s cold: the whole GPU suite after a win). call17a.sh's bounds: half of dQ's fp32 stores +5.4%
# (their 2-way bank conflicts), no reductions +4.2%, no delta loads +2.4%; the register-order patch lost 6% (its
# strided copy in dQ's cast). hopper-bwd-dq-blocks.patch stores each group's part as [8-column blocks, 64 rows, 8]
# (a warp's STS.64 of a register pair 256 contiguous bytes: conflict-free) and adds it through one 5D TMA box per
# group from a descriptor of the same buffer as [B, H, D/8, L, 8]: no copy, the same 16 STS.64 a step (offline,
# Triton 3.6 and 3.9). If it wins: README's D128 backward cells against cuDNN with it, then the whole GPU suite
# with it, in the seconds left of the call (a process that runs out is rerun with ONLY= in the next call).
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if WIN=hopper-bwd-dq-blocks SPEED=bwd bash benchmarks/experiments/hopper_ab.sh main hopper-bwd-dq-blocks.patch; then
  git apply benchmarks/experiments/hopper-bwd-dq-blocks.patch && echo "dq-blocks applied to the tree"
  timeout 120 python scripts/bench_attention.py --dtypes bf16 --head-dims 128 --causal both --modes bwd --no-varlen \
    --backends hf_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --rounds 3 --out /tmp/grid 2>&1 |
    tee $OUT/verdict128_bwd.log | tail -12
  cp /tmp/grid/*.json $OUT/ 2>/dev/null
  LOG_DIR=/tmp/gpu_all LIMIT=$((585 - SECONDS)) bash tests/run_gpu_all.sh 2>&1 | tail -20
  tar -czf $OUT/gpu_all.tgz -C /tmp gpu_all
fi
