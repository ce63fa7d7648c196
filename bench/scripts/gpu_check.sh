#!/usr/bin/env bash
# One short device call that checks a change on one GPU (issue 24's acceptance): the GPU-only
# tests, then Qwen3-8B 64 x 512 decode for the tree in BASE and for this tree, alternated.
# Usage: bash bench/scripts/gpu_check.sh OUT_DIR BASE_DIR WHEELS_DIR [rounds]
set -u
rounds=${4:-1}
BASE=${2:?baseline tree} WHEELS=${3:?wheels dir} exec bash "$(dirname "$0")/session_gpu.sh" \
  "${1:?out dir}" 560 setup tests $(printf 'ab %.0s' $(seq 1 "$rounds"))
