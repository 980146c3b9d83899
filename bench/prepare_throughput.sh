#!/bin/bash
# D2: throughput of `zerokit prepare` with 2 workers, in MB of source text per second, without and with
# the filters and dedup, against the reference: Hugging Face tokenizers' encode_batch_fast on 2 threads
# (RAYON_NUM_THREADS=2), reading the same JSONL files (json.loads per line) and encoding the same text with
# the same tokenizer, in chunks of 1,000 documents. Issue 16: prepare without filters stays within 1.5x of it.
#
# Fair means: each is one whole process, timed from its start to its exit (interpreter, imports, worker
# start-up, reading, encoding; prepare also writes the shards, checksums and manifest); the tokenizer is
# trained once beforehand and given to every prepare run, so all do the same encoding. The machine is shared,
# so the runs are interleaved (reference, prepare, prepare, reference, ... in alternating order) for ROUNDS
# rounds and the ratio is taken per round (the median is reported); the CPU seconds of each process tree
# (user + sys, workers included) are reported too, as they depend less on what else runs.
# The corpus is tests/prepare_corpus.py's (DialogSum summaries + planted duplicates and junk).
# Results: bench/results/prepare_throughput.json and docs/data.md.
#
#   bash bench/prepare_throughput.sh                  # ~11.5 MB (6,000 clean documents), 3 rounds
#   bash bench/prepare_throughput.sh 26000 3          # ~50 MB
#   FILTERED_ROUNDS=0 bash bench/prepare_throughput.sh   # without the (slow) filtered runs
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
DATA=${ZEROKIT_DATA:-../shared/data}
N=${1:-6000}
ROUNDS=${2:-3}
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
PY=${PY:-.venv/bin/python}
$PY - "$DATA" "$WORK" "$N" "$ROUNDS" "${FILTERED_ROUNDS:-1}" <<'PY'
import json, os, resource, shutil, statistics, subprocess, sys, time
from pathlib import Path

import prepare_corpus

data, work, n, rounds, filtered_rounds = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6])
corpus = work / "corpus"
planted = prepare_corpus.build(data, corpus, n_clean=n, files=4)
mb = planted["bytes"] / 1e6
REFERENCE = """
import json, os, sys
from pathlib import Path
os.environ["TOKENIZERS_PARALLELISM"], os.environ["RAYON_NUM_THREADS"] = "true", "2"
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
for f in sorted(Path(sys.argv[1]).glob("*.jsonl")):
    texts = [json.loads(line)["text"] for line in f.read_text().splitlines()]
    for i in range(0, len(texts), 1000):
        tok.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False)
"""


def timed(cmd):
    """(wall seconds, CPU seconds of the process and its reaped children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare(out, *extra):
    shutil.rmtree(work / out, ignore_errors=True)
    return timed([sys.executable, "-m", "zerokit", "prepare", str(corpus), str(work / out), "--workers", "2",
                  "--vocab-size", "4096", *extra])


prepare("tok", "--sample-mb", "5")  # the tokenizer, trained once, outside the timings
tok_dir = str(work / "tok" / "tokenizer")
runs = {"reference": lambda: timed([sys.executable, "-c", REFERENCE, str(corpus), tok_dir + "/tokenizer.json"]),
        "prepare": lambda: prepare("plain", "--tokenizer", tok_dir),
        "prepare_filtered": lambda: prepare("filtered", "--tokenizer", tok_dir, "--filters", "all", "--dedup")}
got = {k: [] for k in runs}
loads = []
for r in range(rounds):
    order = ["reference", "prepare"] + (["prepare_filtered"] if r < filtered_rounds else [])
    for k in order if r % 2 == 0 else order[::-1]:
        loads.append(os.getloadavg()[0])
        wall, cpu = runs[k]()
        got[k].append((wall, cpu))
        print(f"round {r}: {k:17s} {wall:6.1f} s wall {cpu:6.1f} s CPU ({mb / wall:.2f} MB/s)", flush=True)
ratios = [p[0] / ref[0] for p, ref in zip(got["prepare"], got["reference"])]
med = lambda k, i: statistics.median(x[i] for x in got[k])
res = {"corpus_mb": round(mb, 1), "documents": planted["documents"], "rounds": rounds, "cores": os.cpu_count(),
       "load_average": [round(min(loads), 1), round(max(loads), 1)],
       **{f"{k}_mb_s": round(mb / med(k, 0), 2) for k in runs if got[k]},
       **{f"{k}_cpu_s": round(med(k, 1), 1) for k in runs if got[k]},
       "prepare_vs_reference_per_round": [round(x, 2) for x in ratios],
       "prepare_vs_reference": round(statistics.median(ratios), 2),
       "prepare_vs_reference_cpu": round(med("prepare", 1) / med("reference", 1), 2),
       "note": "whole processes, wall time from start to exit; MB/s of source text (JSONL text fields, UTF-8); "
               "medians over the rounds; the ratio is per interleaved round; the tokenizer is given to prepare"}
if got["prepare_filtered"]:
    m = json.loads((work / "filtered" / "manifest.json").read_text())
    res["removed"] = {s["step"]: s["documents_removed"] for s in m["steps"]}
print(json.dumps(res, indent=1))
Path("bench/results/prepare_throughput.json").write_text(json.dumps(res, indent=1) + "\n")
PY
