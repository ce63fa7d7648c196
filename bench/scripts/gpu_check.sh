#!/usr/bin/env bash
# One short device call that checks a change on one GPU (issue 24's acceptance, within a small
# device budget): bench_decode of Qwen3-8B at 64 x 512 for the tree in BASE and for this tree,
# alternated, after the GPU-specific tests (compiled Triton, CUDA graphs, FP8 kernels).
# Usage: bash bench/scripts/gpu_check.sh OUT_DIR BASE_DIR WHEELS_DIR [rounds]
set -u
out=${1:?out dir}; base=${2:?baseline tree}; wheels=${3:?wheels dir}; rounds=${4:-1}
export NCCL_NVLS_ENABLE=0
mkdir -p "$out"
start=$(date +%s)
python3 -c 'import torch, triton, transformers; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' > "$out/env.txt" 2>&1
python3 -m pip install -q --no-index --find-links "$wheels" pytest pytest-xdist hypothesis httpx > "$out/pip.log" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$out/pip.log" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/adp-base "$base" >> "$out/pip.log" 2>&1
decode() {  # tag tree pythonpath
  local tag=$1 tree=$2 path=$3
  ( cd "$tree" && PYTHONPATH="$path" timeout 110 python3 bench/bench_decode.py --preset qwen3-8b \
      --world-size 1 --requests-per-rank 64 --prompt-len 512 --graph-sizes 1,2,4,8,16,32,64 \
      --no-check --out "$out/decode-$tag.json" > "$out/decode-$tag.log" 2>&1 )
  echo "decode $tag exit $? at $(( $(date +%s) - start )) s" >> "$out/status.txt"
}
timeout 120 python3 -m pytest -q -o addopts="" -m "not full" -n 8 -p no:cacheprovider -rfEs \
  tests/test_engine_cuda.py tests/test_fp8_kernels.py tests/test_fused_cache_write.py \
  tests/test_sample_kernel.py > "$out/tests.log" 2>&1
echo "pytest exit $? at $(( $(date +%s) - start )) s" >> "$out/status.txt"
tail -3 "$out/tests.log" >> "$out/status.txt"
for round in $(seq 1 "$rounds"); do
  decode "before-$round" "$base" /tmp/adp-base
  decode "after-$round" "$PWD" ""
done
python3 - "$out" <<'PY' >> "$out/status.txt" 2>&1
import json, sys, glob, os
for path in sorted(glob.glob(os.path.join(sys.argv[1], "decode-*.json"))):
    data = json.load(open(path))
    steps = [r.get("mean_decode_step_ms") or r.get("phases", [{}])[0].get("mean_decode_step_ms") for r in data["ranks"]]
    print(os.path.basename(path), "step ms", steps, "tok/s", round(data["total_decode_tokens_per_s"]))
PY
cat "$out/status.txt"
