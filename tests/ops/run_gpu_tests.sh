#!/usr/bin/env bash
# Run tests/ops on one GPU in N pytest processes at once (default 8). A cold run is bound by Triton
# compiling one kernel specialisation per (head dim, flags, dtype) on the CPU, which parallelises across
# cores; the tests themselves need little of the GPU. Shards are every N-th test (gpu_shards.py).
#
#   bash tests/ops/run_gpu_tests.sh [N] [extra pytest args, e.g. -m gpu or -x]
#
# Logs go to $LOG_DIR (default: $OUT/hf_flash_gpu_tests when $OUT is set, else /tmp/hf_flash_gpu_tests).
set -uo pipefail
shards=${1:-8}
shift || true
cd "$(dirname "$0")/../.."
log_dir=${LOG_DIR:-${OUT:-/tmp}/hf_flash_gpu_tests}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < shards; i++)); do
    HF_FLASH_TEST_SHARD="$i/$shards" PYTHONPATH="tests/ops${PYTHONPATH:+:$PYTHONPATH}" \
        python -m pytest -q -rfE -p gpu_shards -p no:cacheprovider --durations=5 tests/ops "$@" \
        >"$log_dir/shard_$i.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
grep -h -E "^(FAILED|ERROR) " "$log_dir"/shard_*.log
for ((i = 0; i < shards; i++)); do
    echo "shard $i: $(grep -E '(passed|failed|error)' "$log_dir/shard_$i.log" | tail -n 1)"
done
exit $status
