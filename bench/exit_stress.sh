#!/bin/bash
# R7: N consecutive 2-rank CPU launches that must all exit 0 (the rare exit abort, "terminate called
# without an active exception", showed up as a non-zero exit after a finished run). Launch i cycles
# through three entry points x three engines, so N=30 covers each of the 9 pairs 3 or 4 times:
#   entry:  recipe (torchrun recipes/pretrain_gpt.py), bench (`zerokit bench`, a one-point sweep),
#           many (tests/workers/run_recipe_many.py, what the multi-rank tests use)
#   engine: DeepSpeed ZeRO-0, DeepSpeed ZeRO-2, FSDP full_shard
# gpt-tiny, 3 steps, a fresh data cache per launch (rank 0 trains the tokenizer and packs, as in a
# fresh clone). Prints one line per launch and the count of non-zero exits; exits 1 if any.
#   nice -n 10 bash bench/exit_stress.sh 30     (10-50 s per launch on 2 shared cores, ~12 min for 30)
# Logs stay in $EXIT_STRESS_DIR (default: a new temp dir). A first launch may JIT-build DeepSpeed's
# CPU ops (minutes); venvs sharing ~/.cache/torch_extensions with other flags rebuild them each time.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-30}
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's zerokit, also for recipes/*.py
OUT=${EXIT_STRESS_DIR:-$(mktemp -d -t zerokit-exit-stress-XXXX)}
mkdir -p "$OUT"
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1  # an abort prints every thread's Python stack into the log
ENTRIES=(recipe bench many)
ENGINES=(zero0 zero2 fsdp)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2)
failed=0
echo "exit stress: $N launches, logs in $OUT"
for i in $(seq 0 $((N - 1))); do
  entry=${ENTRIES[$((i % 3))]}
  engine=${ENGINES[$(((i / 3) % 3))]}
  run="$OUT/$i-$entry-$engine"
  mkdir -p "$run"
  case $engine in
    zero0) engine_set=("ds_config=ds_configs/zero0.json"); sweep=stage=0 ;;
    zero2) engine_set=("ds_config=ds_configs/zero2.json"); sweep=stage=2 ;;
    fsdp)  engine_set=("fsdp=full_shard"); sweep=fsdp=full_shard ;;
  esac
  common=(model.preset=gpt-tiny train.max_steps=3 data.vocab_size=512 data.block_size=32 train.micro_batch_size=4
          "data.cache_dir=$run/cache" resume=none report_to=none train.eval_every=0 train.checkpoint_every=0
          data.eval_batches=2 sample.max_new_tokens=8)
  t0=$SECONDS
  case $entry in
    recipe) "${TORCHRUN[@]}" recipes/pretrain_gpt.py "${common[@]}" "${engine_set[@]}" "run_dir=$run/run" ;;
    bench)  "$PY" -m zerokit.cli bench --sweep "$sweep" --gpus 2 --model gpt-tiny --steps 3 --out "$run/bench" \
              --set "${common[@]:2}" ;;
    many)   "$PY" -c 'import json, sys; json.dump([sys.argv[2:]], open(sys.argv[1], "w"))' "$run/runs.json" \
              "${common[@]}" "${engine_set[@]}" "run_dir=$run/run"
            "${TORCHRUN[@]}" tests/workers/run_recipe_many.py recipes/pretrain_gpt.py "$run/runs.json" ;;
  esac > "$run/log" 2>&1
  rc=$?
  # A rank that aborted after its work was done still shows in the log, even if a launcher hid the code.
  aborts=$(grep -ac "terminate called\|Fatal Python error\|SIGABRT" "$run/log")
  if [ "$rc" -ne 0 ] || [ "$aborts" -ne 0 ]; then
    failed=$((failed + 1))
    echo "launch $((i + 1))/$N $entry $engine: exit $rc, $aborts abort line(s), $((SECONDS - t0)) s  FAILED ($run/log)"
    grep -a -m 5 "terminate called\|Fatal Python error\|SIGABRT\|Error" "$run/log" | sed 's/^/    /'
  else
    echo "launch $((i + 1))/$N $entry $engine: exit 0, $((SECONDS - t0)) s"
  fi
done
echo "exit stress: $failed of $N launches failed"
[ "$failed" -eq 0 ]
