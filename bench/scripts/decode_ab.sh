#!/usr/bin/env bash
# Before/after on one GPU in one device call (issue 24: "the one-GPU decode step is unchanged
# within noise"): bench_decode of Qwen3-8B at 64 x 512 for the tree in BASE (installed to a
# target dir and put first on PYTHONPATH) and for this tree (editable), alternated A B A B.
# Usage: bash bench/scripts/decode_ab.sh OUT_DIR BASE_DIR [rounds]
set -u
out=${1:?out dir}; base=${2:?baseline tree}; rounds=${3:-2}
export NCCL_NVLS_ENABLE=0
mkdir -p "$out"
python3 -c 'import torch, triton, transformers; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' > "$out/env.txt" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/pip.log" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/adp-base "$base" >> "$out/pip.log" 2>&1
echo "pip exit $?" >> "$out/status.txt"
decode() {  # tag tree pythonpath
  local tag=$1 tree=$2 path=$3
  ( cd "$tree" && PYTHONPATH="$path" timeout 200 python3 bench/bench_decode.py --preset qwen3-8b \
      --world-size 1 --requests-per-rank 64 --prompt-len 512 --graph-sizes 1,2,4,8,16,32,64 \
      --no-check --out "$out/decode-$tag.json" > "$out/decode-$tag.log" 2>&1 )
  echo "decode $tag exit $? at $(date +%T)" >> "$out/status.txt"
  grep -h "step at\|mean_decode_step_ms\|step ms" "$out/decode-$tag.log" | tail -3 >> "$out/status.txt"
}
for round in $(seq 1 "$rounds"); do
  decode "before-$round" "$base" /tmp/adp-base
  decode "after-$round" "$PWD" ""
done
python3 - "$out" <<'PY' >> "$out/status.txt"
import json, sys, glob, os
for path in sorted(glob.glob(os.path.join(sys.argv[1], "decode-*.json"))):
    data = json.load(open(path))
    steps = [r.get("mean_decode_step_ms") or r.get("phases", [{}])[0].get("mean_decode_step_ms") for r in data["ranks"]]
    print(os.path.basename(path), "step ms", steps, "tok/s", round(data["total_decode_tokens_per_s"]))
PY
cat "$out/status.txt"
