#!/bin/bash
# Device call: FlashAttention-3's ping-pong of the two D128 consumer groups in the Hopper forward against main, in
# one call. Variants (scratch copies of the tree, each with one patch):
#   pp          hopper-fwd-pingpong.patch: named barriers hand the turn to issue products from one group to the
#               other, so one group's softmax runs while the other's products run
#   pp-overlap  hopper-fwd-pingpong-overlap.patch: the same turns around FA3's intra-warpgroup overlap (S_j and
#               P_{j-1} V_{j-1} issued together, S_j's softmax while P V runs; two blocks an iteration so that P
#               has two register sets; ~400 B of spills, LDL in the loop: LOG, thirteenth session)
# 1) a smoke run of each (a protocol error would hang: the timeout says so at once); 2) hopper_fwd_speed.py at
# D128 on main, pp, pp-overlap, main (each line: Hopper against the portable forward in the same process, so the
# ratios compare across the runs; O and LSE checked against the portable forward, max |dO| / |dLSE| printed).
# The GPU tests run before a landing (the suite), not here. Logs to $OUT.
set -u
ROOT=$PWD
OUT=${OUT:-$ROOT/fwd-pingpong-out}
mkdir -p "$OUT"
S=$(mktemp -d)
for v in pp pp-overlap; do
    patch=hopper-fwd-pingpong.patch
    [ $v = pp-overlap ] && patch=hopper-fwd-pingpong-overlap.patch
    mkdir -p $S/$v && cp -r hf_flash tests benchmarks $S/$v/
    (cd $S/$v && git apply $ROOT/benchmarks/experiments/$patch) || { echo "!! $patch"; exit 1; }
done
nvidia-smi --query-gpu=name --format=csv,noheader
SPEED="python benchmarks/hopper_fwd_speed.py --head-dim 128"
for v in pp pp-overlap; do
    (cd $S/$v && PYTHONPATH=$S/$v timeout 90 $SPEED --rounds 1 --seqlens 4096 >$OUT/smoke-$v.log 2>&1)
    rc=$?
    echo "== smoke $v (exit $rc)"; grep -E "TFLOP|rror" $OUT/smoke-$v.log
    [ $rc = 124 ] && { echo "!! $v hangs (no result in 90 s)"; exit 1; }
done
# the table's tile, and 3 K/V stages (229,752 B of shared memory, fits; never timed at D128) where the variant
# takes them: the group that holds the turn waits for its next K block, which a third stage may have brought in
for run in main:$ROOT:g2n128s2,g2n128s3 pp:$S/pp:g2n128s2,g2n128s3 pp-overlap:$S/pp-overlap:g2n128s2 \
           main:$ROOT:g2n128s2,g2n128s3; do
    IFS=: read -r name tree tiles <<<"$run"
    echo "== $name"
    (cd $tree && PYTHONPATH=$tree timeout 150 $SPEED --rounds 3 --seqlens ${SEQLENS:-4096,8192,16384} \
        --tiles $tiles 2>&1 | grep -E "TFLOP|rror")
done | tee $OUT/speed.log
