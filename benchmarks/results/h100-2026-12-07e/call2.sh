#!/bin/bash
# Fifteenth session, second device call: target 2's verdict from 4k with rounds (PLAN item 3).
# D64G2=1: the D64 forward in 2 groups (hopper_fwd.TILES' D64 rows: groups=2) for the whole call.
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${D64G2:-0}" = 1 ]; then
  sed -i 's/(64, \(False\|True\)): Tile(groups=3,/(64, \1): Tile(groups=2,/' hf_flash/ops/hopper_fwd.py
fi
grep -n "(64, " hf_flash/ops/hopper_fwd.py
G="python scripts/bench_attention.py --dtypes bf16 --causal both --modes fwd,bwd --no-varlen --backends hf_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --rounds 3"
timeout 285 $G --time-budget 240 --head-dims 128 --out /tmp/g128 2>&1 | tee $OUT/verdict128.log | tail -22
timeout 285 $G --time-budget 240 --head-dims 64 --out /tmp/g64 2>&1 | tee $OUT/verdict64.log | tail -22
cp /tmp/g128/bench_attention.json $OUT/verdict128.json; cp /tmp/g64/bench_attention.json $OUT/verdict64.json
