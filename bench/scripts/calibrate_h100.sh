#!/usr/bin/env bash
# The H100 profile's measurement (issue #26): adp calibrate on one H100 (copy, GEMM bf16 / fp8 on
# the reference and the TP shard shapes, attention, kernel launch), folded into the packaged
# profile, then Qwen3-8B decode on the same H100 against the profile's prediction.
# Usage: bash bench/scripts/calibrate_h100.sh OUT_DIR        (then: cp OUT_DIR/h100.json adp_pass/data/)
#        HOST=1 bash bench/scripts/calibrate_h100.sh OUT_DIR (also the in-step host work per request)
set -u
out=${1:?out dir}
export NCCL_NVLS_ENABLE=0
mkdir -p "$out"
# the package from this tree (no network there: no dependencies fetched)
python3 -c 'import adp_pass.runtime, adp_pass.profiles' 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/pip.log" 2>&1
python3 -c 'import torch, triton; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)' > "$out/env.txt" 2>&1
timeout 240 python3 -m adp_pass.cli calibrate --gpus 1 --out "$out/calibrate-h100-1gpu.json" > "$out/calibrate.log" 2>&1
echo "calibrate exit $?" >> "$out/status.txt"
python3 -m adp_pass.profiles fold h100 "$out/calibrate-h100-1gpu.json" "$out/h100.json" >> "$out/status.txt" 2>&1
echo "fold exit $?" >> "$out/status.txt"
for requests in 64 256; do
  sizes=1,2,4,8,16,32,64; [ "$requests" = 256 ] && sizes=$sizes,128,256
  timeout 200 python3 bench/bench_decode.py --preset qwen3-8b --world-size 1 --requests-per-rank "$requests" \
    --prompt-len 512 --graph-sizes "$sizes" --no-check --calibration "$out/h100.json" \
    --out "$out/decode-qwen3-8b-h100x1-$requests.json" > "$out/decode-$requests.log" 2>&1
  echo "decode $requests exit $?" >> "$out/status.txt"
done
if [ -n "${HOST:-}" ]; then  # host work in step: engine step in step - graph replay, by rows
  for batch in 16 64 256; do
    timeout 150 python3 bench/profile_decode.py --preset qwen3-8b --batch "$batch" --prompt-len 512 \
      --steps 40 --out "$out/profile-decode-qwen3-8b-h100-${batch}x512.json" > "$out/profile-$batch.log" 2>&1
    echo "profile $batch exit $?" >> "$out/status.txt"
  done
fi
python3 bench/check_cost_model.py > "$out/check.txt" 2>&1
grep -h "roofline\|predicted" "$out"/decode-*.log >> "$out/status.txt" 2>/dev/null
exit 0
