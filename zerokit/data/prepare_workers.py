"""The worker-process side of `zerokit prepare` (zerokit.data.prepare): an ordered, memory-bounded pool of
spawned workers, the per-batch tasks they run (analyse: filters and dedup keys; encode: token ids), and the
prepared tokenizer read with the tokenizers library alone."""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from zerokit.data import quality

# one record a document: its status (kept, or the step that removed it), bytes before and after the line
# filters, and its dedup keys
RECORD = np.dtype([("status", "u1"), ("bytes_in", "<u8"), ("bytes", "<u8"), ("exact", "<u8"),
                   ("bands", "<u8", (quality.BANDS,))])

_W: dict = {}  # this worker's state: the cleaner (filters, dedup) and the tokenizer


def _init_worker(filters: list[str], dedup: list[str]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _W["cleaner"] = quality.Cleaner(filters, dedup) if filters or dedup else None
    _W["init"] = (filters, dedup)


def analyse(texts: list[str]) -> np.ndarray:
    out = np.zeros(len(texts), dtype=RECORD)
    out["bytes_in"] = out["bytes"] = [len(t.encode("utf-8")) for t in texts]
    cleaner = _W["cleaner"]
    for r, text in zip(out, texts) if cleaner else ():
        r["status"], kept = cleaner.clean(text)
        r["bytes"] = len(kept.encode("utf-8"))
        if r["status"] == quality.KEPT:
            r["exact"], r["bands"] = cleaner.keys(kept)
    return out


def rewrite(texts: list[str]) -> list[str]:
    cleaner = _W["cleaner"]
    return [cleaner.clean(t, only_rewrites=True)[1] for t in texts] if cleaner else texts


def encode(texts: list[str], tokenizer_json: str, rewrites: bool, eos: int, dtype: str) -> list[np.ndarray]:
    if _W.get("tok_path") != tokenizer_json:  # loaded on first use: one pool serves all three passes
        from tokenizers import Tokenizer
        _W["tok"], _W["tok_path"] = Tokenizer.from_file(tokenizer_json), tokenizer_json
    encs = _W["tok"].encode_batch_fast(rewrite(texts) if rewrites else texts, add_special_tokens=False)
    return [np.array(e.ids + [eos], dtype=dtype) for e in encs]


class Pool:
    """Ordered map over batches with at most 2 x workers batches in flight (memory bounded); workers=0, or
    map(inline=True) for work too light to ship to a worker, runs in this process. The workers start at once
    (spawn costs each an interpreter and its imports), so their start-up overlaps whatever runs inline first.
    They are forked where that is safe (Linux, torch not loaded: its thread pools do not survive a fork, and a
    recipe may call prepare): a fork costs ~0.01 CPU s, a spawn ~0.4 (a tenth of encoding 11 MB on 2 cores)."""

    def __init__(self, workers: int, *init):
        fork = sys.platform == "linux" and "torch" not in sys.modules
        ctx = get_context("fork" if fork else "spawn")
        self.pool = ProcessPoolExecutor(workers, ctx, _init_worker, init) if workers else None
        self.depth, self.init = 2 * max(workers, 1), init
        for _ in range(workers):
            self.pool.submit(int)

    def map(self, fn, batches, *args, inline: bool = False):
        pool = None if inline else self.pool
        if pool is None and _W.get("init") != self.init:  # this process as the worker, for these settings
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


class Vocab:
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
