"""Data pipeline throughput: tokenizer training, corpus packing (tokenization) and the loaders.

    .venv/bin/python bench/data_throughput.py [--vocab 2048] [--block 256] [--micro 32]

Runs on the embedded tiny-shakespeare, always tokenizing from scratch into a temp dir (no cache),
and prints one table. Compare the loader rows with the tokens/s a training run logs: the share of
step time spent in the loader is roughly training tokens/s divided by loader tokens/s.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # our packing parallelises with threads itself

from zerokit.data import BlockLoader, corpus_texts, eval_batches, get_tokenizer, pack_corpus, read_index  # noqa: E402
from zerokit.data.packed import DEFAULT_CORPUS, usable_cores  # noqa: E402


def best_of(n: int, fn) -> tuple[float, object]:
    """Fastest of n runs (the machine is shared: the minimum is the least disturbed) and the last result."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = usable_cores()
    rows = []  # (what, seconds, amount, unit)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = corpus_texts(None)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        runs = iter(range(1_000_000))  # a fresh cache root per run, so nothing is a cache hit
        sec, (tok_dir, tok) = best_of(args.repeats, lambda: get_tokenizer(None, texts, args.vocab, tmp / f"tok{next(runs)}"))
        rows.append((f"train BPE tokenizer (vocab {args.vocab}, train split)", sec, mb / sec, "MB/s"))

        corpus_mb = DEFAULT_CORPUS.stat().st_size / 1e6
        for workers in sorted({1, cores}):
            sec, data_dir = best_of(args.repeats, lambda: pack_corpus(None, tok_dir, tok, tmp / f"data{next(runs)}", workers=workers))
            rows.append((f"pack tiny-shakespeare, {workers} thread(s)", sec, corpus_mb / sec, "MB/s"))
        n_train = read_index(data_dir)["splits"]["train"]["tokens"]

        loader = BlockLoader(data_dir, "train", args.block, args.micro, grad_accum=1, rank=0, world_size=1, seed=0)
        steps = 200
        sec, _ = best_of(args.repeats, lambda: [loader.next_window() for _ in range(steps)])
        served = steps * args.micro * args.block
        rows.append((f"BlockLoader.next_window (block {args.block}, micro {args.micro})", sec, served / sec, "tokens/s"))

        def run_eval():
            return sum(b["input_ids"].numel() for b in eval_batches(data_dir, "val", args.block, args.micro))
        sec, n_eval = best_of(args.repeats, run_eval)
        rows.append(("eval_batches over the val split", sec, n_eval / sec, "tokens/s"))

    print(f"\ndata throughput on {cores} core(s), tiny-shakespeare {corpus_mb:.2f} MB, {n_train:,} train tokens\n")
    print(f"{'what':58s} {'seconds':>8s} {'throughput':>16s}")
    for what, sec, rate, unit in rows:
        print(f"{what:58s} {sec:8.3f} {rate:>12,.1f} {unit}")


if __name__ == "__main__":
    main()
