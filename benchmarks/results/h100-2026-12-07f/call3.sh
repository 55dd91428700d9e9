#!/bin/bash
# Sixteenth session, calls 3 and 4 (4: VERDICT=0 PROFILE=0, rerun after the grep fix): (1) the D64 causal forward's cells of target 2 with the causal lead
# (README's command, D64 causal forward); (2) the D128 Hopper backward: main against the dQ parts double-buffered
# (hopper-bwd-dq-double.patch), 3 Q/dO stages (STAGES = 3) and, as a bound, no dQ reduction at all
# (hopper-bwd-nored.patch: dQ wrong), each timed against the portable backward in its own process; the Hopper
# backward's GPU tests with the double buffer if it gains >= 2% at 16k; (3) a profile of one D128 backward call.
export PYTHONPATH=$PWD
R=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${VERDICT:-1}" = 1 ]; then
  timeout 120 python scripts/bench_attention.py --dtypes bf16 --causal yes --modes fwd --no-varlen \
    --backends hf_flash,sdpa_cudnn --seqlens 4096,8192,16384,32768 --rounds 3 --head-dims 64 --out /tmp/g64 \
    2>&1 | tee $OUT/verdict64_causal_fwd.log | grep -v "round" | tail -12
  cp /tmp/g64/bench_attention.json $OUT/verdict64_causal_fwd.json
fi
variant() {  # name, patch ('' for none), sed on hopper_bwd.py ('' for none)
  local d=/tmp/var/$1
  mkdir -p $d && cp -r $R/hf_flash $d/
  (cd $d && { [ -z "$2" ] || patch -s -p1 < $R/benchmarks/experiments/$2; } && { [ -z "$3" ] || sed -i "$3" hf_flash/ops/hopper_bwd.py; })
  echo "== $1"
  B="timeout 100 env PYTHONPATH=$d python benchmarks/hopper_bwd_speed.py --head-dim 128 --rounds 3"
  $B --causal both --seqlens 4096,16384 2>&1 | grep TFLOP
  $B --heads 32 --kv-heads 8 --causal causal --seqlens 8192 2>&1 | grep TFLOP
}
{
  variant main "" ""
  variant dqdb hopper-bwd-dq-double.patch ""
  variant s3 "" 's/^STAGES = 2/STAGES = 3/'
  variant nored hopper-bwd-nored.patch ""
} 2>&1 | tee $OUT/ab_bwd128.log
python - $OUT/ab_bwd128.log <<'PY' > /tmp/verdict.txt
import re, sys
rows, name = {}, None
for line in open(sys.argv[1]):
    if line.startswith("== "):
        name = line.split()[1]
    m = re.search(r"(\d+\.\d+)x \(", line)
    if m and name:
        rows.setdefault(name, []).append(float(m.group(1)))
for k, v in rows.items():
    print(k, " ".join(f"{x:.2f}" for x in v), f"mean {sum(v) / len(v):.3f}")
gain = sum(rows["dqdb"]) / sum(rows["main"]) if rows.get("dqdb") and rows.get("main") else 0
print("dqdb/main", round(gain, 3))
PY
cat /tmp/verdict.txt | tee -a $OUT/ab_bwd128.log
if grep -q "dqdb/main 1.0[2-9]\|dqdb/main 1.[1-9]" /tmp/verdict.txt; then
  cd /tmp/var/dqdb && cp -r $R/tests $R/benchmarks $R/pyproject.toml .
  PYTHONPATH=/tmp/var/dqdb timeout 150 python -m pytest -q -m gpu tests/ops/test_hopper_bwd.py 2>&1 | tail -3 | tee $OUT/test_dqdb.log
  cd $R
fi
if [ "${PROFILE:-1}" = 1 ]; then
  timeout 150 ncu --clock-control none --set full --import-source yes -k regex:_bwd_hopper -c 1 -o $OUT/bwd128 \
    python benchmarks/hopper_bwd_speed.py --causal plain --seqlens 16384 --rounds 1 2>&1 | tail -3
  ncu -i $OUT/bwd128.ncu-rep --page details > $OUT/bwd128_details.txt 2>&1; tail -3 $OUT/bwd128_details.txt
  ncu -i $OUT/bwd128.ncu-rep --page source --csv --print-source sass > $OUT/bwd128_sass.csv 2>&1
  wc -l $OUT/bwd128_sass.csv
fi
