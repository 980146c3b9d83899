"""The `zerokit prepare` command line: zerokit.data.prepare here, or its SLURM jobs (zerokit.data.prepare_slurm)."""
from __future__ import annotations

import argparse
import json
import logging

from zerokit.data import prepare as P
from zerokit.data import quality
from zerokit.data.prepare_slurm import submit


def prepare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zerokit prepare", description=P.__doc__.split("\n\n")[0],
                                epilog="example:\n  zerokit prepare 'data/*.jsonl.gz' prepared/web --dedup "
                                       "--filters all --tokenizer sentencepiece_unigram --workers 8",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a .txt/.jsonl/.jsonl.gz/.parquet file, a folder or glob of them, or a datasets name")
    p.add_argument("out_dir", help="the prepared directory (a rerun with the same arguments resumes it)")
    p.add_argument("--dedup", nargs="?", const="exact,minhash", default="",
                   help="duplicate removal: exact, minhash, or both (the default when given bare; a bare "
                        "--dedup goes after SOURCE OUT_DIR, or write --dedup=exact,minhash)")
    p.add_argument("--filters", default="", help="comma list of " + ", ".join(quality.FILTERS) + ", or all")
    p.add_argument("--tokenizer", default="train", help="train (byte-level BPE), sentencepiece_bpe, "
                   "sentencepiece_unigram, a tokenizer directory or a hub name")
    p.add_argument("--vocab-size", type=int, default=P.DEFAULTS["vocab_size"])
    p.add_argument("--workers", type=int, default=2, help="worker processes (0: in this process)")
    p.add_argument("--text-field", default="text", help="JSONL/parquet/datasets field(s); a comma list joins them")
    p.add_argument("--val-fraction", type=float, default=P.DEFAULTS["val_fraction"])
    p.add_argument("--shard-tokens", type=int, default=P.DEFAULTS["shard_tokens"], help="tokens per shard")
    p.add_argument("--sample-mb", type=float, default=P.DEFAULTS["sample_mb"], help="text the tokenizer trains on")
    p.add_argument("--batch-mb", type=float, default=4.0, help="text per worker task (memory: ~2 x workers x this)")
    p.add_argument("--slurm-tasks", type=int, default=0, help="run as SLURM array jobs of this many tasks instead "
                   "(zerokit.data.prepare_slurm: submits and returns; the same OUT_DIR as a local run)")
    p.add_argument("--sbatch", default="", help="with --slurm-tasks: extra sbatch options, e.g. '--partition=cpu'")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = dict(text_field=a.text_field, filters=a.filters, dedup=a.dedup, tokenizer=a.tokenizer,
                    vocab_size=a.vocab_size, shard_tokens=a.shard_tokens, val_fraction=a.val_fraction,
                    sample_mb=a.sample_mb)
    if a.slurm_tasks:
        jobs = submit(a.source, a.out_dir, a.slurm_tasks, a.sbatch.split(), a.batch_mb, **settings)
        print(f"submitted jobs {' '.join(map(str, jobs))} (analyse, tokenizer, encode, merge); the last writes "
              f"{a.out_dir}/manifest.json" if jobs else f"already prepared: {a.out_dir}")
        return 0
    out = P.prepare(a.source, a.out_dir, a.workers, a.batch_mb, **settings)
    print(P.report(json.loads((out / "manifest.json").read_text())))
    print(f"prepared: {out}")
    return 0
