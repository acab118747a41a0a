#!/usr/bin/env bash
# Memory/speed profile of full-size Phi-3-mini (random weights, no download) on one CUDA GPU.
#
#   bash bench/gpu_profile.sh            # writes bench/results/<gpu>.md (+ <gpu>_profile/ csv, json, png)
#
# Builds the Phi-3-mini-4k architecture (hidden 3072, 32 layers, MLP 8192, vocab 32064) with random
# weights, saves it under /tmp (~7.6 GB), quantizes it to NF4 through qlora_phi3.model.load_model and
# profiles r=8,16,64 x seq 512,2048 x checkpointing on/off (12 configurations, 1 warm-up + 2 measured
# steps each). Designed to finish within 8 minutes on one H100 (timeout below).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" bench/gpu_profile.py "$@"
