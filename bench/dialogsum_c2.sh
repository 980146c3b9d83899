#!/bin/bash
# C2: DialogSum on CPU from nothing: pre-train a small GPT on the training dialogues + summaries, export it,
# score it before SFT, fine-tune it (SFT, loss on summary tokens only), score it again; then the two
# reference baselines (lead-3, best fixed summary) on the same validation split. Every number is
# rouge-score with stemming on dialogsum/dev.jsonl (500 dialogues).
#
#   bash bench/dialogsum_c2.sh                 # 2 ranks (torchrun), outputs under runs/dialogsum_gpt/
#   NPROC=1 OUT=/tmp/c2 bash bench/dialogsum_c2.sh
#
# Budget on a 2-core CPU: ~10 min of pre-training + ~8 min of SFT (train_seconds in each summary.json),
# plus evaluation (generation for 500 dialogues, twice).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/dialogsum_gpt}
NPROC=${NPROC:-2}
DATA=${ZEROKIT_DATA:-../shared/data}/dialogsum
PRE_STEPS=${PRE_STEPS:-400}
SFT_STEPS=${SFT_STEPS:-400}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BIN=.venv/bin
RUN="$BIN/torchrun --standalone --nproc_per_node $NPROC"

# 1. Pre-train: gpt-demo (4 layers, 256 wide) on "dialogue\nsummary" documents, 512-token context.
$RUN recipes/pretrain_gpt.py run_dir=$OUT/pretrain resume=auto \
    data.corpus=$DATA/train.jsonl data.text_field=dialogue,summary data.block_size=512 data.vocab_size=4096 \
    model.preset=gpt-demo model.dropout=0.0 train.micro_batch_size=8 train.max_steps=$PRE_STEPS \
    train.warmup_steps=30 train.eval_every=0 train.checkpoint_every=$PRE_STEPS "sample.prompt=#Person1#:"

# 2. Export the last checkpoint as a Hugging Face model folder (config, weights, tokenizer).
$BIN/zerokit export $OUT/pretrain/checkpoints/step_$PRE_STEPS $OUT/model

# 3. The model before SFT, scored by the same recipe with no training steps.
$RUN recipes/finetune_summarization.py model.name_or_path=$OUT/model run_dir=$OUT/before_sft resume=none \
    data.train=$DATA/train.jsonl data.validation=$DATA/dev.jsonl train.max_steps=0 export.merge=false

# 4. SFT: full fine-tuning, loss on the summary tokens only, eos appended.
$RUN recipes/finetune_summarization.py model.name_or_path=$OUT/model run_dir=$OUT/sft resume=auto \
    data.train=$DATA/train.jsonl data.validation=$DATA/dev.jsonl train.max_steps=$SFT_STEPS

# 5. The table.
$BIN/python - "$OUT" "$DATA/dev.jsonl" <<'PY'
import json, re, sys
from pathlib import Path
from zerokit.data.tasks import load_records, rouge_scores
out, dev = Path(sys.argv[1]), load_records(sys.argv[2])
refs = [r["summary"] for r in dev]
# lead-3 as DialogSum defines it: the first 3 utterances without speaker tags (17.7 ROUGE-L)
lead3 = rouge_scores([" ".join(re.sub(r"^#Person\d+#:\s*", "", u) for u in r["dialogue"].split("\n")[:3])
                      for r in dev], refs)
fixed = {"rouge1": 31.5, "rouge2": 4.6, "rougeL": 24.7}  # the best single summary for every dialogue (given)
rows = [("lead-3 (first 3 turns)", lead3, None), ("best fixed summary", fixed, None)]
for name in ("before_sft", "sft"):
    s = json.loads((out / name / "summary.json").read_text())
    rows.append((name, s, s.get("train_seconds")))
pre = json.loads((out / "pretrain" / "summary.json").read_text())
print(f"\npre-training: {pre['train_seconds']:.0f} s, val_bpb {pre['val_bpb']:.3f}")
print("| model | ROUGE-1 | ROUGE-2 | ROUGE-L | training s |\n|---|---|---|---|---|")
for name, s, secs in rows:
    print(f"| {name} | {s['rouge1']:.2f} | {s['rouge2']:.2f} | {s['rougeL']:.2f} | {'' if secs is None else f'{secs:.0f}'} |")
PY
