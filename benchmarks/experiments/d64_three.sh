#!/bin/bash
# Device call: the three D64 Hopper backward patches next to each other (PLAN.md, "The next device call"),
# then a second run of the forward's gate at 1.5k. Logs to $OUT.
R=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
for v in d64-fa3 d64-regs d64; do
  S=/tmp/$v; mkdir -p $S; cp -r hf_flash tests benchmarks $S/
  (cd $S && git apply $R/benchmarks/experiments/hopper-bwd-$v.patch) || echo "apply $v failed"
done
for v in d64-fa3 d64-regs d64; do
  echo "== $v"; cd /tmp/$v
  PYTHONPATH=/tmp/$v timeout 90 python benchmarks/hopper_bwd_speed.py --head-dim 64 --seqlens 4096,16384 --rounds 3 2>&1 | tail -8
  PYTHONPATH=/tmp/$v timeout 70 python benchmarks/hopper_bwd_speed.py --head-dim 64 --kv-heads 8 --causal causal --seqlens 8192,32768 --rounds 3 2>&1 | tail -6
done 2>&1 | tee $OUT/d64_three.log
cd $R
for d in 128 64; do PYTHONPATH=$R timeout 60 python benchmarks/hopper_fwd_speed.py --head-dim $d --seqlens 1536 --causal plain --rounds 7 2>&1 | tail -3; done | tee $OUT/fwd_gate2.log
