"""`zerokit prepare SOURCE OUT_DIR --slurm-tasks K`: zerokit.data.prepare's passes as SLURM jobs, giving the
same OUT_DIR as a local run (the same shards byte for byte, the same counts).

Four jobs, each started when the one before succeeded (--dependency=afterok; --kill-on-invalid-dep=yes, so
a failure cancels the rest instead of leaving them pending):
  analyse    array of K tasks: task t reads the source files f with f % K == t -> .work/records/<f>.bin
  tokenizer  one task: the records joined in file order (what a local run's analyse pass writes), the
             duplicates resolved across all files, the train/val split, the tokenizer trained or copied
  encode     array of K tasks: the kept documents of task t's files -> .work/tokens/<f>.bin (+ lengths)
  merge      one task: the token files in document order -> the fixed-size shards, then manifest.json
Documents are numbered as a local run numbers them (sorted files, then file order), and tokenizing a
document does not depend on its neighbours, so the shards are the local run's. A source that is one file
(or a datasets stream) is one analyse and one encode task. Each task writes its files atomically, so a
task SLURM requeues starts again cleanly; the merge resumes from its last complete shard like a local run.
Each task runs in one process (the array is the parallelism). OUT_DIR/slurm/ holds the batch script and
the jobs' output (.work goes when the merge is done).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from zerokit.data import prepare as P
from zerokit.data.prepare_workers import RECORD, Pool, encode
from zerokit.data.shards import atomic_json
from zerokit.data.sources import source_files
from zerokit.errors import UsageError

STAGES = ("analyse", "tokenizer", "encode", "merge")


def plan(source: str, out_dir, tasks: int, batch_mb: float = 4.0, **settings) -> int:
    """OUT_DIR/.work/slurm.json (the settings, the files, the task count) and the batch script the jobs run;
    returns the array size (0: already prepared)."""
    s, _, key = P.check_settings(source, 0, batch_mb, settings)
    out = Path(out_dir).expanduser().resolve()
    if tasks < 1:
        raise UsageError(f"--slurm-tasks {tasks}: give at least 1 array task")
    if P.start_out_dir(out, key):
        return 0
    files = [str(f) for f in source_files(s["source"]) or [s["source"]]]
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    atomic_json(out / ".work" / "slurm.json", {"settings": s, "key": key, "files": files, "tasks": min(tasks, len(files)),
                                               "batch_chars": int(batch_mb * 1e6), "submitted": time.time()})
    (out / "slurm" / "prepare.sbatch").write_text(f"#!/bin/bash\nexec {sys.executable} -m zerokit.data.prepare_slurm \"$@\"\n")
    return min(tasks, len(files))


def submit(source: str, out_dir, tasks: int, sbatch_args=(), batch_mb: float = 4.0, **settings) -> list[int]:
    """Submit the four jobs for `source` -> `out_dir`; returns their job ids ([] if already prepared)."""
    n = plan(source, out_dir, tasks, batch_mb, **settings)
    if not n:
        return []
    out = Path(out_dir).expanduser().resolve()
    script, array = out / "slurm" / "prepare.sbatch", f"--array=0-{n - 1}"
    jobs: list[int] = []
    for stage in STAGES:
        cmd = ["sbatch", "--parsable", f"--job-name=prepare-{stage}", f"--output={out}/slurm/{stage}-%A_%a.out",
               *([array] if stage in ("analyse", "encode") else []),
               *([f"--dependency=afterok:{jobs[-1]}", "--kill-on-invalid-dep=yes"] if jobs else []),
               *sbatch_args, str(script), stage, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            if jobs:
                subprocess.run(["scancel", *map(str, jobs)], capture_output=True)
            raise UsageError(f"sbatch failed ({proc.stderr.strip() or proc.returncode}); check the SLURM "
                             "cluster and the --sbatch options")
        jobs.append(int(proc.stdout.strip().split(";")[0]))
    return jobs




def _firsts(work: Path, n_files: int) -> np.ndarray:
    """The index of each file's first document (and the total), from the records' sizes."""
    sizes = [(work / "records" / f"{f}.bin").stat().st_size // RECORD.itemsize for f in range(n_files)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def run_stage(stage: str, out: Path, task: int = 0) -> None:
    """One job's work (`task`: its array task id)."""
    work = out / ".work"
    run = json.loads((work / "slurm.json").read_text())
    s, files, bc = run["settings"], run["files"], run["batch_chars"]
    mine = range(task, len(files), run["tasks"])  # the file numbers of this array task
    pool = Pool(0, s["filters"], s["dedup"])
    print(f"prepare {stage} on {socket.gethostname()} (node {os.environ.get('SLURMD_NODENAME', '-')}), task {task}",
          flush=True)
    if stage == "analyse":
        (work / "records").mkdir(exist_ok=True)
        for f in mine:
            tmp = work / "records" / f".{f}.bin.tmp"
            P.write_records(s, files[f], tmp, pool, bc)
            os.replace(tmp, work / "records" / f"{f}.bin")
    elif stage == "tokenizer":
        if not (work / "analyse.json").is_file():
            with open(work / ".records.tmp", "wb") as dst:
                for f in range(len(files)):
                    dst.write((work / "records" / f"{f}.bin").read_bytes())
            os.replace(work / ".records.tmp", work / "records.bin")
        P.resolve(s, work)
        P.prepare_tokenizer(s, out, work, pool, np.load(work / "split.npy"), bc)
    elif stage == "encode":
        (work / "tokens").mkdir(exist_ok=True)
        split, firsts, args = np.load(work / "split.npy"), _firsts(work, len(files)), P.encode_args(s, out)
        for f in mine:
            lengths, tmp = [], work / "tokens" / f".{f}.bin.tmp"
            docs = P.kept(s, split, lambda i, c: True, files[f], int(firsts[f]))
            with open(tmp, "wb") as dst:
                for _, ids in pool.map(encode, P.batches(docs, bc), *args):
                    lengths += [len(a) for a in ids]
                    dst.write(b"".join(a.tobytes() for a in ids))
            np.save(work / "tokens" / f"{f}.len.npy", np.array(lengths, dtype=np.int64))
            os.replace(tmp, work / "tokens" / f"{f}.bin")
    elif stage == "merge":
        split, firsts, dtype = np.load(work / "split.npy"), _firsts(work, len(files)), P.Vocab(out / "tokenizer").dtype

        def tokens(wanted):
            for f in range(len(files)):
                ids = np.memmap(work / "tokens" / f"{f}.bin", dtype=dtype, mode="r") \
                    if (work / "tokens" / f"{f}.bin").stat().st_size else np.zeros(0, dtype)
                lengths = np.load(work / "tokens" / f"{f}.len.npy")
                docs = firsts[f] + np.flatnonzero(split[firsts[f]:firsts[f + 1]])
                for i, end, n in zip(docs, np.cumsum(lengths), lengths):
                    if wanted(i, split[i]):
                        yield int(i), np.asarray(ids[end - n:end])
        shards = P.write_shards(s, out, run["key"], split, tokens)
        P.finish(s, out, run["key"], json.loads((work / "analyse.json").read_text()), shards,
                 time.time() - run["submitted"])
        print(P.report(json.loads((out / "manifest.json").read_text())))
    else:
        raise UsageError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m zerokit.data.prepare_slurm {{{','.join(STAGES)}}} OUT_DIR (the jobs "
              "`zerokit prepare --slurm-tasks` submits run this)", file=sys.stderr)
        return 2
    try:
        run_stage(argv[0], Path(argv[1]), int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
