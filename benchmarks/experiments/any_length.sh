#!/bin/bash
# Device call: the Hopper kernels at any L (hopper-bwd-any-length.patch, then hopper-fwd-any-length-on-bwd.patch),
# in a scratch copy ("any"), against main's tree. 1) their GPU tests (the oracle at L = 129-700 and main's cases);
# 2) each patched kernel against the portable one at ragged lengths and at 16384 (the regression check against
# the README's numbers); 3) the public call at L = 12,345 on main (portable kernels both ways there) and on the
# patch, beside SDPA's cuDNN and flash backends. QUICK=1: the backward's tests and 2) only. VARLEN=1: also
# hopper-bwd-varlen-on-any-length.patch (its GPU tests run with the backward's) and varlen_split.py; VARLEN=1
# FWD_VARLEN=1: also hopper-fwd-varlen-on-bwd-varlen.patch (the forward for packed batches). Logs to $OUT.
set -u
ROOT=$PWD
OUT=${OUT:-$ROOT/any-out}
mkdir -p "$OUT"
S=$(mktemp -d)
mkdir -p $S/any && cp -r hf_flash tests benchmarks scripts docs README.md $S/any/
(cd $S/any && git apply $ROOT/benchmarks/experiments/hopper-bwd-any-length.patch &&
    git apply $ROOT/benchmarks/experiments/hopper-fwd-any-length-on-bwd.patch &&
    { [ "${VARLEN:-0}" != 1 ] || git apply $ROOT/benchmarks/experiments/hopper-bwd-varlen-on-any-length.patch; } &&
    { [ "${FWD_VARLEN:-0}" != 1 ] || git apply $ROOT/benchmarks/experiments/hopper-fwd-varlen-on-bwd-varlen.patch; }) ||
    { echo "!! patches"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
tests=tests/ops/test_hopper_bwd.py
[ "${QUICK:-0}" = 1 ] && [ "${FWD_VARLEN:-0}" != 1 ] || tests="$tests tests/ops/test_hopper_fwd.py"
(cd $S/any && PYTHONPATH=$S/any:$S/any/tests/ops timeout 240 python -m pytest -q -m gpu -p no:cacheprovider $tests \
    2>&1 | tail -6) | tee $OUT/tests.log
B="timeout 100 python benchmarks/hopper_bwd_speed.py --rounds 3"
F="timeout 100 python benchmarks/hopper_fwd_speed.py --rounds 3"
(cd $S/any && export PYTHONPATH=$S/any
 $B --head-dim 128 --seqlens 9000,12345,16384 2>&1 | grep -E "TFLOP|rror"
 $B --head-dim 64 --seqlens 5000,12345,16384 2>&1 | grep -E "TFLOP|rror"
 if [ "${QUICK:-0}" != 1 ]; then
     $F --head-dim 128 --seqlens 4000,12345,16384 2>&1 | grep -E "TFLOP|rror"
     $F --head-dim 64 --seqlens 4000,12345,16384 2>&1 | grep -E "TFLOP|rror"
 fi) | tee $OUT/speed.log
if [ "${VARLEN:-0}" = 1 ]; then
    (cd $S/any && PYTHONPATH=$S/any timeout 150 python benchmarks/varlen_split.py --head-dim 64 --heads 32 \
        --kv-heads 8 2>&1 | grep -E "TFLOP|rror") | tee $OUT/varlen.log
fi
[ "${QUICK:-0}" = 1 ] && exit 0
for tree in $ROOT $S/any; do
    echo "== $tree"
    (cd $tree && PYTHONPATH=$tree timeout 150 python scripts/bench_attention.py --dtypes bf16 --head-dims 64,128 \
        --causal both --modes fwd,bwd --no-varlen --backends hf_flash,sdpa_flash,sdpa_cudnn --seqlens 12345 \
        --out $OUT/bench_$(basename $tree) 2>&1 | grep -E "^\| " | tail -24)
done | tee $OUT/bench.log
