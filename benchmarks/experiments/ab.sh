#!/usr/bin/env bash
# A/B of the kernel experiments kept as patches in this folder against main's kernels, in one device call
# (the timings of different calls drift by about +-3%, so every variant is measured next to main).
#
#   bash benchmarks/experiments/ab.sh                  # writes to $OUT (device tool) or ./ab-out
#   SEQLENS="4096" HEAD_DIMS="128" bash benchmarks/experiments/ab.sh
#   SWEEP_SHORT=1 bash benchmarks/experiments/ab.sh    # also sweep the backward tiles at L = 1k (D128 causal)
#   MATCH="delta" bash benchmarks/experiments/ab.sh    # only the variants whose name matches (and main)
#   OVERHEAD=0 bash benchmarks/experiments/ab.sh       # without the launch-overhead profile
#   KERNELS=fwd bash benchmarks/experiments/ab.sh      # time the forward alone (forward-only patches)
#   VARLEN="--head-dim 64 --heads 32 --kv-heads 8" bash benchmarks/experiments/ab.sh   # also varlen_split.py
#
# Each variant is main's hf_flash/ with one patch applied, in a scratch copy (the checkout is not
# touched), optionally with environment switches that the patch reads. For every variant and length it
# prints kernel_stats.py's table-tile TFLOP/s (forward; whole backward) and the compiled kernels'
# registers and spills; main is measured first and again at the end, to show the drift within the call.
# Before the timings: launch_overhead.py with a host profile of each way of calling (L = 1k).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
out=${OUT:-$ROOT/ab-out}
mkdir -p "$out"
scratch=$(mktemp -d)
SEQLENS=${SEQLENS:-"4096 16384"}
HEAD_DIMS=${HEAD_DIMS:-"64,128"}
RUN_LIMIT=${RUN_LIMIT:-150}  # seconds per python run (compile included)
KERNELS=${KERNELS:-fwd,bwd}  # what kernel_stats.py times: fwd, bwd or both
KV_HEADS=${KV_HEADS:-0}  # GQA: K/V heads of the timed shapes (0: MHA); KV_HEADS=8 HEAD_DIMS=64 is Llama-3.2-1B's

# name | patch file (empty: main) | environment for the run
VARIANTS=(
  "main||"
  # lengths, max_seqlen and the LSE strides specialized again (Triton's == 1 / % 16 classes), as before
  # common.UNSPECIALIZED: what keeping them out of the specialization (no recompile per new length) costs.
  # Time with SEQLENS="1024 4096 16384" and VARLEN=... (the varlen layouts are where new lengths come from)
  "specialize-lengths|specialize-lengths.patch|"
  # A patch that no longer applies to main leaves this folder for the branch experiments-archive, e.g.
  # segment-loop.patch (main now does the same); one that lost leaves it too, its commit named in the LOG
  # (fwd-overlap-d128.patch / fwd-overlap-all.patch: `git show 804544b:benchmarks/experiments/NAME`;
  # varlen-d64-dkdv64.patch, 7ca20bc, lost 1-10% in the varlen dK/dV kernel: LOG, eleventh session),
  # warp-specialized.patch (hangs on Triton 3.6: benchmarks/results/LOG.md, 2026-11-29 third session; for a
  # newer Triton, first `python benchmarks/experiments/ws_gemm_probe.py 128 128 64 3 ws`, then rebase it).
)

package_root() {  # the folder to put on PYTHONPATH for a variant's hf_flash
  local patch=$1
  if [ -z "$patch" ]; then echo "$ROOT"; return; fi
  local dir=$scratch/${patch%.patch}
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir" && cp -r "$ROOT/hf_flash" "$dir/" &&
      (cd "$dir" && git apply --include='hf_flash/*' "$ROOT/benchmarks/experiments/$patch") ||
      { echo "!! $patch does not apply to this checkout" >&2; return 1; }
  fi
  echo "$dir"
}

in_variant() {  # variant line, script (from the checkout's root), its arguments: run it on the variant's hf_flash
  local name patch envs root
  IFS='|' read -r name patch envs <<<"$1"
  root=$(package_root "$patch") || return
  # shellcheck disable=SC2086  # envs is a list of NAME=value words
  env PYTHONPATH="$root" $envs timeout "$RUN_LIMIT" python "$ROOT/$2" "${@:3}" 2>&1
}

stats() {  # variant line, seqlen, head dims[, "check": first run agree.py (is the variant still right?)]
  local name root
  name=${1%%|*}
  root=$(package_root "$(cut -d'|' -f2 <<<"$1")") || return
  echo "=== $name, L=$2 (hf_flash from $root)"
  if [ -n "${4:-}" ]; then
    in_variant "$1" benchmarks/experiments/agree.py | tail -6
  fi
  in_variant "$1" benchmarks/kernel_stats.py --head-dims "$3" --seqlen "$2" --kv-heads "$KV_HEADS" \
    --kernels "$KERNELS" |
    grep -v "^  _bwd_delta"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "!! $name: no result within ${RUN_LIMIT}s (a hung kernel?)"
}

nvidia-smi -L 2>/dev/null
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
if [ "${OVERHEAD:-1}" = 1 ]; then  # OVERHEAD=0 skips it (up to 3 minutes of a 10-minute call)
  PYTHONPATH=$ROOT timeout 180 python benchmarks/launch_overhead.py --profile 14 >"$out/overhead.log" 2>&1
  grep "us/call" "$out/overhead.log"
fi
MATCH=${MATCH:-.}
selected=()
for variant in "${VARIANTS[@]}"; do
  [[ $variant == main* || ${variant%%|*} =~ $MATCH ]] && selected+=("$variant")
done
for variant in "${selected[@]}"; do  # the scratch copies, before anything runs in parallel
  IFS='|' read -r _ patch _ <<<"$variant"
  package_root "$patch" >/dev/null || exit 1
done
dims_for() {  # long sequences: the D128 rows are the ones below the targets
  if [ "$1" -gt 8192 ]; then echo 128; else echo "$HEAD_DIMS"; fi
}
first=${SEQLENS%% *}
# compile everything first, all variants at once (16 CPU cores; Triton's disk cache keeps the results), so
# that the timed runs below, one at a time, only time; agree.py's kernels (the first length's check) too
for seqlen in $SEQLENS; do
  for variant in "${selected[@]}"; do
    stats "$variant" "$seqlen" "$(dims_for "$seqlen")" "$([ "$seqlen" = "$first" ] && echo check)" >/dev/null 2>&1 &
  done
done
wait
for seqlen in $SEQLENS; do
  for variant in "${selected[@]}"; do
    stats "$variant" "$seqlen" "$(dims_for "$seqlen")" "$([ "$seqlen" = "$first" ] && echo check)"
  done
done | tee "$out/ab.log"
stats "${VARIANTS[0]}" "$first" "$HEAD_DIMS" | grep -E "^(===|D)" | sed 's/^===/=== again:/' | tee -a "$out/ab.log"
if [ -n "${VARLEN:-}" ]; then
  # VARLEN="--head-dim 64 --heads 32 --kv-heads 8": varlen_split.py per variant (the packed and mixed-length
  # layouts, next to kernel_stats' dense lengths)
  for variant in "${selected[@]}" "${VARIANTS[0]}"; do
    echo "=== varlen_split: ${variant%%|*}"
    # shellcheck disable=SC2086  # VARLEN is a list of words
    in_variant "$variant" benchmarks/varlen_split.py $VARLEN | grep -v "^NVIDIA\|^$"
  done | tee "$out/ab_varlen.log"
fi
if [ "${SWEEP_SHORT:-0}" = 1 ]; then
  # the D128 causal L = 1k backward runs at half the efficiency of the non-causal one (short programs, one
  # 8-warp program per SM): time every dK/dV and dQ candidate there, compiling in parallel first
  sweep=(python benchmarks/sweep_tiles.py --head-dims 128 --seqlen 1024 --causal yes --kernels dkdv,dq --tma on)
  for i in 0 1 2 3; do PYTHONPATH=$ROOT "${sweep[@]}" --shard "$i/4" --compile-only >/dev/null 2>&1 & done
  wait
  PYTHONPATH=$ROOT "${sweep[@]}" --top 6 2>&1 | tee "$out/sweep_short.log"
fi
rm -rf "$scratch"
