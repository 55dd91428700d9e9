#!/bin/bash
# Sixteenth session, third device call: the D64 causal forward's cells of target 2 with the causal lead (README's
# command, D64 causal forward only), then a profile of one D128 Hopper backward call (MHA non-causal 16k, 0.96x cuDNN).
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python scripts/bench_attention.py --dtypes bf16 --causal yes --modes fwd --no-varlen \
  --backends hf_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --rounds 3 --head-dims 64 --out /tmp/g64 \
  2>&1 | tee $OUT/verdict64_causal_fwd.log | tail -12
cp /tmp/g64/bench_attention.json $OUT/verdict64_causal_fwd.json
timeout 300 ncu --clock-control none --set full --import-source yes -k regex:_bwd_hopper -c 1 -o $OUT/bwd128 \
  python benchmarks/hopper_bwd_speed.py --causal plain --seqlens 16384 --rounds 1 2>&1 | tail -5
ncu -i $OUT/bwd128.ncu-rep --page details > $OUT/bwd128_details.txt 2>&1; tail -3 $OUT/bwd128_details.txt
ncu -i $OUT/bwd128.ncu-rep --page source --csv --print-source sass > $OUT/bwd128_sass.csv 2>&1; wc -l $OUT/bwd128_sass.csv
ls -la $OUT
