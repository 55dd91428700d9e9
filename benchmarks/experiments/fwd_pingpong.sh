#!/bin/bash
# Device call: FlashAttention-3's ping-pong of the two D128 consumer groups in the Hopper forward
# (hopper-fwd-pingpong.patch: named barriers hand the turn to issue products from one group to the other, so
# one group's softmax runs while the other's products run) against main, in one call. 1) a smoke run of the
# patch (a protocol error would hang: the timeout says so at once); 2) the Hopper forward's GPU tests on the
# patch; 3) hopper_fwd_speed.py at D128 on main, the patch, main again (each line: Hopper against the portable
# forward in the same process, so the ratios compare across the runs; O and LSE checked against it too).
# Logs to $OUT.
set -u
ROOT=$PWD
OUT=${OUT:-$ROOT/fwd-pingpong-out}
mkdir -p "$OUT"
S=$(mktemp -d)
mkdir -p $S/p && cp -r hf_flash tests benchmarks scripts docs README.md pyproject.toml $S/p/
(cd $S/p && git apply $ROOT/benchmarks/experiments/hopper-fwd-pingpong.patch) || { echo "!! patch"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
SPEED="python benchmarks/hopper_fwd_speed.py --head-dim 128"
(cd $S/p && PYTHONPATH=$S/p timeout 90 $SPEED --rounds 1 --seqlens 4096 >$OUT/smoke.log 2>&1)
rc=$?
grep -E "TFLOP|rror" $OUT/smoke.log
[ $rc = 124 ] && { echo "!! the patch hangs (no result in 90 s)"; exit 1; }
(cd $S/p && PYTHONPATH=$S/p:$S/p/tests/ops timeout 240 python -m pytest -q -x -m gpu -p no:cacheprovider \
    tests/ops/test_hopper_fwd.py 2>&1 | tail -4) | tee $OUT/tests.log
for tree in $ROOT $S/p $ROOT; do
    echo "== $tree"
    # the table's tile and 3 K/V stages (229,752 B of shared memory, fits; never timed at D128): the group that
    # holds the turn waits for its next K block, which a third stage may have brought in already
    (cd $tree && PYTHONPATH=$tree timeout 150 $SPEED --rounds 3 --seqlens ${SEQLENS:-4096,8192,16384} \
        --tiles ${TILES:-g2n128s2,g2n128s3} 2>&1 | grep -E "TFLOP|rror")
done | tee $OUT/speed.log
