#!/bin/bash
# Seventeenth session, third device call (~520 s cold: the whole GPU suite after a win). call17b.sh: the
# unswizzled [8-column blocks, rows, 8] boxes (conflict-free stores, 32-byte TMA rows) read 1.15 / 1.13 at 4k
# against main's 1.10 / 1.11 but 1.10 / 1.16 / 1.12 against 1.18 / 1.19 / 1.18 at 16k and GQA 8k: the stores'
# conflicts are worth a few percent, the reduction's 32-byte rows cost more. hopper-bwd-dq-rows.patch keeps main's
# 128-byte-swizzled [64, 32] boxes and permutes a box's rows instead (query row 8a + 4b + c at shared row
# 8a + 2c + b, a 5D descriptor of the buffer as [H, B * L' / 8, 4, 2, D]): a half-warp's 4 rows meet 4 different
# chunk pairs of the swizzle; 128-byte rows to L2 as main; varlen keeps main's boxes (its steps start at any row).
# Offline: Triton 3.6 66 STS.64 (main 66), 8 UTMAREDG.5D (main 8 .4D); 3.9 compiles; Triton's own bank-conflict
# count (gl.bank_conflicts, both versions) reads 0 for these stores and 1 (2-way) for main's (a CPU test, with it). If it wins: the Hopper
# backward's GPU tests with it, README's D128 backward cells against cuDNN, then the whole GPU suite with it in
# the seconds left (a process that runs out is rerun with ONLY= in the next call). It did not run in the
# seventeenth session: four starts got no machine and took the device time.
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if WIN=hopper-bwd-dq-rows SPEED=bwd bash benchmarks/experiments/hopper_ab.sh main hopper-bwd-dq-rows.patch; then
  git apply benchmarks/experiments/hopper-bwd-dq-rows.patch && echo "dq-rows applied to the tree"
  timeout 150 python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -4 | tee $OUT/test_hopper_bwd.log
  timeout 120 python scripts/bench_attention.py --dtypes bf16 --head-dims 128 --causal both --modes bwd --no-varlen \
    --backends hf_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --rounds 3 --out /tmp/grid 2>&1 |
    tee $OUT/verdict128_bwd.log | tail -12
  cp /tmp/grid/*.json $OUT/ 2>/dev/null
  LOG_DIR=/tmp/gpu_all LIMIT=$((585 - SECONDS)) bash tests/run_gpu_all.sh 2>&1 | tail -20
  tar -czf $OUT/gpu_all.tgz -C /tmp gpu_all
fi
