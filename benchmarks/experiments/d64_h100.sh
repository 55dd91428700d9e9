#!/bin/bash
# Device call (H100): the D64 Hopper backward's gate (2k-8k) and its cells against cuDNN and FA2 (README's table),
# then the LoRA long runs. Logs to $OUT.
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
{ timeout 100 python benchmarks/hopper_bwd_speed.py --head-dim 64 --seqlens 2048,4096,8192 --rounds 3 2>&1 | tail -7
  timeout 60 python benchmarks/hopper_bwd_speed.py --head-dim 64 --kv-heads 8 --causal causal --seqlens 4096,8192 --rounds 3 2>&1 | tail -3
} | tee $OUT/gate.log
timeout 150 python scripts/bench_attention.py --dtypes bf16 --head-dims 64 --causal both --modes bwd --no-varlen \
  --backends hf_flash,sdpa_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --out /tmp/grid 2>&1 | tee $OUT/grid.log | tail -3; cp /tmp/grid/*.json $OUT/ 2>/dev/null
OUT_DIR=$OUT PARTS=long timeout 200 bash benchmarks/lora_runs.sh 2>&1 | tail -12
rm -f $OUT/triton_cache.tgz; rm -rf $OUT/lora/long/L*
