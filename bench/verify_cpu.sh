#!/bin/bash
# E1: the memory estimator against real DeepSpeed steps on 2 CPU ranks, 32 points:
# ZeRO 0-3 x checkpointing none/full x micro-batch 1/4 x full/LoRA, fp32, seq 128, on a 2-block
# GPT-2 (256 wide, vocab 2048; 2.1M parameters). Writes bench/results/verify_cpu.{md,json}.
#   bash bench/verify_cpu.sh          (~3 min on 2 cores)
# On a GPU node the same command measures torch.cuda.max_memory_allocated in bf16 (tolerance 10%).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=$(mktemp -d)
trap 'rm -rf "$MODEL"' EXIT
$PY -c "from transformers import GPT2Config; GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=128, \
vocab_size=2048, bos_token_id=0, eos_token_id=0).save_pretrained('$MODEL')"
mkdir -p bench/results
{
  echo "# Estimated vs measured peak per rank: 2 ranks, DeepSpeed ZeRO 0-3, fp32, seq 128"
  echo
  echo "\`bash bench/verify_cpu.sh\` ($(date -u +%Y-%m-%d), $(nproc) CPU cores). Model: GPT-2, 2 blocks, 256 wide,"
  echo "vocab 2048 (2.1M parameters). Each point: one step of 2 micro-batches on the rank with the highest peak."
  echo "Measured: live tensor storages (allocator level, \`zerokit.lab.measure.LiveBytes\`), the engine's"
  echo "own buffers included. States: the estimate's weights / gradients / fp32 master / Adam moments"
  echo "against what the engine holds mid-window. Step times are CPU times of this tiny model."
  echo
  $PY -m zerokit.cli verify --model "$MODEL" --gpus 2 --seq 128 --sweep stage=0,1,2,3 grad_ckpt=none,full \
      micro_batch=1,4 peft=none,lora --json bench/results/verify_cpu.json
} > bench/results/verify_cpu.md.tmp
mv bench/results/verify_cpu.md.tmp bench/results/verify_cpu.md
cat bench/results/verify_cpu.md
