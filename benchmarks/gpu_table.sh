#!/usr/bin/env bash
# MiniGPT-4 training throughput on one CUDA device, in the published port's table format
# (NAME, TokensPerSec, Iterations, BatchSize, Torch_Version): stage-1 (batch 64) and stage-2 (batch 12)
# layouts at Vicuna-7B dims with random weights, original EVA-ViT-g + Q-Former dims, 20 iterations each, for
# the original's own GPU settings (fp16), transformers' BLIP-2 class on our export, and ours.
#
#   benchmarks/gpu_table.sh                       # on a CUDA machine (needs ~40 GB of GPU memory)
#   benchmarks/gpu_table.sh --device cuda:1 --steps 50
#   benchmarks/gpu_table.sh --device cpu --dims tiny --llm tiny \
#       --steps 1 --warmup 1 --batch-stage1 2 --batch-stage2 2     # dry run of the same code on a CPU
#
# All options: benchmarks/gpu_table.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" -m benchmarks.gpu_table "$@"
