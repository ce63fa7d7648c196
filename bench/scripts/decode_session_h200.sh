#!/usr/bin/env bash
# One GPU session's decode figures after a runtime change: the step profile at 64 x 512, the
# kernels against torch.compile, decode_mm against cuBLAS at 16 rows, then bench_decode at
# 256 x 512 and 64 x 2048 and the mixed workload (PART: profiles, serving, or both by default:
# one part fits a 10-minute device call). Usage: bash bench/scripts/decode_session_h200.sh OUT [PART]
set -u
out=${1:?out dir}; part=${2:-both}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
status() { echo "$1 exit $2 at $(date +%T)" >> "$out/status.txt"; }
profile() {  # name args...
  local name=$1; shift
  timeout 150 python3 bench/profile_decode.py --preset qwen3-8b --prompt-len 512 --steps 40 \
    --out "$out/profile-decode-qwen3-8b-$name.json" "$@" > "$out/profile-$name.log" 2>&1
  status "profile $name" $?
}
if [ "$part" != serving ]; then
profile 64x512 --batch 64
timeout 200 python3 bench/bench_kernels.py --graph-max-tokens 16384 --out "$out/kernels-h200.json" \
  > "$out/kernels.log" 2>&1
status kernels $?
profile 16x512 --batch 16
profile 16x512-cublas --batch 16 --no-decode-mm
fi
[ "$part" = profiles ] && { cat "$out/status.txt"; exit 0; }
decode() {  # requests prompt sizes suffix
  timeout 200 python3 bench/bench_decode.py --preset qwen3-8b --world-size 1 --requests-per-rank "$1" \
    --prompt-len "$2" --graph-sizes "$3" --out "$out/decode-qwen3-8b-h200x1-$4.json" \
    > "$out/decode-$4.log" 2>&1
  status "decode $4" $?
}
decode 256 512 1,2,4,8,16,32,64,128,256 256
decode 64 2048 1,2,4,8,16,32,64 64-p2048
timeout 200 python3 bench/bench_mixed.py --requests 32 --rate 16 --modes packed \
  --out "$out/mixed-qwen3-8b-h200.json" > "$out/mixed.log" 2>&1
status mixed $?
cat "$out/status.txt"
