#!/bin/bash
# Fifteenth session: hopper-fwd-causal-lead.patch (causal tiles end at L) against main, ratios to the portable
# forward in the same process; then the Hopper forward GPU tests with the patch (SUITE=1: the GPU suite instead, if
# D64 causal 4k gains >= 2%).
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
ab() {
  B="timeout 60 python benchmarks/hopper_fwd_speed.py --rounds 3 --causal causal"
  if [ "${QUICK:-0}" = 1 ]; then  # a short call: D64 MHA causal 4k / 12,345 only
    $B --head-dim 64 --seqlens 4096,12345 2>&1 | grep hopper:
    return
  fi
  $B --head-dim 64 --seqlens 4096,8192,12345 2>&1 | grep hopper:
  $B --head-dim 64 --kv-heads 8 --seqlens 4096,12345 2>&1 | grep hopper:
  $B --head-dim 128 --seqlens 4096,12345 2>&1 | grep hopper:
}
{ echo "== main"; ab; } | tee $OUT/ab_main.log
git apply benchmarks/experiments/hopper-fwd-causal-lead.patch && echo applied
{ echo "== lead"; ab; } | tee $OUT/ab_lead.log
m=$(grep "D64 causal B4 L=4096 H32/32" $OUT/ab_main.log | sed 's/.*: \([0-9.]*\)x.*/\1/')
l=$(grep "D64 causal B4 L=4096 H32/32" $OUT/ab_lead.log | sed 's/.*: \([0-9.]*\)x.*/\1/')
echo "D64 causal 4k ratio main $m lead $l"
if [ "${SUITE:-0}" = 1 ] && python -c "import sys; sys.exit(0 if float('$l') >= 1.02 * float('$m') else 1)"; then
  LOG_DIR=/tmp/gpu_all LIMIT=${LIMIT:-430} bash tests/run_gpu_all.sh 2>&1 | tail -25
  tar -czf $OUT/gpu_all.tgz -C /tmp gpu_all
else  # the Hopper forward's GPU cases with the patch (every causal lead: 0, 1 and 2 idle groups, varlen)
  timeout ${TEST_LIMIT:-150} python -m pytest -q -m gpu tests/ops/test_hopper_fwd.py 2>&1 | tail -4 | tee $OUT/test_hopper_fwd.log
fi
