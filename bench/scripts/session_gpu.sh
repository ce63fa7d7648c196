#!/usr/bin/env bash
# Everything one GPU session has to measure, in one device call, step by step under one deadline
# (a lent machine is released 30 s after a call, so each call pays a start: few, full calls).
# Every step is cut to the time left; a step that would get under 30 s is skipped and says so.
#
# Usage: [BASE=DIR] [WHEELS=DIR] bash bench/scripts/session_gpu.sh OUT_DIR BUDGET_S STEP...
# On the lent device, whose reply carries back only the first 8 files under $OUT: give a folder
# outside it and pack that, e.g. 'session_gpu.sh /tmp/run 570 ...; tar czf $OUT/run.tgz -C /tmp run'.
# Steps:
#   setup        versions, test wheels from $WHEELS (.wheels), this tree installed, the baseline
#                tree $BASE (.baseline) into /tmp/adp-base
#   tests        the GPU-only tests (compiled Triton, CUDA graphs, FP8 kernels)
#   ab           Qwen3-8B 64 x 512 bf16 decode: $BASE (before) then this tree (after); given
#                again, another round (ab-before-2, ...)
#   check        python bench/check_cost_model.py (predicted vs measured)
#   fp8-gemm     bench_fp8_gemm.py without the sweeps; fp8-gemm-sweep the decode kernel's sweep alone;
#                fp8-gemm-warps its 64-row sweep over 4 and 8 warps and 256-row weight tiles
#   fp8-8b-N fp8kv-8b-N fp8-32b-N fp8kv-32b-N bf16-8b-N bf16-32b-N (N requests: 64, 256)
#                FP8 (weights; fp8kv: and KV cache) or bf16 decode rows at N x 512;
#   fp8-32b-32layers-N bf16-32b-32layers-N  the same, Qwen3-32B's first 32 of 64 layers (bf16
#                fits one H100; the LM head weighs twice as much in the step, so the FP8/bf16
#                ratio is an upper bound on the whole model's)
#   fp8check-8b  Qwen3-8B-FP8 at 8 x 512 with the first-step check (logits vs transformers over
#                the dequantized weights); fp8check-8b-2layers: the same at its first 2 layers
#                (every kernel at the real widths, no depth to amplify rounding)
#   calibrate    adp calibrate on this GPU, folded into its profile (OUT/<gpu>.json), then
#                Qwen3-8B decode at 64 and 256 x 512 against it (calibrate-only: without them);
#                host-64: in-step host work
set -u
out=${1:?out dir}; budget=${2:?budget seconds}; shift 2
mkdir -p "$out"; out=$(cd "$out" && pwd)
export NCCL_NVLS_ENABLE=0
base=$(cd "${BASE:-.baseline}" 2>/dev/null && pwd); wheels=${WHEELS:-.wheels}; ab_round=0
start=$(date +%s); deadline=$(( start + budget ))
gpu=$(python3 -c 'import torch; n = torch.cuda.get_device_name(0); print("h200" if "H200" in n else "h100" if "H100" in n else "gpu")' 2>/dev/null)

log() { echo "$*  [t=$(( $(date +%s) - start ))s]" | tee -a "$out/status.txt"; }
step() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) - 5 ))
  if (( left < 30 )); then log "$name skipped: ${left}s left"; return; fi
  (( limit > left )) && limit=$left
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  log "$name exit $? (limit ${limit}s)"
}
decode() {  # name requests extra-flags...
  local name=$1 requests=$2; shift 2
  local sizes=1,2,4,8,16,32,64; (( requests > 64 )) && sizes=$sizes,128,256
  step "$name" 200 python3 bench/bench_decode.py --world-size 1 --requests-per-rank "$requests" \
    --prompt-len 512 --graph-sizes "$sizes" --no-check --out "$out/$name.json" "$@"
}

for what in "$@"; do
  case $what in
    setup)
      python3 -c 'import torch, triton, transformers; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__)' > "$out/env.txt" 2>&1
      nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv >> "$out/env.txt" 2>&1
      python3 -m pip install -q --no-index --find-links "$wheels" pytest pytest-xdist hypothesis httpx > "$out/pip.log" 2>&1
      python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$out/pip.log" 2>&1
      [ -n "$base" ] && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/adp-base "$base" >> "$out/pip.log" 2>&1
      log "setup done on $(head -1 "$out/env.txt")" ;;
    tests)
      step tests 150 python3 -m pytest -q -o addopts="" -m "not full" -n 8 -p no:cacheprovider -rfEs \
        tests/test_engine_cuda.py tests/test_fp8_kernels.py tests/test_fused_cache_write.py \
        tests/test_sample_kernel.py
      tail -3 "$out/tests.log" >> "$out/status.txt" ;;
    ab)
      ab_round=$(( ab_round + 1 )); suffix=$([ "$ab_round" -gt 1 ] && echo "-$ab_round")
      ( cd "$base" && export PYTHONPATH=/tmp/adp-base && step "ab-before$suffix" 110 \
          python3 bench/bench_decode.py --preset qwen3-8b --world-size 1 --requests-per-rank 64 \
          --prompt-len 512 --graph-sizes 1,2,4,8,16,32,64 --no-check --out "$out/ab-before$suffix.json" )
      decode "ab-after$suffix" 64 --preset qwen3-8b ;;
    check) python3 bench/check_cost_model.py > "$out/check.txt" 2>&1; log "check: $(tail -1 "$out/check.txt")" ;;
    fp8-gemm) step fp8-gemm 150 python3 bench/bench_fp8_gemm.py --no-sweep --out "$out/fp8-gemm-$gpu.json" ;;
    fp8-gemm-sweep) step fp8-gemm-sweep 240 python3 bench/bench_fp8_gemm.py --sweep-only --out "$out/fp8-gemm-sweep-$gpu.json" ;;
    fp8-gemm-warps) step fp8-gemm-warps 200 python3 bench/bench_fp8_gemm.py --sweep-only --sweep-rows 64 \
        --sweep-block-n 64,128,256 --sweep-stages 3,4 --sweep-splits 0,1,4 --sweep-warps 4,8 \
        --out "$out/fp8-gemm-warps-$gpu.json" ;;
    fp8-8b-*) decode "decode-qwen3-8b-fp8-$gpu-${what##*-}" "${what##*-}" --preset qwen3-8b --quantize fp8 --quantize-dir /tmp/fp8-8b ;;
    fp8kv-8b-*) decode "decode-qwen3-8b-fp8-fp8kv-$gpu-${what##*-}" "${what##*-}" --preset qwen3-8b --quantize fp8 --quantize-dir /tmp/fp8-8b --kv-cache-dtype fp8 ;;
    fp8-32b-32layers-*) decode "decode-qwen3-32b-32layers-fp8-$gpu-${what##*-}" "${what##*-}" --preset qwen3-32b --layers 32 --quantize fp8 --quantize-dir /tmp/fp8-32b-32layers ;;
    bf16-32b-32layers-*) decode "decode-qwen3-32b-32layers-$gpu-${what##*-}" "${what##*-}" --preset qwen3-32b --layers 32 ;;
    fp8kv-32b-*) decode "decode-qwen3-32b-fp8-fp8kv-$gpu-${what##*-}" "${what##*-}" --preset qwen3-32b --quantize fp8 --quantize-dir /tmp/fp8-32b --kv-cache-dtype fp8 ;;
    fp8-32b-*) decode "decode-qwen3-32b-fp8-$gpu-${what##*-}" "${what##*-}" --preset qwen3-32b --quantize fp8 --quantize-dir /tmp/fp8-32b ;;
    fp8check-8b-2layers) step fp8check-8b-2layers 120 python3 bench/bench_decode.py --world-size 1 \
        --requests-per-rank 8 --prompt-len 512 --graph-sizes 1,2,4,8 --preset qwen3-8b --quantize fp8 \
        --layers 2 --quantize-dir /tmp/fp8-8b-2layers --out "$out/first-step-qwen3-8b-fp8-2layers-$gpu.json" ;;
    fp8check-8b) step fp8check-8b 200 python3 bench/bench_decode.py --world-size 1 --requests-per-rank 8 \
        --prompt-len 512 --graph-sizes 1,2,4,8 --preset qwen3-8b --quantize fp8 --quantize-dir /tmp/fp8-8b \
        --out "$out/first-step-qwen3-8b-fp8-$gpu.json" ;;
    bf16-8b-*) decode "decode-qwen3-8b-$gpu-${what##*-}" "${what##*-}" --preset qwen3-8b ;;
    bf16-32b-*) decode "decode-qwen3-32b-$gpu-${what##*-}" "${what##*-}" --preset qwen3-32b ;;
    calibrate|calibrate-only)
      step calibrate 240 python3 -m adp_pass.cli calibrate --gpus 1 --out "$out/calibrate-$gpu-1gpu.json"
      python3 -m adp_pass.profiles fold "$gpu" "$out/calibrate-$gpu-1gpu.json" "$out/$gpu.json" >> "$out/status.txt" 2>&1
      [ "$what" = calibrate-only ] && continue
      for requests in 64 256; do
        decode "decode-qwen3-8b-$gpu-$requests" "$requests" --preset qwen3-8b --calibration "$out/$gpu.json"
      done ;;
    host-*) step "profile-decode-$what" 150 python3 bench/profile_decode.py --preset qwen3-8b \
        --batch "${what##*-}" --prompt-len 512 --steps 40 \
        --out "$out/profile-decode-qwen3-8b-$gpu-${what##*-}x512.json" ;;
    *) log "unknown step $what" ;;
  esac
done
grep -h "roofline\|predicted\|step ms\|decode step\|prefill\|first step" "$out"/*.log 2>/dev/null | tail -30 >> "$out/status.txt"
cat "$out/status.txt"
