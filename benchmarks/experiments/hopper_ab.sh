#!/usr/bin/env bash
# A/B of the Hopper kernels: main against patches of this folder (or a sed on one file), each variant on its own
# copy of hf_flash/ and in its own process, timed by benchmarks/hopper_{fwd,bwd}_speed.py (ratio to the portable
# kernel in the same process, so the variants' drift between processes cancels), then ab_summary.py.
#
#   SPEED=bwd bash benchmarks/experiments/hopper_ab.sh main some.patch          # D128 default cases below
#   SPEED=fwd CASES="--head-dim 64 --causal causal --seqlens 4096,12345" bash benchmarks/experiments/hopper_ab.sh \
#       main lead.patch 's3=s/^STAGES = 2/STAGES = 3/@hf_flash/ops/hopper_bwd.py'
#   WIN=some bash benchmarks/experiments/hopper_ab.sh main some.patch && pytest ...   # exit 0 only if "some" wins
#
# A variant is ``main``, ``NAME.patch`` (from this folder, named NAME) or ``NAME=SED@FILE``. CASES: the speed
# script's arguments, ``;`` between runs (``--rounds 3`` is added). Writes ``hopper_ab.log`` to $OUT (the device
# tool) or ./ab-out. A variant that prints no timed line (a crash, a timeout) is named by ab_summary.py and never
# wins: the call does not go on as if it had measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
out=${OUT:-$ROOT/ab-out}
mkdir -p "$out"
log=$out/hopper_ab.log
SPEED=${SPEED:-bwd}
CASES=${CASES:-"--head-dim 128 --causal both --seqlens 4096,16384;--head-dim 128 --heads 32 --kv-heads 8 --causal causal --seqlens 8192"}
RUN_LIMIT=${RUN_LIMIT:-100}  # seconds per speed-script run (compiles included)
scratch=$(mktemp -d)
: > "$log"
for spec in "$@"; do
  case $spec in
    main) name=main ;;
    *.patch) name=${spec%.patch} ;;
    *=*@*) name=${spec%%=*} ;;
    *) echo "!! variant '$spec': main, NAME.patch or NAME=SED@FILE" >&2; exit 2 ;;
  esac
  dir=$scratch/$name
  mkdir -p "$dir" && cp -r "$ROOT/hf_flash" "$dir/"
  case $spec in
    *.patch) (cd "$dir" && git apply --include='hf_flash/*' "$ROOT/benchmarks/experiments/$spec") ||
      { echo "!! $spec does not apply" >&2; echo "== $name" >> "$log"; continue; } ;;
    *=*@*) expr=${spec#*=}; sed -i "${expr%@*}" "$dir/${expr##*@}" ;;
  esac
  echo "== $name" | tee -a "$log"
  IFS=';' read -ra runs <<<"$CASES"
  for args in "${runs[@]}"; do
    # shellcheck disable=SC2086  # the case's arguments split on purpose
    timeout "$RUN_LIMIT" env PYTHONPATH="$dir" python "benchmarks/hopper_${SPEED}_speed.py" $args --rounds 3 2>&1 |
      grep "TFLOP/s" | tee -a "$log"
  done
done
rm -rf "$scratch"
if [ -n "${WIN:-}" ]; then
  python benchmarks/experiments/ab_summary.py "$log" --win "$WIN"
else
  python benchmarks/experiments/ab_summary.py "$log"
fi
