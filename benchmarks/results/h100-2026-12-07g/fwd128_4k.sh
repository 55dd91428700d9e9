#!/bin/bash
# Prepared in the sixteenth session (no device time was left): where the D128 non-causal forward at 4k (0.93x
# cuDNN, README) loses: tiles and tile orders against the portable forward, then a profile of one call (MHA B4 H16
# L=4096).
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
F="timeout 90 python benchmarks/hopper_fwd_speed.py --head-dim 128 --causal plain --seqlens 4096 --rounds 3"
$F --tiles g2n128s2,g2n128s3 2>&1 | grep TFLOP | tee $OUT/fwd128_4k_tiles.log
$F --orders wave,all,8 2>&1 | grep TFLOP | tee $OUT/fwd128_4k_orders.log
timeout 120 ncu --clock-control none --set full --import-source yes -k regex:_fwd_hopper -c 1 -o $OUT/fwd128 \
  python benchmarks/hopper_fwd_speed.py --head-dim 128 --causal plain --seqlens 4096 --rounds 1 2>&1 | tail -2
ncu -i $OUT/fwd128.ncu-rep --page details > $OUT/fwd128_details.txt 2>&1
ncu -i $OUT/fwd128.ncu-rep --page source --csv --print-source sass > $OUT/fwd128_sass.csv 2>&1
rm -f $OUT/fwd128.ncu-rep
grep -E "Duration|Waves Per SM|Compute \(SM\) Throughput|L2 Cache Throughput|Eligible Warps" $OUT/fwd128_details.txt
