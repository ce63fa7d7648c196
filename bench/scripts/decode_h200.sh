#!/usr/bin/env bash
# One GPU's decode figures (docs/benchmarks.md, "Decode against the HBM roofline"): the
# per-kernel profile of a step, then bench_decode at 64 x 512, 256 x 512 and 64 x 2048.
# Usage: bash bench/scripts/decode_h200.sh OUT_DIR [preset] [tag] [bench_decode options...]
set -u
out=${1:?out dir}; preset=${2:-qwen3-8b}; tag=${3:-h200x1}; shift $(( $# < 3 ? $# : 3 ))
export NCCL_NVLS_ENABLE=0
mkdir -p "$out"
python3 -c 'import torch, triton, transformers; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' > "$out/env.txt" 2>&1
timeout 240 python3 bench/profile_decode.py --preset "$preset" --batch 64 --prompt-len 512 --steps 60 \
  --out "$out/profile-decode-$preset-64x512.json" > "$out/profile-$preset.log" 2>&1
echo "profile exit $?" >> "$out/status.txt"
run() {  # requests prompt graph-sizes suffix [extra...]
  local requests=$1 prompt=$2 sizes=$3 suffix=$4; shift 4
  timeout 300 python3 bench/bench_decode.py --preset "$preset" --world-size 1 --requests-per-rank "$requests" \
    --prompt-len "$prompt" --graph-sizes "$sizes" --out "$out/decode-$preset-$tag-$suffix.json" "$@" \
    > "$out/decode-$preset-$suffix.log" 2>&1
  echo "decode $suffix exit $?" >> "$out/status.txt"
}
run 64 512 1,2,4,8,16,32,64 64 "$@"
[ -n "${ONLY_64:-}" ] && exit 0
run 256 512 1,2,4,8,16,32,64,128,256 256 "$@"
run 64 2048 1,2,4,8,16,32,64 64-p2048 "$@"
