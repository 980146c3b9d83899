#!/bin/bash
# D5 (issue 16 item 5): peak host memory per rank while starting a 2-rank ZeRO-3 and FSDP2 run of a ~0.5B
# Llama-shape model (llama-0.5b: 24 layers of 1024, 0.47B parameters, 1.8 GiB of fp32 weights) on the CPU,
# with every rank building the whole fp32 model first (model.sharded_init=false, the old way) and with the
# sharded start (true: FSDP2 on the meta device, ZeRO-3 under deepspeed.zero.Init; docs/init.md). Each run
# builds the model and the engine as recipes/pretrain_gpt.py does and stops before the first step
# (bench/init_memory.py). Peak = the rank's ru_maxrss; "base" = its RSS before the build (imports, process
# group): the constant. ~3-5 min on 2 loaded cores, ~4 GB of RAM at most (the old way's two full copies).
#
#   bash bench/init_memory.sh                        # the table below
#   MODEL=llama-tiny bash bench/init_memory.sh       # a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
MODEL=${MODEL:-llama-0.5b}
OUT=${OUT:-bench/results/init_memory}
mkdir -p "$OUT"
: > "$OUT/ranks.jsonl"
for engine in "ds_config=zero3" "fsdp=full_shard"; do
  for sharded in false true; do
    "$BIN/torchrun" --standalone --nproc_per_node 2 bench/init_memory.py "model.preset=$MODEL" "$engine" \
        "model.sharded_init=$sharded" 2> "$OUT/last_stderr.log" | grep '^{' | sed "s/^{/{\"sharded_init\": $sharded, /" >> "$OUT/ranks.jsonl"
  done
done
$PY - "$OUT/ranks.jsonl" <<'PY' | tee "$OUT/table.md"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
fp32 = rows[0]["fp32_mb"]
print(f"{rows[0]['params'] / 1e9:.3f}B parameters, full fp32 weights {fp32:,.0f} MiB, "
      f"1/{rows[0]['world_size']} of them {fp32 / rows[0]['world_size']:,.0f} MiB\n")
print("| engine | model.sharded_init | build | rank | base | peak, model built | peak, engine started | (built - base) / full fp32 | (started - base) / full fp32 | start s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: (r["engine"], r["sharded_init"], r["rank"])):
    base = r["rss_before_mb"]
    print(f"| {r['engine']} | {str(r['sharded_init']).lower()} | {r['init']} | {r['rank']} | {base:,.0f} | "
          f"{r['built_peak_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | {(r['built_peak_mb'] - base) / fp32:.2f} | "
          f"{(r['peak_rss_mb'] - base) / fp32:.2f} | {r['seconds']:.0f} |")
print("\nMiB of resident memory per rank (ru_maxrss); base: before the build (imports, process group)")
PY
