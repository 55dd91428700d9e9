#!/bin/bash
# Fifteenth session, first device call: PLAN items 1 and 2.
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
pip list 2>/dev/null | grep -iE "^(torch|triton|transformers) "
B="python benchmarks/hopper_fwd_speed.py --head-dim 64 --rounds 3 --seqlens 3072,4096,8192,16384 --tiles g3n128s2,g2n128s2,g2n128s3"
{ echo "== D64 fwd MHA"; timeout 100 $B 2>&1 | tail -14
  echo "== D64 fwd GQA 32/8"; timeout 100 $B --kv-heads 8 2>&1 | tail -14
  echo "== D128 fwd 1k/1.5k"; timeout 50 python benchmarks/hopper_fwd_speed.py --head-dim 128 --rounds 3 --seqlens 1024,1536 2>&1 | tail -6
} 2>&1 | tee $OUT/fwd_tiles.log
{ timeout 130 python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -5; } | tee $OUT/test_hopper_bwd.log
timeout 160 python scripts/bench_attention.py --dtypes bf16 --head-dims 128 --causal yes --modes bwd --no-varlen \
  --backends hf_flash,sdpa_flash,sdpa_cudnn --seqlens 1024,4096,8192,12345 --rounds 3 --out /tmp/grid 2>&1 | tee $OUT/grid_bwd.log | tail -30
cp /tmp/grid/*.json /tmp/grid/*.md $OUT/ 2>/dev/null; ls $OUT
