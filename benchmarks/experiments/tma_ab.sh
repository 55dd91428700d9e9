#!/bin/bash
# Device call (tenth session): hopper-bwd-keys-outer.patch (ko) against it plus the TMA dQ reduction
# (hopper-bwd-tma-reduce-on-keys-outer.patch, kot), each in a scratch copy; hopper_bwd_speed.py's ratios to the
# portable backward in the same process, the variants alternating per case; then the Hopper backward's GPU tests on
# kot (QUICK=1: D128 and D64 at 16k, no tests). Logs to $OUT.
set -u
ROOT=$PWD
S=$(mktemp -d)
for v in ko kot; do
    mkdir -p $S/$v && cp -r hf_flash tests benchmarks docs $S/$v/
    # the working tree may hold keys-outer already (the GPU suite's call that follows needs it applied)
    (cd $S/$v && { git apply -R --check $ROOT/benchmarks/experiments/hopper-bwd-keys-outer.patch 2>/dev/null ||
        git apply $ROOT/benchmarks/experiments/hopper-bwd-keys-outer.patch; }) || echo "!! ko patch"
done
(cd $S/kot && git apply $ROOT/benchmarks/experiments/hopper-bwd-tma-reduce-on-keys-outer.patch) || echo "!! tma patch"
nvidia-smi --query-gpu=name --format=csv,noheader
cases=(
  "--head-dim 128 --seqlens 8192,16384"
  "--head-dim 64 --seqlens 4096,16384"
  "--head-dim 64 --kv-heads 8 --causal causal --seqlens 8192"
  "--head-dim 128 --kv-heads 8 --causal causal --seqlens 8192"
)
if [ "${QUICK:-0}" = 1 ]; then  # a short call: one length a head dim, no tests
    cases=("--head-dim 128 --seqlens 16384" "--head-dim 64 --seqlens 16384")
fi
for c in "${cases[@]}"; do
    for v in ko kot; do
        echo "== $v $c"
        (cd $S/$v && PYTHONPATH=$S/$v timeout 90 python benchmarks/hopper_bwd_speed.py --rounds 3 $c 2>&1 | grep -E "TFLOP|Error|error" | tail -6)
    done
done | tee $OUT/speed.log
[ "${QUICK:-0}" = 1 ] || (cd $S/kot && PYTHONPATH=$S/kot timeout 150 python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -6) | tee $OUT/tests.log
