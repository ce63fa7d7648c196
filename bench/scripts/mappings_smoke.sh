#!/usr/bin/env bash
# Every mapping on real GPUs: NCCL parity (adp verify, lowered) and serving with CUDA graphs
# (adp run, bf16), preset small. Usage: bash bench/scripts/mappings_smoke.sh OUT_DIR [GPUS]
set -u
out=${1:?out dir}; gpus=${2:-4}; only=${3:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
adp() { python3 -c 'import sys; from adp_pass.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} > "$out/env.txt" 2>&1
if [ "$gpus" = 4 ]; then
  mappings="tp=4,attn_dp=0:- tp=4,attn_dp=1:0,1,3,2 tp=4,attn_dp=1,mlp_tp=4:2,0,3,1 tp=4,attn_dp=1,mlp_tp=2:0,1,3,2 tp=4,attn_dp=1,attn_tp=2:5,1 tp=4,attn_dp=1,attn_tp=2,mlp_tp=4:1,5"
else
  mappings="tp=2,attn_dp=0:- tp=2,attn_dp=1:1,5 tp=2,attn_dp=1,mlp_tp=2:0,6"
fi
for item in $mappings; do
  m=${item%%:*}; s=${item##*:}
  [ -n "$only" ] && [ "$m" != "$only" ] && continue
  splits=(); [ "$s" != "-" ] && splits=(--splits "$s")
  echo "=== verify $m ${s}" >> "$out/verify.log"
  timeout 240 adp verify --preset small --world-size "$gpus" --mapping "$m" --batch 6 --seq 16 "${splits[@]}" --lower >> "$out/verify.log" 2>&1
  echo "exit $?" >> "$out/verify.log"
  echo "=== run $m" >> "$out/run.log"
  timeout -s INT 200 adp run --preset small --world-size "$gpus" --mapping "$m" --dtype bfloat16 --requests 24 --prompt-len 32 --new-tokens 32 >> "$out/run.log" 2>&1
  echo "exit $?" >> "$out/run.log"
done
mkdir -p "$out/logs"; for f in /tmp/adp-logs/run-*.log; do [ -f "$f" ] && cp "$f" "$out/logs/"; done
grep -E "^===|max \||PASS|FAIL|exit|total decode|Error|error" "$out/verify.log" "$out/run.log" | tail -80
