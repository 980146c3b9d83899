"""`zerokit prepare SOURCE OUT_DIR`: a corpus -> filtered, deduplicated, tokenized fixed-size token shards.

Three streaming passes over the source (zerokit.data.sources), in worker processes (zerokit.data.prepare_workers;
one pool for all three; zerokit.data.prepare_slurm runs the same passes as SLURM array jobs):
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

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from zerokit.data import quality
from zerokit.data.prepare_workers import RECORD, Pool, Vocab, analyse, encode, rewrite
from zerokit.data.shards import ShardWriter, atomic_json
from zerokit.data.sources import fingerprint, iter_documents
from zerokit.errors import UsageError

log = logging.getLogger("zerokit")

VERSION = 1
SPLITS = {1: "train", 2: "val"}
LANGUAGE_ID = ("not run: datatrove's LanguageFilter downloads its fastText model at run time, which an "
               "offline machine cannot do")
# the files of a tokenizer directory that a given tokenizer is copied with
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece", "sentencepiece",
                   "chat_template")
DEFAULTS = {"text_field": "text", "filters": [], "dedup": [], "tokenizer": "train", "vocab_size": 4096,
            "shard_tokens": 1 << 24, "val_fraction": 0.01, "sample_mb": 100.0}

def batches(docs, batch_chars: int):
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

def write_records(s: dict, source: str, path: Path, pool: Pool, batch_chars: int) -> None:
    """Pass 1's work: one RECORD a document of `source` (the corpus, or one of its files) into `path`."""
    with open(path, "wb") as f:
        docs = enumerate(iter_documents(source, s["text_field"]))
        # without filters or dedup this pass only counts bytes: too little work to ship to the workers
        for _, rec in pool.map(analyse, batches(docs, batch_chars), inline=not (s["filters"] or s["dedup"])):
            f.write(rec.tobytes())


def _pass_analyse(s: dict, work: Path, pool: Pool, batch_chars: int) -> dict:
    """Pass 1 -> work/records.bin (one RECORD a document), work/split.npy and the step counts."""
    if not (work / "analyse.json").is_file():
        write_records(s, s["source"], work / "records.bin", pool, batch_chars)
    return resolve(s, work)


def resolve(s: dict, work: Path) -> dict:
    """work/records.bin -> the duplicates resolved, work/split.npy and the counts (work/analyse.json)."""
    done = work / "analyse.json"
    if done.is_file():
        return json.loads(done.read_text())
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


def kept(s: dict, split: np.ndarray, wanted, source: str | None = None, first: int = 0):
    """(index, text) of the documents whose split code passes `wanted(index, code)`; of one file of the
    corpus (`source`, whose first document has index `first`), or of all of it."""
    for i, text in enumerate(iter_documents(source or s["source"], s["text_field"]), first):
        if split[i] and wanted(i, split[i]):
            yield i, text


def _rewrites(s: dict) -> bool:
    """Whether a filter changes the text it keeps (then every pass after the first runs it again)."""
    return any(f in quality.REWRITES for f in s["filters"])


def prepare_tokenizer(s: dict, out: Path, work: Path, pool: Pool, split: np.ndarray, batch_chars: int) -> Path:
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
            docs = batches(kept(s, split, lambda i, c: c == 1), batch_chars)
            texts = (t for _, b in (pool.map(rewrite, docs) if _rewrites(s) else docs) for t in b)
            sample = take_sample(texts, s["sample_mb"])
            tok = AutoTokenizer.from_pretrained(train_tokenizer(sample, s["vocab_size"], work / "tokenizer-cache", spec))
        else:
            tok = get_tokenizer(spec, None, s["vocab_size"], work)[1]
        tok.save_pretrained(tmp)
    if Vocab(tmp).eos_token_id is None:
        raise UsageError(f"tokenizer {spec} has no eos token; prepare ends each document with it. Give one with eos_token")
    os.rename(tmp, final)
    return final


def encode_args(s: dict, out: Path) -> tuple:
    """encode()'s arguments after the texts."""
    tok = Vocab(out / "tokenizer")
    return str(out / "tokenizer" / "tokenizer.json"), _rewrites(s), tok.eos_token_id, tok.dtype


def _pass_encode(s: dict, out: Path, pool: Pool, split: np.ndarray, batch_chars: int, key: str) -> dict:
    """Pass 3: the shards of both splits; returns each split's shard list."""
    def tokens(wanted):
        for idx, ids in pool.map(encode, batches(kept(s, split, wanted), batch_chars), *encode_args(s, out)):
            yield from zip(idx, ids)
    return write_shards(s, out, key, split, tokens)


def write_shards(s: dict, out: Path, key: str, split: np.ndarray, tokens) -> dict:
    """The shards of both splits from `tokens(wanted)`: (index, token ids) of the kept documents that pass
    `wanted(index, split code)`, in order (a resumed run asks only for those after its last complete shard)."""
    dtype = Vocab(out / "tokenizer").dtype
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
    for i, a in tokens(lambda i, c: start[c] is not None and i >= start[c]):
        c = int(split[i])
        skip = writers[c].state["skip_tokens"] if i == start[c] else 0
        writers[c].add(a[skip:], i, skip)
    for w in writers.values():
        w.close()
    return {w.split: w.state["shards"] for w in writers.values()}


# ---------------------------------------------------------------------------------------------- driver

def prepare(source: str, out_dir: str | Path, workers: int = 2, batch_mb: float = 4.0, **settings) -> Path:
    """Prepare `source` into `out_dir` (see the module docstring); settings are DEFAULTS' keys. Returns out_dir."""
    s, files, key = check_settings(source, workers, batch_mb, settings)
    out = Path(out_dir).expanduser()
    if start_out_dir(out, key):
        log.info("already prepared: %s", out)
        return out
    work = out / ".work"
    t0 = time.perf_counter()
    # batch_mb a task, but at most 1/8 of a worker's share of the corpus: a small corpus in a few big batches
    # would leave a worker idle for the last of them
    share = sum(f[1] for f in files) / (8 * max(workers, 1)) if files else float("inf")
    batch_chars = int(min(batch_mb * 1e6, max(share, 1 << 16)))
    pool = Pool(workers, s["filters"], s["dedup"])
    try:
        info = _pass_analyse(s, work, pool, batch_chars)
        log.info("prepare: analysed %d documents in %.1f s", info["documents_in"], time.perf_counter() - t0)
        split = np.load(work / "split.npy")
        prepare_tokenizer(s, out, work, pool, split, batch_chars)
        log.info("prepare: tokenizer ready at %.1f s", time.perf_counter() - t0)
        shards = _pass_encode(s, out, pool, split, batch_chars, key)
    finally:
        pool.close()
    finish(s, out, key, info, shards, time.perf_counter() - t0)
    return out


def check_settings(source: str, workers: int, batch_mb: float, settings: dict) -> tuple[dict, list | None, str]:
    """(the settings checked and completed, the source files' fingerprint, the key naming both)."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    s = {**DEFAULTS, **settings, "source": str(source)}
    s["filters"] = quality.parse(s["filters"], quality.FILTERS, "filter")
    s["dedup"] = quality.parse(s["dedup"], quality.DEDUP, "dedup method")
    if not 0 < s["val_fraction"] < 1 or s["shard_tokens"] < 1 or s["sample_mb"] <= 0 or batch_mb <= 0 or workers < 0:
        raise UsageError("need 0 < val_fraction < 1, shard_tokens >= 1, sample_mb > 0, batch_mb > 0 and workers >= 0")
    files = fingerprint(s["source"])
    key = hashlib.sha256(json.dumps({**s, "fingerprint": files, "version": VERSION}, sort_keys=True).encode()).hexdigest()
    return s, files, key


def start_out_dir(out: Path, key: str) -> bool:
    """True if `out` is prepared with `key` already; else makes sure it is new, empty or this key's (resumed)."""
    manifest_path = out / "manifest.json"
    for path in (manifest_path, out / ".progress.json"):
        if path.is_file() and json.loads(path.read_text()).get("key") != key:
            raise UsageError(f"{out} holds a preparation with other settings or source files; use a new OUT_DIR or delete it")
    if manifest_path.is_file():
        return True
    if out.exists() and (not out.is_dir() or not (out / ".work").is_dir() and any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a prepared directory; use a new or empty OUT_DIR")
    (out / ".work").mkdir(parents=True, exist_ok=True)
    return False


def finish(s: dict, out: Path, key: str, info: dict, shards: dict, seconds: float) -> None:
    """manifest.json last (the directory is complete when it has one), then the work files go."""
    atomic_json(out / "manifest.json", _manifest(s, key, info, shards, out / "tokenizer", seconds))
    shutil.rmtree(out / ".work", ignore_errors=True)
    (out / ".progress.json").unlink(missing_ok=True)


def _manifest(s: dict, key: str, info: dict, shards: dict, tok_dir: Path, seconds: float) -> dict:
    from zerokit.data.tokenizer import TRAIN_KINDS, token_byte_lengths, tokenizer_hash
    tok = Vocab(tok_dir)
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


def is_prepared(path) -> bool:
    return path is not None and (Path(str(path)).expanduser() / "manifest.json").is_file()
