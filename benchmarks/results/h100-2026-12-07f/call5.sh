#!/bin/bash
# Sixteenth session, third call: hopper-bwd-dq-loader.patch (D128: the loader issues dQ's TMA reductions, the
# consumers only store their parts; the profile of call 2 put ~15% of a consumer's stall samples on issuing them)
# against main, ratio to the portable backward, each in its own process; if it gains >= 2% on average, loses no
# case by more than 2% and its dQ matches, the Hopper backward's GPU tests with the patch applied to the tree
# (SUITE=1: the whole GPU suite instead).
export PYTHONPATH=$PWD
R=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
variant() {  # name, patch ('' for none)
  local d=/tmp/var/$1
  mkdir -p $d && cp -r $R/hf_flash $d/
  (cd $d && { [ -z "$2" ] || patch -s -p1 < $R/benchmarks/experiments/$2; })
  echo "== $1"
  B="timeout 100 env PYTHONPATH=$d python benchmarks/hopper_bwd_speed.py --head-dim 128 --rounds 3"
  $B --causal both --seqlens 4096,16384 2>&1 | grep TFLOP
  $B --heads 32 --kv-heads 8 --causal causal --seqlens 8192 2>&1 | grep TFLOP
}
{ variant main ""; variant dqld hopper-bwd-dq-loader.patch; } 2>&1 | tee $OUT/ab_dqld.log
python - $OUT/ab_dqld.log <<'PY' | tee -a $OUT/ab_dqld.log
import re, sys
rows, err, name = {}, {}, None
for line in open(sys.argv[1]):
    if line.startswith("== "):
        name = line.split()[1]
    m = re.search(r"(\d+\.\d+)x \(.*dq (\S+),", line)
    if m and name:
        rows.setdefault(name, []).append(float(m.group(1)))
        err[name] = max(err.get(name, 0), float(m.group(2)))
for k, v in rows.items():
    print(k, " ".join(f"{x:.2f}" for x in v), f"mean {sum(v) / len(v):.3f}", f"max dq err {err[k]:.1e}")
m, d = rows.get("main", []), rows.get("dqld", [])
ok = len(m) == len(d) == 5 and sum(d) >= 1.02 * sum(m) and min(b / a for a, b in zip(m, d)) >= 0.98 and err["dqld"] < 1e-2
print("WIN" if ok else "NO")
PY
if tail -1 $OUT/ab_dqld.log | grep -q WIN; then
  patch -s -p1 < benchmarks/experiments/hopper-bwd-dq-loader.patch && echo "applied to the tree"
  if [ "${SUITE:-0}" = 1 ]; then
    LOG_DIR=/tmp/gpu_all LIMIT=${LIMIT:-400} bash tests/run_gpu_all.sh 2>&1 | tail -16
    tar -czf $OUT/gpu_all.tgz -C /tmp gpu_all
  else  # the Hopper backward's GPU cases (D64 and D128, causal or not, GQA, varlen, odd lengths)
    timeout ${TEST_LIMIT:-130} python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -4 | tee $OUT/test_hopper_bwd.log
  fi
fi
