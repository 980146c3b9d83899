#!/bin/bash
# MHA / GQA / MQA (model.kv_heads 4 / 2 / 1 of llama-tiny's 4 heads): the same short pre-training on
# tiny-shakespeare for each (validation bits per byte, training tokens/s), then the exported model's KV cache
# bytes per token (formula and a measured DynamicCache) and greedy decode tokens/s at batch 1 and 8; then decode
# speed where the cache matters: random-weight llama-120m with kv_heads 12 / 4 / 1, batch 8 x 272 tokens.
# Writes bench/results/kv_heads/{kv_heads.csv,kv_heads_scale.csv,report.md}; runs in runs/kv_heads_bench/<date-time>/
# (~5-6 min on 2 cores).
#
#   bash bench/kv_heads.sh                      # 600 steps each
#   STEPS=100 bash bench/kv_heads.sh            # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
PY=${PY:-.venv/bin/python}
$PY -m zerokit.lab.kv_heads_bench --kv-heads 4,2,1 --steps "${STEPS:-600}" --threads "${THREADS:-1}" \
    --batch-sizes 1,8 --new-tokens 64 --out bench/results/kv_heads "$@"
