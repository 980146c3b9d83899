"""`zerokit prepare SOURCE OUT_DIR`: a corpus -> filtered, deduplicated, tokenized fixed-size token shards.

Three streaming passes over the source (zerokit.data.sources), in worker processes:
  1. analyse   the quality filters and the dedup keys of each document (zerokit.data.quality); then the
               duplicates are resolved and each kept document is put in train or val (whole documents:
               every 1/val_fraction-th kept one, spread over the corpus, not its tail)
  2. sample    the first `sample_mb` of kept training text trains the tokenizer (when one is trained)
  3. encode    kept documents -> token ids (eos after each) -> OUT_DIR/<split>_NNNNN.bin shards
               (zerokit.data.shards), each published atomically; a rerun after a kill goes on from the
               last complete shard and writes the same bytes
OUT_DIR/manifest.json is written last (a prepared directory is complete when it exists): counts of
documents, bytes and tokens, what each step removed, the shards' checksums, the tokenizer and filters.
Memory: about 2 x workers x batch_mb of text in flight (and the largest single document), one shard buffer
per split, the tokenizer sample, and ~32 bytes a document while duplicates are resolved; the
per-document records live on disk.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from zerokit.data import quality
from zerokit.data.shards import ShardWriter, atomic_json
from zerokit.data.sources import fingerprint, iter_documents
from zerokit.errors import UsageError

log = logging.getLogger("zerokit")

VERSION = 1
SPLITS = {1: "train", 2: "val"}
RECORD = np.dtype([("status", "u1"), ("bytes_in", "<u8"), ("bytes", "<u8"), ("exact", "<u8"),
                   ("bands", "<u8", (quality.BANDS,))])
LANGUAGE_ID = ("not run: datatrove's LanguageFilter downloads its fastText model at run time, which an "
               "offline machine cannot do")
# the files of a tokenizer directory that a given tokenizer is copied with
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece", "sentencepiece",
                   "chat_template")
DEFAULTS = {"text_field": "text", "filters": [], "dedup": [], "tokenizer": "train", "vocab_size": 4096,
            "shard_tokens": 1 << 24, "val_fraction": 0.01, "sample_mb": 100.0}

# ---------------------------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(filters: list[str], dedup: list[str]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _W["cleaner"] = quality.Cleaner(filters, dedup) if filters or dedup else None


def _analyse(texts: list[str]) -> np.ndarray:
    out = np.zeros(len(texts), dtype=RECORD)
    out["bytes_in"] = out["bytes"] = [len(t.encode("utf-8")) for t in texts]
    cleaner = _W["cleaner"]
    for r, text in zip(out, texts) if cleaner else ():
        r["status"], kept = cleaner.clean(text)
        r["bytes"] = len(kept.encode("utf-8"))
        if r["status"] == quality.KEPT:
            r["exact"], r["bands"] = cleaner.keys(kept)
    return out


def _rewrite(texts: list[str]) -> list[str]:
    cleaner = _W["cleaner"]
    return [cleaner.clean(t, only_rewrites=True)[1] for t in texts] if cleaner else texts


def _encode(texts: list[str], tokenizer_json: str, rewrite: bool, eos: int, dtype: str) -> list[np.ndarray]:
    if _W.get("tok_path") != tokenizer_json:  # loaded on first use: one pool serves all three passes
        from tokenizers import Tokenizer
        _W["tok"], _W["tok_path"] = Tokenizer.from_file(tokenizer_json), tokenizer_json
    encs = _W["tok"].encode_batch_fast(_rewrite(texts) if rewrite else texts, add_special_tokens=False)
    return [np.array(e.ids + [eos], dtype=dtype) for e in encs]


class _Pool:
    """Ordered map over batches with at most 2 x workers batches in flight (memory bounded); workers=0, or
    map(inline=True) for work too light to ship to a worker, runs in this process. The workers start at once
    (spawn costs each an interpreter and its imports), so their start-up overlaps whatever runs inline first."""

    def __init__(self, workers: int, *init):
        self.pool = ProcessPoolExecutor(workers, get_context("spawn"), _init_worker, init) if workers else None
        self.depth, self.init = 2 * max(workers, 1), init
        for _ in range(workers):
            self.pool.submit(int)

    def map(self, fn, batches, *args, inline: bool = False):
        pool = None if inline else self.pool
        if pool is None and "cleaner" not in _W:
            _init_worker(*self.init)
        pending = deque()
        for meta, texts in batches:
            pending.append((meta, pool.submit(fn, texts, *args) if pool else fn(texts, *args)))
            if len(pending) >= self.depth:
                meta, fut = pending.popleft()
                yield meta, fut.result() if pool else fut
        while pending:
            meta, fut = pending.popleft()
            yield meta, fut.result() if pool else fut

    def close(self):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


class _Vocab:
    """A prepared tokenizer as prepare and the manifest read it (len, get_vocab, added_tokens_decoder,
    backend_tokenizer, eos_token_id: what token_byte_lengths and tokenizer_hash take from a transformers
    tokenizer), from the tokenizers library alone: importing transformers costs seconds of start-up."""
    is_fast = True

    def __init__(self, tok_dir: Path):
        from tokenizers import Tokenizer
        self.backend_tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        self.added_tokens_decoder = self.backend_tokenizer.get_added_tokens_decoder()
        eos = None
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if eos is None and (tok_dir / name).is_file():
                eos = json.loads((tok_dir / name).read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = None if eos is None else self.backend_tokenizer.token_to_id(eos)
        self.dtype = np.dtype(np.uint16 if len(self) < 2**16 else np.uint32).name

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)


def _batches(docs, batch_chars: int):
    """(document indices, texts) groups of about batch_chars characters, from (index, text) pairs."""
    idx, texts, size = [], [], 0
    for i, t in docs:
        idx.append(i)
        texts.append(t)
        size += len(t)
        if size >= batch_chars:
            yield idx, texts
            idx, texts, size = [], [], 0
    if texts:
        yield idx, texts


# ---------------------------------------------------------------------------------------------- passes

def _pass_analyse(s: dict, work: Path, pool: _Pool, batch_chars: int) -> dict:
    """Pass 1 -> work/records.bin (one RECORD a document), work/split.npy and the step counts."""
    done = work / "analyse.json"
    if done.is_file():
        return json.loads(done.read_text())
    with open(work / "records.bin", "wb") as f:
        docs = enumerate(iter_documents(s["source"], s["text_field"]))
        # without filters or dedup this pass only counts bytes: too little work to ship to the workers
        for _, rec in pool.map(_analyse, _batches(docs, batch_chars), inline=not (s["filters"] or s["dedup"])):
            f.write(rec.tobytes())
    rec = np.memmap(work / "records.bin", dtype=RECORD, mode="r+") if (work / "records.bin").stat().st_size else \
        np.zeros(0, RECORD)
    if len(rec) == 0:
        raise UsageError(f"corpus {s['source']} has no documents; point SOURCE at files with text")
    status = np.array(rec["status"])
    names = quality.steps(s["filters"], s["dedup"])
    if "exact" in names:
        quality.resolve_exact(status, rec["exact"], names.index("exact") + 1)
    if "minhash" in names:
        quality.resolve_minhash(status, rec["bands"], names.index("minhash") + 1)
    kept = np.flatnonzero(status == quality.KEPT)
    if len(kept) < 2:
        raise UsageError(f"only {len(kept)} document(s) of {len(rec)} survive the filters; a train/val split needs 2. "
                         "Use more text or fewer filters")
    k = np.arange(len(kept))
    is_val = np.floor((k + 1) * s["val_fraction"]) > np.floor(k * s["val_fraction"])
    if not is_val.any():
        is_val[len(kept) // 2] = True
    split = np.zeros(len(rec), dtype=np.uint8)
    split[kept] = np.where(is_val, 2, 1)
    np.save(work / "split.npy", split)
    n_bytes = np.asarray(rec["bytes"])
    info = {"documents_in": len(rec), "bytes_in": int(rec["bytes_in"].sum()),
            "steps": [{"step": n, "documents_removed": int((status == j + 1).sum()),
                       "bytes_removed": int(n_bytes[status == j + 1].sum())} for j, n in enumerate(names)],
            "splits": {name: {"documents": int((split == c).sum()), "bytes": int(n_bytes[split == c].sum())}
                       for c, name in SPLITS.items()}}
    # bytes the line filters (c4) cut from the documents they passed on, whether a later step kept them or not:
    # bytes_in = kept bytes + every step's bytes_removed + this
    info["bytes_rewritten_away"] = int((rec["bytes_in"] - rec["bytes"]).sum())
    atomic_json(done, info)
    return info


def _kept(s: dict, split: np.ndarray, wanted):
    """(index, text) of the documents whose split code passes `wanted(index, code)`."""
    for i, text in enumerate(iter_documents(s["source"], s["text_field"])):
        if split[i] and wanted(i, split[i]):
            yield i, text


def _rewrites(s: dict) -> bool:
    """Whether a filter changes the text it keeps (then every pass after the first runs it again)."""
    return any(f in quality.REWRITES for f in s["filters"])


def _pass_tokenizer(s: dict, out: Path, work: Path, pool: _Pool, split: np.ndarray, batch_chars: int) -> Path:
    """Pass 2: OUT_DIR/tokenizer, trained on the first sample_mb of kept training text, or copied in."""
    from zerokit.data.tokenizer import TRAIN_KINDS
    final = out / "tokenizer"
    if (final / "tokenizer.json").is_file():
        return final
    spec, given = s["tokenizer"], Path(s["tokenizer"]).expanduser()
    tmp = out / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if spec not in TRAIN_KINDS and (given / "tokenizer.json").is_file() and (given / "tokenizer_config.json").is_file():
        tmp.mkdir()  # a tokenizer directory: its tokenizer files as they are (a model directory's weights stay)
        for f in given.iterdir():
            if f.is_file() and f.name.startswith(TOKENIZER_FILES):
                shutil.copy(f, tmp / f.name)
    else:
        from transformers import AutoTokenizer

        from zerokit.data.tokenizer import get_tokenizer, take_sample, train_tokenizer
        if spec in TRAIN_KINDS:
            docs = _batches(_kept(s, split, lambda i, c: c == 1), batch_chars)
            batches = pool.map(_rewrite, docs) if _rewrites(s) else docs
            sample = take_sample((t for _, texts in batches for t in texts), s["sample_mb"])
            tok = AutoTokenizer.from_pretrained(train_tokenizer(sample, s["vocab_size"], work / "tokenizer-cache", spec))
        else:
            tok = get_tokenizer(spec, None, s["vocab_size"], work)[1]
        tok.save_pretrained(tmp)
    if _Vocab(tmp).eos_token_id is None:
        raise UsageError(f"tokenizer {spec} has no eos token; prepare ends each document with it. Give one with eos_token")
    os.rename(tmp, final)
    return final


def _pass_encode(s: dict, out: Path, pool: _Pool, split: np.ndarray, batch_chars: int, key: str) -> dict:
    """Pass 3: the shards of both splits; returns each split's shard list."""
    tok = _Vocab(out / "tokenizer")
    dtype = tok.dtype
    progress_path = out / ".progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"key": key, "splits": {}}

    def save(_state):
        progress["splits"] = {w.split: w.state for w in writers.values()}
        atomic_json(progress_path, progress)
    writers = {c: ShardWriter(out, name, s["shard_tokens"], dtype, progress["splits"].get(name), save)
               for c, name in SPLITS.items()}
    start = {c: w.state["next_doc"] for c, w in writers.items()}  # None: that split is finished
    if all(v is None for v in start.values()):
        return {w.split: w.state["shards"] for w in writers.values()}
    docs = _kept(s, split, lambda i, c: start[c] is not None and i >= start[c])
    args = str(out / "tokenizer" / "tokenizer.json"), _rewrites(s), tok.eos_token_id, dtype
    for idx, ids in pool.map(_encode, _batches(docs, batch_chars), *args):
        for i, a in zip(idx, ids):
            c = int(split[i])
            skip = writers[c].state["skip_tokens"] if i == start[c] else 0
            writers[c].add(a[skip:], i, skip)
    for w in writers.values():
        w.close()
    return {w.split: w.state["shards"] for w in writers.values()}


# ---------------------------------------------------------------------------------------------- driver

def prepare(source: str, out_dir: str | Path, workers: int = 2, batch_mb: float = 4.0, **settings) -> Path:
    """Prepare `source` into `out_dir` (see the module docstring); settings are DEFAULTS' keys. Returns out_dir."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    s = {**DEFAULTS, **settings, "source": str(source)}
    s["filters"] = quality.parse(s["filters"], quality.FILTERS, "filter")
    s["dedup"] = quality.parse(s["dedup"], quality.DEDUP, "dedup method")
    if not 0 < s["val_fraction"] < 1 or s["shard_tokens"] < 1 or s["sample_mb"] <= 0 or batch_mb <= 0 or workers < 0:
        raise UsageError("need 0 < val_fraction < 1, shard_tokens >= 1, sample_mb > 0, batch_mb > 0 and workers >= 0")
    out = Path(out_dir).expanduser()
    files = fingerprint(s["source"])
    key = hashlib.sha256(json.dumps({**s, "fingerprint": files, "version": VERSION}, sort_keys=True).encode()).hexdigest()
    manifest_path = out / "manifest.json"
    for path in (manifest_path, out / ".progress.json"):
        if path.is_file() and json.loads(path.read_text()).get("key") != key:
            raise UsageError(f"{out} holds a preparation with other settings or source files; use a new OUT_DIR or delete it")
    if manifest_path.is_file():
        log.info("already prepared: %s", out)
        return out
    if out.exists() and (not out.is_dir() or not (out / ".work").is_dir() and any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a prepared directory; use a new or empty OUT_DIR")
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # batch_mb a task, but at most 1/8 of a worker's share of the corpus: a small corpus in a few big batches
    # would leave a worker idle for the last of them
    share = sum(f[1] for f in files) / (8 * max(workers, 1)) if files else float("inf")
    batch_chars = int(min(batch_mb * 1e6, max(share, 1 << 16)))
    pool = _Pool(workers, s["filters"], s["dedup"])
    try:
        info = _pass_analyse(s, work, pool, batch_chars)
        log.info("prepare: analysed %d documents in %.1f s", info["documents_in"], time.perf_counter() - t0)
        split = np.load(work / "split.npy")
        tok_dir = _pass_tokenizer(s, out, work, pool, split, batch_chars)
        log.info("prepare: tokenizer ready at %.1f s", time.perf_counter() - t0)
        shards = _pass_encode(s, out, pool, split, batch_chars, key)
    finally:
        pool.close()
    manifest = _manifest(s, key, info, shards, tok_dir, time.perf_counter() - t0)
    atomic_json(manifest_path, manifest)
    shutil.rmtree(work, ignore_errors=True)
    (out / ".progress.json").unlink(missing_ok=True)
    return out


def _manifest(s: dict, key: str, info: dict, shards: dict, tok_dir: Path, seconds: float) -> dict:
    from zerokit.data.tokenizer import TRAIN_KINDS, token_byte_lengths, tokenizer_hash
    tok = _Vocab(tok_dir)
    np.save(tok_dir.parent / "token_bytes.npy", token_byte_lengths(tok))
    splits = {name: {**info["splits"][name], "tokens": sum(x["tokens"] for x in shards[name]), "shards": shards[name]}
              for name in SPLITS.values()}
    return {
        "format": "zerokit-prepared", "version": VERSION, "key": key, "source": s["source"],
        "text_field": s["text_field"], "documents_in": info["documents_in"], "bytes_in": info["bytes_in"],
        "documents": sum(x["documents"] for x in splits.values()), "bytes": sum(x["bytes"] for x in splits.values()),
        "tokens": sum(x["tokens"] for x in splits.values()), "steps": info["steps"],
        "bytes_rewritten_away": info["bytes_rewritten_away"], "filters": s["filters"], "dedup": s["dedup"],
        "language_id": LANGUAGE_ID, "val_fraction": s["val_fraction"], "shard_tokens": s["shard_tokens"],
        "dtype": tok.dtype, "vocab_size": len(tok),
        "eos_id": tok.eos_token_id, "splits": splits, "seconds": round(seconds, 2),
        "tokenizer": {"dir": "tokenizer", "spec": s["tokenizer"], "hash": tokenizer_hash(tok),
                      "sample_mb": s["sample_mb"] if s["tokenizer"] in TRAIN_KINDS else None},
    }


def report(manifest: dict) -> str:
    """A few lines: what came in, what each step removed, what was kept."""
    lines = [f"{manifest['documents_in']:,} documents ({manifest['bytes_in'] / 1e6:.1f} MB) in"]
    for st in manifest["steps"]:
        lines.append(f"  {st['step']:<18} removed {st['documents_removed']:,} documents ({st['bytes_removed'] / 1e6:.2f} MB)")
    if manifest["bytes_rewritten_away"]:
        lines.append(f"  line filters cut {manifest['bytes_rewritten_away'] / 1e6:.2f} MB from kept documents")
    sp = manifest["splits"]
    lines.append(f"kept {manifest['documents']:,} documents, {manifest['bytes'] / 1e6:.1f} MB, {manifest['tokens']:,} tokens "
                 f"(train {sp['train']['tokens']:,} in {len(sp['train']['shards'])} shard(s), val {sp['val']['tokens']:,}) "
                 f"in {manifest['seconds']:.0f} s; language id {manifest['language_id'].split(':')[0]}")
    return "\n".join(lines)


def prepare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zerokit prepare", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"])
    p.add_argument("--workers", type=int, default=2, help="worker processes (0: in this process)")
    p.add_argument("--text-field", default="text", help="JSONL/parquet/datasets field(s); a comma list joins them")
    p.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"])
    p.add_argument("--shard-tokens", type=int, default=DEFAULTS["shard_tokens"], help="tokens per shard")
    p.add_argument("--sample-mb", type=float, default=DEFAULTS["sample_mb"], help="text the tokenizer trains on")
    p.add_argument("--batch-mb", type=float, default=4.0, help="text per worker task (memory: ~2 x workers x this)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = prepare(a.source, a.out_dir, a.workers, a.batch_mb, text_field=a.text_field, filters=a.filters,
                  dedup=a.dedup, tokenizer=a.tokenizer, vocab_size=a.vocab_size, shard_tokens=a.shard_tokens,
                  val_fraction=a.val_fraction, sample_mb=a.sample_mb)
    print(report(json.loads((out / "manifest.json").read_text())))
    print(f"prepared: {out}")
    return 0


def is_prepared(path) -> bool:
    return path is not None and (Path(str(path)).expanduser() / "manifest.json").is_file()
