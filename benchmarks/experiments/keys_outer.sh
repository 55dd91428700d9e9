#!/bin/bash
# Device call (ninth session): main with hopper-bwd-keys-outer.patch applied in the working tree (causal programs
# numbered key block outer where at most 32 (batch, kv head) pairs): its speed where the numbering changes (and one
# case where it does not), the LoRA long runs, then the Hopper backward's GPU tests. Logs to $OUT.
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
B="timeout 70 python benchmarks/hopper_bwd_speed.py --rounds 3"
{ $B --head-dim 64 --kv-heads 8 --causal causal --seqlens 4096,8192,32768 2>&1 | tail -4
  $B --head-dim 128 --kv-heads 8 --causal causal --seqlens 8192 2>&1 | tail -2
} | tee $OUT/speed.log
OUT_DIR=$OUT PARTS=long timeout 150 bash benchmarks/lora_runs.sh 2>&1 | tail -8
rm -f $OUT/triton_cache.tgz; rm -rf $OUT/lora/long/L* $OUT/lora/long/*.png
timeout 200 python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -4 | tee $OUT/tests.log
