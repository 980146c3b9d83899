#!/usr/bin/env bash
# D3 (issue 16): the demo (recipes/pretrain_gpt.py, its defaults) trained with each tokenizer kind, in step
# mode (train.max_minutes=0 train.max_steps=STEPS, the bit-reproducible demo), so the result does not
# depend on the load of the shared machine. Table in docs/demo_tuning.md ("Tokenizer kinds").
#
#   bench/tokenizer_demo.sh OUT_DIR [STEPS] [EXTRA OVERRIDES...]      e.g. bench/tokenizer_demo.sh /tmp/tokdemo 1350
#
# Every run gets a fresh data.cache_dir under OUT_DIR (the tokenizer trained and the corpus packed there,
# outside the training time) and runs on one thread (train.cpu_threads=1); the three run at the same time
# (KINDS="train sentencepiece_bpe sentencepiece_unigram" by default; PARALLEL=0 runs them one after another).
# Writes OUT_DIR/tokenizers.tsv and prints it as a markdown table: kind, steps, val bits per byte, val loss
# (nats a token), train / val tokens, bytes a token (val split), train seconds, wall seconds.
set -euo pipefail
out=${1:?OUT_DIR}; steps=${2:-1350}; shift $(( $# >= 2 ? 2 : 1 ))
py=${PYTHON:-.venv/bin/python}
kinds=${KINDS:-train sentencepiece_bpe sentencepiece_unigram}
mkdir -p "$out"

one() {  # kind, then extra overrides
    local kind=$1; shift
    local t0=$SECONDS
    "$py" recipes/pretrain_gpt.py train.max_minutes=0 train.max_steps="$steps" train.cpu_threads=1 \
        data.tokenizer="$kind" data.cache_dir="$out/cache-$kind" run_dir="$out/run-$kind" "$@" \
        >"$out/$kind.log" 2>&1
    echo $(( SECONDS - t0 )) >"$out/$kind.wall"
}

pids=()
for kind in $kinds; do
    rm -rf "$out/run-$kind" "$out/cache-$kind"
    if [[ ${PARALLEL:-1} == 1 ]]; then one "$kind" "$@" & pids+=($!); else one "$kind" "$@"; fi
done
for p in "${pids[@]}"; do wait "$p"; done

"$py" - "$out" $kinds <<'PY'
import json, sys
from pathlib import Path
out, kinds = Path(sys.argv[1]), sys.argv[2:]
rows = []
for kind in kinds:
    s = json.loads((out / f"run-{kind}" / "summary.json").read_text())
    (index,) = [json.loads(p.read_text()) for p in (out / f"cache-{kind}" / "data").glob("*/index.json")]
    tr, va = index["splits"]["train"], index["splits"]["val"]
    rows.append([kind, s["step"], f"{s['val_bpb']:.4f}", f"{s['val_loss']:.4f}",
                 tr["tokens"], va["tokens"], f"{va['bytes'] / va['tokens']:.3f}", f"{s['train_seconds']:.0f}",
                 (out / f"{kind}.wall").read_text().strip()])
head = ["tokenizer", "steps", "val bpb", "val loss", "train tokens", "val tokens", "bytes/token (val)", "train s", "wall s"]
(out / "tokenizers.tsv").write_text("\n".join("\t".join(map(str, r)) for r in [head] + rows) + "\n")
print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
for r in rows:
    print("| " + " | ".join(map(str, r)) + " |")
PY
