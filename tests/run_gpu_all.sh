#!/usr/bin/env bash
# The whole GPU suite in one device call: every test folder, as parallel pytest processes on one GPU, so that
# Triton's compiles (the bulk of a cold run) overlap across CPU cores. The slow singletons get their own
# process: the 2**31-offset case (L = 32k) and the rest of tests/ops (the chip tests cross-compile in worker
# processes).
#
#   bash tests/run_gpu_all.sh            # logs in $OUT/gpu_all (or /tmp/gpu_all), a summary at the end
#   LIMIT=500 bash tests/run_gpu_all.sh  # per-process time limit in seconds (default 540)
#   ONLY=ops-other,integrations bash tests/run_gpu_all.sh   # only these processes (ops: the six kernel-grid shards and ops_long)
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${LOG_DIR:-${OUT:-/tmp}/gpu_all}
limit=${LIMIT:-540}
mkdir -p "$log_dir"
export PYTHONPATH="tests/ops${PYTHONPATH:+:$PYTHONPATH}"
pids=()
names=()

launch() {  # launch NAME SHARD PYTEST-ARGS...
    local name=$1 shard=$2
    shift 2
    if [ -n "${ONLY:-}" ] && ! [[ ",$ONLY," =~ ,${name%%_*}, ]]; then
        return
    fi
    HF_FLASH_TEST_SHARD=$shard timeout "$limit" python -m pytest -q -rfE -p gpu_shards -p no:cacheprovider \
        --durations=5 "$@" >"$log_dir/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
}

ops_rest="not offsets_past_2_31"
for i in 0 1 2 3 4 5; do
    launch "ops_$i" "$i/6" tests/ops/test_flash_attn.py tests/ops/test_flash_attn_gpu.py -k "$ops_rest"
done
launch ops_long "" tests/ops/test_flash_attn_gpu.py -k offsets_past_2_31
# every other file of tests/ops (the chip tables, TMA, loop spills, the Hopper kernels), so that a new test file
# is not left out; two shards since it grew past 470 s beside the others (twelfth session of 2026-12-07)
for i in 0 1; do
    launch "ops-other_$i" "$i/2" tests/ops --ignore=tests/ops/test_flash_attn.py \
        --ignore=tests/ops/test_flash_attn_gpu.py
done
launch integrations_0 0/3 tests/integrations
launch integrations_1 1/3 tests/integrations
launch integrations_2 2/3 tests/integrations
# the end-to-end scripts: 390-456 s in one process beside the others
launch scripts_0 0/2 tests/scripts
launch scripts_1 1/2 tests/scripts

status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    # pytest's 5 = nothing selected in that shard: not a failure
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        status=1
    fi
    echo "${names[$i]} (exit $rc): $(grep -E '(passed|failed|error|no tests ran)' "$log_dir/${names[$i]}.log" | tail -n 1)"
done
grep -h -E "^(FAILED|ERROR) " "$log_dir"/*.log
exit $status
