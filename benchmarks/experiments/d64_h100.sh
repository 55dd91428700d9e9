#!/bin/bash
# Device call (ninth session's plan): the D64 Hopper backward's gate (2k-8k), the causal grid order A/B
# (hopper-bwd-causal-order.patch against main, ratios to the portable backward of the same process), the D64
# backward cells against cuDNN and FA2 (README's table), then the LoRA long runs. Logs to $OUT.
export PYTHONPATH=$PWD
R=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
B="timeout 90 python benchmarks/hopper_bwd_speed.py --rounds 3"
{ echo "== main"
  $B --head-dim 64 --seqlens 2048,4096,8192 2>&1 | tail -7
  $B --head-dim 64 --kv-heads 8 --causal causal --seqlens 4096,8192,32768 2>&1 | tail -4
  $B --head-dim 128 --causal causal --seqlens 8192,16384 2>&1 | tail -3
  $B --head-dim 128 --kv-heads 8 --causal causal --seqlens 8192 2>&1 | tail -2
} | tee $OUT/gate.log
S=/tmp/co; mkdir -p $S; cp -r hf_flash tests benchmarks $S/; (cd $S && git apply $R/benchmarks/experiments/hopper-bwd-causal-order.patch)
{ echo "== causal-order"; cd $S; export PYTHONPATH=$S
  $B --head-dim 64 --causal causal --seqlens 4096,8192 2>&1 | tail -3
  $B --head-dim 64 --kv-heads 8 --causal causal --seqlens 4096,8192,32768 2>&1 | tail -4
  $B --head-dim 128 --causal causal --seqlens 8192,16384 2>&1 | tail -3
  $B --head-dim 128 --kv-heads 8 --causal causal --seqlens 8192 2>&1 | tail -2
  cd $R; export PYTHONPATH=$R
} | tee $OUT/causal_order.log
timeout 150 python scripts/bench_attention.py --dtypes bf16 --head-dims 64 --causal both --modes bwd --no-varlen \
  --backends hf_flash,sdpa_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --out /tmp/grid 2>&1 | tee $OUT/grid.log | tail -3
cp /tmp/grid/*.json $OUT/ 2>/dev/null
OUT_DIR=$OUT PARTS=long timeout 200 bash benchmarks/lora_runs.sh 2>&1 | tail -12
rm -f $OUT/triton_cache.tgz; rm -rf $OUT/lora/long/L*
