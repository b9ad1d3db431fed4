#!/usr/bin/env bash
# Every GPU measurement of the project in one run of at most 8 minutes on one CUDA GPU, appended as one dated
# block to bench/RESULTS.md (machine, GPU, versions; one line per result, part by part). Offline: random
# weights at the real Llama-2 shapes, nothing downloaded, nothing beyond requirements.txt.
#
#   bash bench/gpu_check.sh              # run every part (see bench/gpu_check.py for the list)
#   bash bench/gpu_check.sh --dry_run    # print the plan only: shapes, memory per part, time caps (CPU, seconds)
#   bash bench/gpu_check.sh --only attribution,laten_step
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code, also in the child processes
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry_run) ARGS+=(--dry_run True) ;;
    *) ARGS+=("$a") ;;
  esac
done
exec python bench/gpu_check.py "${ARGS[@]}"
