#!/bin/bash
# Device call: the Hopper forward for packed batches (hopper-fwd-varlen.patch) in a scratch copy, against main's
# tree. 1) the Hopper forward's GPU tests on the patch (the varlen oracle cases among them); 2) varlen_split.py
# on main and on the patch (packed mixes against the dense batch of the same tokens: the varlen forward rows
# move from the portable kernel to the Hopper one; the backward rows show the Hopper backward on packed batches);
# 3) the dense forward at 4,000 / 12,345 / 16,384 on the patch (one tile a program now: no change expected).
# Logs to $OUT.
set -u
ROOT=$PWD
OUT=${OUT:-$ROOT/fwd-varlen-out}
mkdir -p "$OUT"
S=$(mktemp -d)
mkdir -p $S/p && cp -r hf_flash tests benchmarks scripts docs README.md pyproject.toml $S/p/
(cd $S/p && git apply $ROOT/benchmarks/experiments/hopper-fwd-varlen.patch) || { echo "!! patch"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
(cd $S/p && PYTHONPATH=$S/p:$S/p/tests/ops timeout 240 python -m pytest -q -m gpu -p no:cacheprovider \
    tests/ops/test_hopper_fwd.py 2>&1 | tail -6) | tee $OUT/tests.log
for tree in $ROOT $S/p; do
    echo "== $tree"
    (cd $tree && PYTHONPATH=$tree timeout 150 python benchmarks/varlen_split.py --head-dim 64 --heads 32 \
        --kv-heads 8 2>&1 | grep -E "TFLOP|rror")
done | tee $OUT/varlen.log
[ "${QUICK:-0}" = 1 ] && exit 0
(cd $S/p && PYTHONPATH=$S/p timeout 100 python benchmarks/hopper_fwd_speed.py --rounds 3 --head-dim 128 \
    --seqlens 4000,12345,16384 2>&1 | grep -E "TFLOP|rror") | tee $OUT/speed.log
