#!/bin/bash
# I3: `zerokit generate --benchmark` on a freshly trained llama-tiny (200 steps of the pretrain recipe, exported):
# prefill/decode tokens/s with a dynamic, a static and no KV cache, and transformers' continuous batching
# (generate_batch, paged cache) at batch sizes 1..16, the same greedy tokens checked in every row.
# Writes bench/results/generate/{benchmark.json,benchmark.csv,report.md}; the run in runs/generate_speed/<date-time>/
# (~2 min).
#
#   bash bench/generate_speed.sh
#   bash bench/generate_speed.sh --model exported/gpt      # any exported model instead
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
BIN=${BIN:-.venv/bin}
OUT=bench/results/generate
RUN=runs/generate_speed/$(date -u +%Y%m%d-%H%M%S)   # a new run each time; earlier ones are left as they are
MODEL=$RUN/model
if [[ "${1:-}" != "--model" ]]; then
    $BIN/zerokit train pretrain_gpt run_dir="$RUN" model.preset=llama-tiny train.max_steps=200 \
        train.checkpoint_every=200 train.eval_every=0 train.cpu_threads=1 resume=none report_to=none
    $BIN/zerokit export "$RUN" "$MODEL"
    set -- --model "$MODEL"
fi
mkdir -p "$OUT"
{
    echo "# zerokit generate --benchmark"
    echo
    echo "\`bash bench/generate_speed.sh\` ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg))."
    echo
    $BIN/zerokit generate "$@" --benchmark --batch_sizes 1,2,4,8,16 --max_new_tokens 64 --prompt_tokens 32 \
        --threads "${THREADS:-1}" --out "$OUT"
} > "$OUT/report.md.tmp"
mv "$OUT/report.md.tmp" "$OUT/report.md"
cat "$OUT/report.md"
