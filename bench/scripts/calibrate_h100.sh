#!/usr/bin/env bash
# The H100 profile's measurement (issue #26): adp calibrate on one H100 (copy, GEMM bf16 / fp8 on
# the reference and the TP shard shapes, attention, kernel launch), folded into the packaged
# profile, then Qwen3-8B decode on the same H100 against the profile's prediction.
# Usage: bash bench/scripts/calibrate_h100.sh OUT_DIR        (then: cp OUT_DIR/h100.json adp_pass/data/)
#        HOST=1 bash bench/scripts/calibrate_h100.sh OUT_DIR (also the in-step host work per request)
set -u
exec bash "$(dirname "$0")/session_gpu.sh" "${1:?out dir}" 580 setup calibrate \
  ${HOST:+host-16 host-64 host-256} check
