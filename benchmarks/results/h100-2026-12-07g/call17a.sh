#!/bin/bash
# Prepared in the sixteenth session for the next device call (~300 s cold).
# (1) Is the D128 backward limited by shared-memory wavefronts? Bounds against main, each dQ- or dS-wrong: no dQ
# reductions (their 256 wavefronts of reads a step and their L2 traffic; +4% in the sixteenth session), half of
# dQ's fp32 stores (the 256 excess wavefronts a step of their 2-way bank conflicts) and no delta loads (8 of the
# 16 LDS.64 a step). And the change itself: hopper-bwd-dq-order.patch, dQ's parts in the products' register order
# (8 STS.128 a step without conflicts, a [16, 256] TMA box, the order undone in dQ's cast; dense D128 only). If it
# wins (>= 2% mean, no case 2% down, dQ within 1e-2 of the portable backward's), the Hopper backward's GPU tests
# with it (then land it after the whole suite). (2) The D128 non-causal forward at 4k (fwd128_4k.sh).
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
SPEED=bwd bash benchmarks/experiments/hopper_ab.sh main hopper-bwd-dq-order.patch hopper-bwd-nored.patch \
  hopper-bwd-halfsts.patch hopper-bwd-nodelta.patch
if python benchmarks/experiments/ab_summary.py $OUT/hopper_ab.log --win hopper-bwd-dq-order; then
  git apply benchmarks/experiments/hopper-bwd-dq-order.patch && echo "dq-order applied to the tree"
  timeout 150 python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -4 | tee $OUT/test_hopper_bwd.log
  git apply -R benchmarks/experiments/hopper-bwd-dq-order.patch
fi
bash benchmarks/experiments/fwd128_4k.sh
