#!/usr/bin/env bash
# The prepared device check (one NVIDIA H200): CUDA correctness vs CPU (the expected kind and every_n_steps through
# the Lightning callback included), then the benchmarks on the GPU, the cost ladder included
# (bf16 autocast, batch 256). Results and the full log go to benchmarks/results/gpu/. Extra arguments are passed on
# (e.g. --skip-benchmarks, --repeats 3).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results/gpu
python -m benchmarks.gpu --device cuda "$@" 2>&1 | tee benchmarks/results/gpu/gpu_check.log
