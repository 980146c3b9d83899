#!/usr/bin/env bash
# GPU throughput suite: tokens/s, MFU and peak memory for GPT-2 124M and a Llama ~1B shape,
# bf16, ZeRO-1/2/3 and FSDP, torch.compile on/off, activation checkpointing off/full, plus the
# Hugging Face Trainer with the same DeepSpeed JSON as the baseline, all in one run.
#   bash bench/gpu_suite.sh [NPROC] [OUT_DIR]       (needs an NVIDIA GPU; ~20-30 min on one H100)
# Writes OUT_DIR/*/summary.json and appends a table to BENCHMARKS.md (bench/collect.py).
# (Selective activation checkpointing is not implemented in the recipes yet: only off/full.)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-$(nvidia-smi -L | wc -l)}
OUT=${2:-runs/gpu_suite}
STEPS=${STEPS:-60}
PY=${PYTHON:-.venv/bin/python}
run() {  # name, then recipe overrides
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  echo "== $name"
  "$(dirname "$PY")/torchrun" --standalone --nproc_per_node "$NPROC" recipes/pretrain_gpt.py \
    run_dir="$OUT/$name" resume=none train.max_steps="$STEPS" train.eval_every=0 train.checkpoint_every=0 \
    train.log_every=10 train.warmup_steps=10 model.dropout=0.0 train.precision=bf16 data.eval_batches=4 \
    sample.max_new_tokens=1 "$@" || echo "!! $name failed" | tee -a "$OUT/failures.txt"
}
mkdir -p "$OUT"
GPT2=(model.preset=gpt2-124m data.vocab_size=50257 data.block_size=1024 train.micro_batch_size=16)
LLAMA=(model.preset=llama-1b data.vocab_size=32000 data.block_size=2048 train.micro_batch_size=4)
for model in GPT2 LLAMA; do
  declare -n args=$model
  for engine in zero1 zero2 zero3 fsdp; do
    eng=(ds_config=ds_configs/$engine.json); [ $engine = fsdp ] && eng=(fsdp=full_shard)
    for compile in false true; do
      for ckpt in false true; do
        run "${model,,}-$engine-compile_$compile-ckpt_$ckpt" "${args[@]}" "${eng[@]}" train.compile=$compile model.grad_ckpt=$ckpt
      done
    done
  done
  # Baseline: Hugging Face Trainer, same model shape, data, batch and DeepSpeed ZeRO-2 JSON.
  [ -f "$OUT/${model,,}-hf_trainer-zero2/summary.json" ] || \
    "$(dirname "$PY")/torchrun" --standalone --nproc_per_node "$NPROC" bench/hf_trainer_baseline.py \
      --out "$OUT/${model,,}-hf_trainer-zero2" --steps "$STEPS" --ds-config ds_configs/zero2.json "${args[@]}" \
      || echo "!! ${model,,}-hf_trainer failed" | tee -a "$OUT/failures.txt"
done
"$PY" bench/collect.py "$OUT" --title "GPU suite ($NPROC x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))" \
  --command "bash bench/gpu_suite.sh $NPROC $OUT" >> BENCHMARKS.md
echo "results appended to BENCHMARKS.md"
