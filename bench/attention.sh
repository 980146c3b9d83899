#!/bin/bash
# I1: attention kernels against sequence length on the CPU. One Llama-tiny block (4 heads of 16 dims, batch 1),
# forward+backward at 128 -> 4096 tokens for eager, sdpa's math kernel and sdpa's flash kernel (PyTorch's tiled,
# memory-efficient CPU kernel; sdpa's "efficient" and "cudnn" kernels are CUDA-only). Peak memory: live tensor
# storages (zerokit.lab.measure.LiveBytes), exact and repeatable; times: best of 3, noisy on a shared machine.
# Writes bench/results/attention/{attention.csv,attention.png,report.md} (~1-2 min on 2 cores).
#
#   bash bench/attention.sh                     # the CPU preset
#   bash bench/attention.sh --impls eager,sdpa-flash,sdpa-efficient,flash --lengths 512,1024,2048,4096,8192   # a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
PY=${PY:-.venv/bin/python}
# One thread: on a CPU shared with other jobs two spinning OpenMP threads were 10-30x slower than one.
$PY -m zerokit.lab.attention_bench --out bench/results/attention --lengths 128,256,512,1024,2048,4096 \
    --repeats 3 --threads "${THREADS:-1}" "$@"
