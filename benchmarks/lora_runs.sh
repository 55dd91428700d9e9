#!/usr/bin/env bash
# The LoRA fine-tune measurements of the README (length, loss, variable-length data, gpt-oss) in one device
# call: PARTS picks which, each writes under $OUT/lora/<part>, and a table of every run ends the output.
#
#   PARTS="loss sweep1b" bash benchmarks/lora_runs.sh
#
# Parts (H100 80GB, bf16, LoRA r16 on all projections, gradient checkpointing, random-token documents):
#   loss      Llama-3.2-1B, one 32k sequence and one 8k sequence: --loss plain / chunked / liger
#   sweep1b   1B: the longest context of hf_flash (16k doubling to 256k); sweep1b:eager,sdpa:8192 names the
#             backends and the first length
#   sweep8b   Llama-3.1-8B: hf_flash without offload (64k up to 128k), then with --offload-activations (128k)
#   suite     tests/run_gpu_all.sh started in the background (other parts share the GPU with it: their peak
#             memory holds, their speed does not); wait: wait for it and print its summary
#   varlen    1B: padded (micro-batch 4) and packed (16k rows) over lognormal:600:1.0:100, sdpa and hf_flash;
#             then hf_flash padded with HF_FLASH_PADDING_FREE=0 (PROFILE=1: profile.md of 5 padded steps)
#   gptoss    gpt-oss-20b shape cut to 4 layers: one 8k and one 32k sequence, hf_flash / eager / flex_attention
#   long      1B: one 8k and one 32k sequence, sdpa (cuDNN there) and hf_flash, LONG_STEPS steps (default 6, the
#             first 2 not timed): the single-sequence LoRA step of issue 18
#   longdocs  1B: long documents (lognormal:12000:0.4:24) packed into 32k rows, sdpa and hf_flash, then hf_flash
#             with the Hopper kernels off: what they give a packed long-context step
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}/lora
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # liger-kernel (and whatever else was carried) as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# A Triton cache carried from an earlier call (.tcache/triton_cache.tgz) saves the compiles of unchanged kernels
cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
mkdir -p "$cache"
if [ -f .tcache/triton_cache.tgz ]; then
    tar -xzf .tcache/triton_cache.tgz -C "$cache" && echo "carried Triton cache: $(ls "$cache" | wc -l) entries"
fi
CAP=(${GPU_MEMORY_GIB:+--gpu-memory-gib $GPU_MEMORY_GIB})  # an 80 GB card on a larger one: GPU_MEMORY_GIB=79
ONE_B=(--model-preset llama-3.2-1b --gradient-checkpointing --save-steps 0 --no-save-adapter "${CAP[@]}")
FT=(python3 scripts/finetune_lora.py)
CMP=(python3 scripts/compare_backends.py)

one() {  # one NAME SEQ_LEN STEPS ARGS...: one fine-tune on STEPS random sequences of SEQ_LEN tokens
    local name=$1 len=$2 steps=$3
    shift 3
    "${FT[@]}" "${ONE_B[@]}" --seq-len "$len" --lengths "lognormal:$len:0:$steps" --max-steps "$steps" \
        --output-dir "$out/runs/$name" "$@" >"$out/runs/$name.log" 2>&1
    echo "$name: exit $? $(tail -n 1 "$out/runs/$name.log" | cut -c1-200)"
}
mkdir -p "$out/runs"
report() {  # the archive of every run so far (a call cut short still returns it) and a table of them
    tar -czf "${OUT:-/tmp}/lora.tar.gz" -C "$out" --exclude='*.safetensors' --exclude='checkpoint-*' . 2>/dev/null
    python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for summary in sorted(Path(sys.argv[1]).rglob("summary.json")):
    s = json.loads(summary.read_text())
    rows.append((str(summary.parent.relative_to(sys.argv[1])), s["status"], s.get("median_tokens_per_s"),
                 s.get("real_tokens_per_s"), s.get("peak_mem_gib"), s.get("loss_per_token") or s.get("final_loss")))
print(f"{'run':58} {'status':7} {'tok/s':>9} {'real tok/s':>10} {'peak GiB':>8} {'loss':>10}")
for name, status, speed, real, peak, loss in rows:
    f = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"{name[:58]:58} {status:7} {f(speed, ',.0f'):>9} {f(real, ',.0f'):>10} {f(peak, '.2f'):>8} {f(loss, '.5f'):>10}")
EOF
}

for part in ${PARTS:-loss}; do
    echo "== $part ($(date +%T))"
    case $part in
    loss)
        for loss in plain chunked liger; do one "L32k-$loss" 32768 3 --loss "$loss" --attn hf_flash; done
        for loss in plain chunked liger; do one "L8k-$loss" 8192 5 --loss "$loss" --attn hf_flash --warmup-measure-steps 2; done
        ;;
    sweep1b*)  # sweep1b[:BACKENDS[:START]]
        IFS=: read -r _ backends start <<<"$part"
        backends=${backends:-${SWEEP_BACKENDS:-hf_flash}}
        "${CMP[@]}" "${ONE_B[@]}" --find-max-context --backends "$backends" \
            --context-start "${start:-${SWEEP_START:-16384}}" --context-limit "${SWEEP_LIMIT:-262144}" --max-steps 1 \
            --warmup-measure-steps 0 --max-position-embeddings 1048576 --output-dir "$out/sweep1b-${backends//,/-}" \
            --timeout 400 | grep -v "^\s*$" | tail -n 30
        ;;
    sweep8b)  # without offload from SWEEP8_START (65536), then with offload from SWEEP8_OFFLOAD_START (131072)
        for offload in no yes; do
            extra=()
            start=${SWEEP8_START:-65536}
            if [ "$offload" = yes ]; then extra=(--offload-activations); start=${SWEEP8_OFFLOAD_START:-131072}; fi
            "${CMP[@]}" --model-preset llama-3.1-8b --gradient-checkpointing --save-steps 0 --no-save-adapter "${CAP[@]}" \
                --find-max-context --backends hf_flash --context-start "$start" \
                --context-limit "${SWEEP8_LIMIT:-131072}" --max-steps 1 --warmup-measure-steps 0 \
                --max-position-embeddings 1048576 --output-dir "$out/sweep8b-offload-$offload" --timeout 400 \
                "${extra[@]}" | tail -n 12
        done
        ;;
    suite)  # the GPU suite in the background (logs under $OUT/gpu_all); part "wait" waits for it
        LIMIT=${SUITE_LIMIT:-480} bash tests/run_gpu_all.sh >"$out/gpu_all_summary.txt" 2>&1 &
        suite_pid=$!
        ;;
    wait)
        [ -n "${suite_pid:-}" ] && wait "$suite_pid"; echo "GPU suite: exit $?"; cat "$out/gpu_all_summary.txt"
        tar -czf "${OUT:-/tmp}/gpu_all.tgz" -C "${OUT:-/tmp}" gpu_all 2>/dev/null
        ;;
    varlen)
        # padded (micro-batch 4) and packed (16k rows) over the same long-tailed documents, sdpa and hf_flash; then
        # hf_flash padded with attention alone unpadding (HF_FLASH_PADDING_FREE=0: the projections and MLP run on
        # the pads), what packing the whole decoder buys. PROFILE=1: five second-pass padded steps under
        # torch.profiler (profile.md in each padded row; the profiler's host time slows those steps)
        V=(--lengths lognormal:600:1.0:100 --max-len 8192 --batch-size 4 ${PROFILE:+--profile-steps 30:34})
        HF_FLASH_STRICT=1 "${CMP[@]}" "${ONE_B[@]}" --backends sdpa,hf_flash --layout padded,packed "${V[@]}" \
            --output-dir "$out/varlen" | tail -n 8
        HF_FLASH_PADDING_FREE=0 "${CMP[@]}" "${ONE_B[@]}" --backends hf_flash --layout padded "${V[@]}" \
            --output-dir "$out/varlen-per-layer" | tail -n 3
        ;;
    longdocs)
        # long documents packed into 32k rows (about 13k tokens on average, cut at 32k): the packed sequences'
        # mean passes the Hopper kernels' varlen bounds (D64 causal: backward 8192, forward 3072), so hf_flash's
        # packed step runs them; then the same with both Hopper kernels off (the portable varlen kernels): what
        # they give the whole step. sdpa packed for reference.
        D=(--lengths lognormal:12000:0.4:24 --max-len 32768 --pack-len 32768 --layout packed)
        HF_FLASH_STRICT=1 "${CMP[@]}" "${ONE_B[@]}" --backends sdpa,hf_flash "${D[@]}" \
            --output-dir "$out/longdocs" | tail -n 4
        HF_FLASH_HOPPER_BWD=0 HF_FLASH_HOPPER_FWD=0 HF_FLASH_STRICT=1 "${CMP[@]}" "${ONE_B[@]}" --backends hf_flash \
            "${D[@]}" --output-dir "$out/longdocs-portable" | tail -n 3
        ;;
    gptoss)
        "${CMP[@]}" --model-preset gpt-oss-20b-4l --gradient-checkpointing --save-steps 0 --no-save-adapter "${CAP[@]}" \
            --backends hf_flash,eager,flex_attention --layout blocks --seq-lens 8192,32768 --max-steps 3 \
            --output-dir "$out/gptoss" | tail -n 10
        ;;
    long)
        HF_FLASH_STRICT=1 "${CMP[@]}" "${ONE_B[@]}" --backends sdpa,hf_flash --layout blocks --seq-lens 8192,32768 \
            --max-steps "${LONG_STEPS:-6}" --warmup-measure-steps 2 --output-dir "$out/long" | tail -n 8
        ;;
    *) echo "unknown part $part" ;;
    esac
    report >"$out/table.txt"
done
tar -czf "${OUT:-/tmp}/triton_cache.tgz" -C "$cache" . 2>/dev/null
cat "$out/table.txt"
