#!/usr/bin/env bash
# The whole test suite on a GPU machine (compiled Triton; CUDA tests included), as issue 12
# asks. Usage: bash bench/scripts/gpu_tests.sh OUT_DIR [WHEELS_DIR] [pytest args...]
# WHEELS_DIR: a folder of wheels for the test dependencies (the GPU image has no network).
set -u
out=${1:?out dir}; wheels=${2:-}; shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --find-links "$wheels" pytest pytest-xdist hypothesis \
    fastapi uvicorn httpx openai > "$out/pip.log" 2>&1
fi
python3 -c 'import torch, triton, transformers; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' > "$out/env.txt" 2>&1
workers=$(( $(nproc) * 3 / 4 ))
python3 -m pytest -q -o addopts="" -m "not full" -n "$workers" --dist loadfile -p no:cacheprovider -rfEs \
  --junitxml="$out/junit.xml" tests/ "$@" > "$out/tests.log" 2>&1
echo "pytest exit $?" >> "$out/tests.log"
tail -40 "$out/tests.log"
