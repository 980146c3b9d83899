#!/usr/bin/env bash
# The sweep that chose the demo's defaults (zerokit/recipes/configs/pretrain_gpt.yaml); its table is in
# docs/demo_tuning.md.
#
#   bench/demo_sweep.sh OUT_DIR ROUND MINUTES       e.g. bench/demo_sweep.sh runs/demo_sweep r2 3
#
# As run for docs/demo_tuning.md (2026-12-01, one round after another, the grid of each below):
#   r1 1.5, r2 3, r3 3, r4 3, r5 3, final 4.5 (PYTHON=/work/main/.venv/bin/python, PYTHONPATH=checkout)
#   then, at equal compute in step-count mode (MINUTES=steps; each line sets train.max_steps; writes
#   OUT_DIR/steps.tsv with CPU user seconds a step on one thread, a 10-step run of the point subtracted):
#   m1 steps, m2 steps, m3 steps, m4 steps
#
# The machine (2 cores) was shared with three other engineers whose test bursts moved the demo's
# throughput between ~1k and ~9k tokens/s within a minute, so candidates run one after another would
# have ranked the load, not the settings. A round therefore runs all its points at the same time, each
# on one thread (train.cpu_threads=1) for the same training-time budget (train.max_minutes=MINUTES):
# every point sees the same load. Screening rounds use short budgets; the last round runs the chosen
# defaults against the old ones at the demo's 4.5 minutes. Each line of a round is "name overrides..."
# on top of the recipe's defaults; the screening rounds (all but `final`) ran before the vocabulary
# default changed, so they start from data.vocab_size=1024 (a line's own value wins: the last one does).
# Appends to OUT_DIR/results.tsv: round, name, steps, train seconds, val bits per byte, load average
# (1/5/15 min) before and after, overrides.
set -euo pipefail
out=${1:?OUT_DIR}; round=${2:?ROUND}; minutes=${3:?MINUTES}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"

grid() {
    case $1 in
    r1) cat <<'GRID'  # schedule, lr, bf16 (vocab 1024, 8 x 128 tokens a step); bf16 ran 4-5x slower: stopped
cosine-3e-3     train.schedule=cosine train.lr=3e-3
wsd-3e-3        train.schedule=wsd train.lr=3e-3
wsd-6e-3        train.schedule=wsd train.lr=6e-3
wsd-3e-3-bf16   train.schedule=wsd train.lr=3e-3 train.precision=bf16
GRID
    ;;
    r2) cat <<'GRID'  # wsd at a higher lr, and a longer context at the same tokens a step, against the old defaults
old-defaults         train.schedule=cosine train.lr=3e-3 train.warmup_steps=100
wsd-6e-3             train.schedule=wsd train.lr=6e-3 train.warmup_steps=50 train.decay_fraction=0.3
wsd-6e-3-b256        train.schedule=wsd train.lr=6e-3 train.warmup_steps=50 train.decay_fraction=0.3 data.block_size=256 train.micro_batch_size=4
GRID
    ;;
    r3) cat <<'GRID'  # wsd at the old lr: the length of the decay, against the old defaults again
old-defaults-r3      train.schedule=cosine train.lr=3e-3 train.warmup_steps=100
wsd-3e-3-d0.2        train.schedule=wsd train.lr=3e-3 train.warmup_steps=100 train.decay_fraction=0.2
wsd-3e-3-d0.4        train.schedule=wsd train.lr=3e-3 train.warmup_steps=100 train.decay_fraction=0.4
GRID
    ;;
    r4) cat <<'GRID'  # round 3's best: a shorter warm-up, a larger vocabulary (more bytes a token)
wsd-d0.2-w100        train.schedule=wsd train.lr=3e-3 train.warmup_steps=100 train.decay_fraction=0.2
wsd-d0.2-w40         train.schedule=wsd train.lr=3e-3 train.warmup_steps=40 train.decay_fraction=0.2
wsd-d0.2-w100-v2048  train.schedule=wsd train.lr=3e-3 train.warmup_steps=100 train.decay_fraction=0.2 data.vocab_size=2048
GRID
    ;;
    r5) cat <<'GRID'  # round 4's best (vocab 2048): a larger vocabulary still, and a lower lr
v2048-3e-3           train.schedule=wsd train.lr=3e-3 train.warmup_steps=100 train.decay_fraction=0.2 data.vocab_size=2048
v4096-3e-3           train.schedule=wsd train.lr=3e-3 train.warmup_steps=100 train.decay_fraction=0.2 data.vocab_size=4096
v2048-2e-3           train.schedule=wsd train.lr=2e-3 train.warmup_steps=100 train.decay_fraction=0.2 data.vocab_size=2048
GRID
    ;;
    final) cat <<'GRID'  # at the demo's 4.5 minutes: the chosen defaults (no overrides) against the old ones
old-defaults-final   train.schedule=cosine train.lr=3e-3 train.warmup_steps=100 data.vocab_size=1024
new-defaults-final
GRID
    ;;
    # m1 as run: m1-muon-0.05 and m1-llama were stopped at ~170 steps (load 11-13) so the other two could finish
    m1) cat <<'GRID'  # equal steps (600, a screen): Muon (fp32 Newton-Schulz on the CPU) and a Llama shape against AdamW
m1-adamw             train.max_steps=600 optim.name=adamw
m1-muon-0.02         train.max_steps=600 optim.name=muon
m1-muon-0.05         train.max_steps=600 optim.name=muon optim.muon_lr=0.05
m1-llama             train.max_steps=600 optim.name=adamw model.preset=llama-demo
GRID
    ;;
    m2) cat <<'GRID'  # Muon at the demo's compute: 1,666 quiet AdamW steps / 1.20 (m1: 0.2907 / 0.2416 CPU s a step) ~ 1,400
m2-muon-1400         train.max_steps=1400 optim.name=muon
GRID
    ;;
    m3) cat <<'GRID'  # the Llama shape under Muon, at m1's 600 steps (compare with m1-muon-0.02)
m3-llama-muon        train.max_steps=600 optim.name=muon model.preset=llama-demo
GRID
    ;;
    m4) cat <<'GRID'  # m3's llama-demo under Muon at the quiet demo's compute: 1,666 x 0.2416 / 0.2987 (m3) ~ 1,350
m4-llama-muon-1350   train.max_steps=1350 optim.name=muon model.preset=llama-demo
GRID
    ;;
    *) echo "unknown round $1" >&2; exit 2 ;;
    esac
}

if [ "$minutes" = steps ]; then  # equal compute: each line sets train.max_steps (its share of the budget)
    [ -f "$out/steps.tsv" ] || printf 'round\tname\tsteps\tcpu_s_per_step\tval_bpb\tload_before\tload_after\toverrides\n' > "$out/steps.tsv"
    steps_point() {  # name overrides...: CPU user seconds of the run minus a 10-step run's, per step
        local name=$1; shift
        local before after u10 un
        before=$(cut -d' ' -f1-3 /proc/loadavg)
        for n in 10 full; do
            local cap=""; [ $n = full ] || cap="train.max_steps=10"
            # shellcheck disable=SC2086
            /usr/bin/time -f %U -o "$out/$name.$n.time" "$py" recipes/pretrain_gpt.py run_dir="$out/$name-$n" resume=none \
                train.max_minutes=0 train.cpu_threads=1 train.eval_every=0 train.checkpoint_every=0 sample.max_new_tokens=0 \
                "$@" $cap > "$out/$name-$n.log" 2>&1 || { echo "$name failed: see $out/$name-$n.log" >&2; return 0; }
        done
        after=$(cut -d' ' -f1-3 /proc/loadavg)
        "$py" - "$out/$name-full/summary.json" "$out/$name.10.time" "$out/$name.full.time" "$round" "$name" "$before" "$after" "$*" \
            >> "$out/steps.tsv" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
u10, un = (float(open(f).read().split()[-1]) for f in sys.argv[2:4])
print("\t".join([*sys.argv[4:6], str(s["step"]), f"{(un - u10) / (s['step'] - 10):.4f}", f"{s['val_bpb']:.4f}", *sys.argv[6:]]))
PY
    }
    while read -r name overrides; do
        # shellcheck disable=SC2086
        [ -z "$name" ] || steps_point "$name" $overrides &
    done < <(grid "$round")
    wait
    column -t -s $'\t' "$out/steps.tsv"
    exit 0
fi
[ -f "$out/results.tsv" ] || printf 'round\tname\tsteps\ttrain_s\tval_bpb\tload_before\tload_after\toverrides\n' > "$out/results.tsv"
run_point() {  # name overrides...
    local name=$1; shift
    local before after screening=""
    [ "$round" = final ] || screening="data.vocab_size=1024"
    before=$(cut -d' ' -f1-3 /proc/loadavg)
    # shellcheck disable=SC2086
    "$py" recipes/pretrain_gpt.py run_dir="$out/$name" resume=none train.max_minutes="$minutes" \
        train.cpu_threads=1 train.eval_every=0 train.checkpoint_every=0 sample.max_new_tokens=1 $screening "$@" \
        > "$out/$name.log" 2>&1 || { echo "$name failed: see $out/$name.log" >&2; return 0; }
    after=$(cut -d' ' -f1-3 /proc/loadavg)
    "$py" - "$out/$name/summary.json" "$round" "$name" "$before" "$after" "$*" >> "$out/results.tsv" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("\t".join([*sys.argv[2:4], str(s["step"]), f"{s['train_seconds']:.1f}", f"{s['val_bpb']:.4f}", *sys.argv[4:]]))
PY
}
while read -r name overrides; do
    # shellcheck disable=SC2086
    [ -z "$name" ] || run_point "$name" $overrides &
done < <(grid "$round")
wait
column -t -s $'\t' "$out/results.tsv"
