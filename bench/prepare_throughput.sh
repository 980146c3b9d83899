#!/bin/bash
# D2: throughput of `zerokit prepare` with 2 workers, in MB of source text per second, without and with
# the filters and dedup, against Hugging Face tokenizers' encode_batch (2 threads) on the same text with
# the same tokenizer (the reference: prepare without filters should stay within 1.5x of it).
# The corpus is tests/prepare_corpus.py's synthetic one (DialogSum summaries + planted duplicates and junk).
# Results: bench/results/prepare_throughput.json and docs/data.md. Run on an otherwise idle machine.
#
#   bash bench/prepare_throughput.sh          # a ~20 MB corpus
#   bash bench/prepare_throughput.sh 12000    # clean documents (~1.6 kB each)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
DATA=${ZEROKIT_DATA:-../shared/data}
N=${1:-12000}
WORK=${WORK:-$(mktemp -d)}
PY=${PY:-.venv/bin/python}
$PY - "$DATA" "$WORK" "$N" <<'PY'
import json, os, subprocess, sys, time
from pathlib import Path

import prepare_corpus

data, work, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
corpus = work / "corpus"
planted = prepare_corpus.build(data, corpus, n_clean=n, files=4)
mb = planted["bytes"] / 1e6
env = dict(os.environ)


def prepare(out, *extra):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zerokit", "prepare", str(corpus), str(work / out), "--workers", "2",
                    "--vocab-size", "4096", *extra], check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


# The tokenizer is trained once, outside the timings: all three measure the same encoding work.
prepare("tok", "--sample-mb", "5")
tok_dir = str(work / "tok" / "tokenizer")
plain = prepare("plain", "--tokenizer", tok_dir)
filtered = prepare("filtered", "--tokenizer", tok_dir, "--filters", "all", "--dedup")

from tokenizers import Tokenizer  # the reference: read the same JSONL, encode_batch on 2 threads
os.environ["TOKENIZERS_PARALLELISM"], os.environ["RAYON_NUM_THREADS"] = "true", "2"
tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
t0 = time.perf_counter()
for f in sorted(corpus.glob("*.jsonl")):
    texts = [json.loads(line)["text"] for line in f.read_text().splitlines()]
    for i in range(0, len(texts), 1000):
        tok.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False)
hf = time.perf_counter() - t0
m = json.loads((work / "filtered" / "manifest.json").read_text())
passes = {k: json.loads((work / k / "manifest.json").read_text())["seconds"] for k in ("plain", "filtered")}
res = {"corpus_mb": round(mb, 1), "documents": planted["documents"], "load_average": round(os.getloadavg()[0], 1),
       "cores": os.cpu_count(), "prepare_mb_s": round(mb / plain, 2), "prepare_filtered_mb_s": round(mb / filtered, 2),
       "prepare_passes_mb_s": round(mb / passes["plain"], 2),
       "prepare_filtered_passes_mb_s": round(mb / passes["filtered"], 2),
       "hf_encode_batch_mb_s": round(mb / hf, 2), "prepare_vs_hf": round(plain / hf, 2),
       "prepare_passes_vs_hf": round(passes["plain"] / hf, 2),
       "note": "prepare_*: the whole command (interpreter and imports included); *_passes_*: its three passes "
               "(manifest seconds: worker start-up, reading, tokenizing, shard writes); the tokenizer is given",
       "removed": {s["step"]: s["documents_removed"] for s in m["steps"]}}
print(json.dumps(res, indent=1))
out = Path("bench/results/prepare_throughput.json")
out.write_text(json.dumps(res, indent=1) + "\n")
PY
