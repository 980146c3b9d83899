"""Pack a corpus into flat token shards, and serve training / eval windows from them.

A packed directory (one per source x tokenizer x settings, named by their content hash) holds:
  train.bin, val.bin   token ids as a flat array (uint16 when the vocab fits, else uint32);
                       documents are separated by the eos token
  token_bytes.npy      UTF-8 byte length of each token id, so evaluation reports bits per byte
                       without needing the tokenizer
  index.json           dtype, per-split token / byte / document counts, hashes, settings, format version
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from zerokit.data.records import jsonl_texts
from zerokit.data.tokenizer import token_byte_lengths, tokenizer_hash
from zerokit.errors import UsageError

log = logging.getLogger("zerokit")

FORMAT_VERSION = 1
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "assets" / "tinyshakespeare.txt"
# Long texts are tokenized in pieces of about this many characters, so both cores get work.
CHUNK_CHARS = 1 << 16
# Epoch orders up to this many windows are explicit arrays (64 MB of int32); larger ones are computed per index.
EXPLICIT_ORDER_MAX = 1 << 24
# Pieces are cut right after a "\n" that has non-space on both sides: GPT-2-style pre-tokenizers never
# merge across such a newline, so the pieces tokenize to exactly the tokens of the whole text.
_CUT = re.compile(r"\S\n(?=\S)")


# ---------------------------------------------------------------------------------------------- sources

def _read_jsonl(path: Path, fields: list[str]) -> list[str]:
    return list(jsonl_texts(path, fields))


def _load_hub(spec: str, fields: list[str]) -> tuple[str, list[str], str]:
    import datasets  # heavy (pyarrow, pandas): imported only for hub sources

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # datasets raises many types (not found, offline, bad config); all mean the same here
        raise UsageError(
            f"corpus not found: {spec!r} is neither a local file/folder nor a loadable datasets hub name "
            f"({e.__class__.__name__}: {e}); offline machines need a local .txt/.jsonl path or 'tinyshakespeare'"
        ) from e
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise UsageError(f"dataset {spec!r} has no column(s) {missing} (it has {ds.column_names}); set text_field")
    docs = ["\n".join(row[f] for f in fields) for row in ds.select_columns(fields)]
    return name.replace("/", "_"), docs, hashlib.sha256(ds._fingerprint.encode()).hexdigest()


def _load_documents(source: str | Path | None, text_field: str) -> tuple[str, list[str], str]:
    """(short name, documents, content hash) of a source; see pack_corpus for what a source may be."""
    fields = [f.strip() for f in text_field.split(",") if f.strip()]
    default = source is None or str(source) == "tinyshakespeare"
    path = DEFAULT_CORPUS if default else Path(source).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl"))
        if not files:
            raise UsageError(f"no .txt or .jsonl files in corpus folder {path}; add some or point at a file")
    elif path.is_file():
        files = [path]
    elif isinstance(source, Path) or str(source).startswith(("/", ".", "~")) or path.suffix in (".txt", ".jsonl", ".json"):
        raise UsageError(f"corpus not found: {path}; pass an existing file or folder, 'tinyshakespeare', or a datasets hub name")
    else:
        return _load_hub(str(source), fields)

    h = hashlib.sha256(json.dumps(fields).encode())
    docs = []
    for f in files:
        data = f.read_bytes()
        # File names matter in a folder (they fix document order), not for a single file.
        h.update(f"{f.relative_to(path) if path.is_dir() else ''}\0{len(data)}\0".encode())
        h.update(data)
        if f.suffix == ".jsonl":
            docs.extend(_read_jsonl(f, fields))
        else:
            try:
                docs.append(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UsageError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from e
    if not any(d.strip() for d in docs):
        raise UsageError(f"corpus {path} is empty (no text in {len(files)} file(s)); point data.corpus at files with text")
    name = "tinyshakespeare" if default else path.name if path.is_dir() else f"{path.parent.name}-{path.stem}"
    return name, docs, h.hexdigest()


def _split(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) documents: the last val_fraction of the documents, or of the bytes of a single text."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    docs = [d for d in docs if d]
    if len(docs) == 1:  # one continuous text: nanoGPT-style byte split, moved to the next line start
        data = docs[0].encode("utf-8")
        at = int(len(data) * (1 - val_fraction))
        cut = data.find(b"\n", at) + 1
        if not 0 < cut < len(data):  # no newline after the point: split mid-line, on a UTF-8 character boundary
            cut = at
            while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
                cut -= 1
        train, val = data[:cut].decode("utf-8"), data[cut:].decode("utf-8")
        if not train or not val:
            raise UsageError(f"corpus of {len(data)} bytes is too small to split with val_fraction={val_fraction}; use more text")
        return [train], [val]
    n_val = max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise UsageError(f"corpus has {len(docs)} non-empty documents, too few to split with val_fraction={val_fraction}")
    return docs[:-n_val], docs[-n_val:]


def corpus_texts(source: str | Path | None = None, text_field: str = "text", val_fraction: float = 0.1) -> list[str]:
    """The training-split documents of `source` (what a tokenizer should be trained on: never the val split)."""
    return _split(_load_documents(source, text_field)[1], val_fraction)[0]


def source_fingerprint(source: str | Path | None) -> list | None:
    """(relative path, size, mtime) of each file a local source reads, the cheap stand-in for its
    content hash (as make does); None for a datasets hub name or a path that does not exist."""
    default = source is None or str(source) == "tinyshakespeare"
    path = DEFAULT_CORPUS if default else Path(source).expanduser()
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl")), path
    else:
        return None
    return [str(path.resolve())] + [[str(f.relative_to(root)), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


# ---------------------------------------------------------------------------------------------- packing

def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, e.g. under SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tokenize(docs: list[str], backend, eos_id: int, dtype: type, workers: int) -> np.ndarray:
    """Token ids of `docs`, with eos between documents, using `workers` threads.

    Threads suffice because tokenizers releases the GIL inside encode_batch; long documents are cut into
    pieces (tokenization-neutral, see _CUT) and small ones batched, so each call carries ~CHUNK_CHARS.
    """
    pieces, owner = [], []  # owner[k]: index of the document that piece k belongs to
    for i, doc in enumerate(docs):
        start = 0
        while len(doc) - start > CHUNK_CHARS and (m := _CUT.search(doc, start + CHUNK_CHARS)):
            pieces.append(doc[start:m.end()])
            owner.append(i)
            start = m.end()
        pieces.append(doc[start:])
        owner.append(i)
    batches, size = [[]], 0
    for p in pieces:
        if size >= CHUNK_CHARS:
            batches.append([])
            size = 0
        batches[-1].append(p)
        size += len(p)

    def encode(batch: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=dtype) for e in backend.encode_batch_fast(batch, add_special_tokens=False)]

    with ThreadPoolExecutor(workers) as pool:
        arrays = [a for out in pool.map(encode, batches) for a in out]
    eos = np.array([eos_id], dtype=dtype)
    parts = []
    for k, a in enumerate(arrays):
        parts.append(a)
        if k + 1 < len(arrays) and owner[k + 1] != owner[k]:
            parts.append(eos)
    return np.concatenate(parts)


def pack_corpus(
    source: str | Path | None,
    tokenizer_dir: str,
    tokenizer,
    out_root: Path,
    val_fraction: float = 0.1,
    text_field: str = "text",
    workers: int | None = None,
) -> Path:
    """Tokenize `source` into train/val shards under `out_root`; returns the packed directory (cached).

    source: None or "tinyshakespeare" (shipped with zerokit), a text file (one document), a .jsonl file
    (one document per line, from `text_field`; "a,b" joins several fields with newlines), a folder of
    .txt/.jsonl files, or a datasets hub name "name[:config]" (its train split; needs network access).
    A single text is split by bytes (the last val_fraction is validation); collections by documents.
    `workers` defaults to the cores this process may use.
    """
    name, docs, source_hash = _load_documents(source, text_field)
    tok_hash = tokenizer_hash(tokenizer)
    settings = {"source_hash": source_hash, "tokenizer_hash": tok_hash, "val_fraction": val_fraction,
                "text_field": text_field, "version": FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    out_root = Path(out_root)
    final = out_root / f"{name}-{key[:16]}"
    if (final / "index.json").is_file():  # index.json is written last, so its presence means complete
        log.info("data cache hit: %s", final)
        return final

    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer {tokenizer_dir} has no eos token; packing separates documents with it. Set eos_token")
    train_docs, val_docs = _split(docs, val_fraction)
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    workers = workers or usable_cores()
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_root, prefix=".tmp-pack-"))
    index = {**settings, "source": str(source or "tinyshakespeare"), "tokenizer": tokenizer_dir,
             "dtype": np.dtype(dtype).name, "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id, "splits": {}}
    t0 = time.perf_counter()
    try:
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            ids = _tokenize(split_docs, tokenizer.backend_tokenizer, tokenizer.eos_token_id, dtype, workers)
            ids.tofile(tmp / f"{split}.bin")
            index["splits"][split] = {"tokens": len(ids), "documents": len(split_docs),
                                      "bytes": sum(len(d.encode("utf-8")) for d in split_docs)}
        np.save(tmp / "token_bytes.npy", token_byte_lengths(tokenizer))
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        os.rename(tmp, final)  # atomic: readers see a complete directory or none
    except OSError:
        if not (final / "index.json").is_file():
            raise
        log.info("data packed concurrently by another process; using %s", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = sum(s["bytes"] for s in index["splits"].values()) / 1e6
    log.info("packed %s: train %d / val %d tokens, %.1f MB at %.1f MB/s: %s", index["source"],
             index["splits"]["train"]["tokens"], index["splits"]["val"]["tokens"], mb, mb / (time.perf_counter() - t0), final)
    return final


def read_index(data_dir: str | Path) -> dict:
    """index.json of a packed directory, or manifest.json of a prepared one (zerokit prepare)."""
    path = Path(data_dir) / "index.json"
    if not path.is_file() and (Path(data_dir) / "manifest.json").is_file():
        path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{data_dir} is not a packed data directory (no index.json); create it with pack_corpus")
    return json.loads(path.read_text())


def _open_split(data_dir: str | Path, split: str) -> np.memmap:
    index = read_index(data_dir)
    if split not in index["splits"]:
        raise UsageError(f"no split {split!r} in {data_dir}; use one of {sorted(index['splits'])}")
    if "shards" in index["splits"][split]:  # a prepared directory: the split's shards as one array
        from zerokit.data.shards import ShardedTokens
        shards, itemsize = index["splits"][split]["shards"], np.dtype(index["dtype"]).itemsize
        for s in shards:  # sizes only (a stat each): no rank reads or hashes the shards to open them
            path = Path(data_dir) / s["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != s["tokens"] * itemsize:
                raise UsageError(f"shard {path} is {'missing' if size is None else f'{size} bytes'}, its manifest says "
                                 f"{s['tokens'] * itemsize}; prepare the corpus again (zerokit prepare) into a new folder")
        return ShardedTokens(data_dir, shards, index["dtype"])
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=index["dtype"], mode="r")


def _to_batch(tokens: np.memmap, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(rows, input_ids, targets) of the windows tokens[s : s+T+1], gathered in one vectorised read."""
    rows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    t = torch.from_numpy(rows)
    return rows, t[:, :-1].contiguous(), t[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------- loading

class BlockLoader:
    """Training windows of `block_size` (+1 for the shifted targets) for one rank.

    Determinism contract: the global sample stream depends only on (data, block_size, seed). Epoch e
    is a permutation (seeded by (seed, e)) of the non-overlapping windows tokens[o+i*T : o+i*T+T+1],
    with an offset o in [0, T) also seeded by (seed, e), so epochs see different boundaries. Every
    epoch has the same number of windows, (n_tokens - T) // T, which fits any offset. The permutation is
    rng.permutation's, held as an array, up to EXPLICIT_ORDER_MAX windows; beyond, a keyed Feistel
    permutation (zerokit.data.permute) evaluated at the indices a batch needs, so no rank's memory grows
    with the corpus.
    An optimizer step consumes the next G = micro_batch_size * grad_accum * world_size samples of the
    stream; rank r's micro-batch k takes samples (k * world_size + r) * B ... + B of them. So the set
    of samples in a step does not depend on how it is split over ranks and micro-batches, ranks never
    overlap, and a resume at another world size (same G) continues the same stream.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", block_size: int = 256, micro_batch_size: int = 8,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = True):
        if min(block_size, micro_batch_size, grad_accum, world_size) < 1 or not 0 <= rank < world_size or seed < 0:
            raise UsageError(f"BlockLoader needs block_size, micro_batch_size, grad_accum, world_size >= 1, "
                             f"0 <= rank < world_size and seed >= 0 (got {block_size}, {micro_batch_size}, "
                             f"{grad_accum}, {world_size}, rank {rank}, seed {seed})")
        self.tokens = _open_split(data_dir, split)
        self.split, self.block_size, self.micro_batch_size, self.grad_accum = split, block_size, micro_batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.windows_per_epoch = (len(self.tokens) - block_size) // block_size
        if self.windows_per_epoch < 1:
            raise UsageError(f"the {split} split of {data_dir} has {len(self.tokens)} tokens, too few for windows of "
                             f"block_size={block_size}; lower block_size or use more data")
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinned host memory speeds up .to(cuda, non_blocking)
        self.samples_seen = 0
        self._epochs: dict[int, tuple] = {}  # epoch -> (offset, permutation: an array or IndexPermutation)

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        """(offset, window permutation) of epoch e, a function of (seed, e) only, so all processes agree."""
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            self._epochs = {k: v for k, v in self._epochs.items() if k == e - 1}  # a batch spans at most 2 epochs
            offset = int(rng.integers(self.block_size))
            if self.windows_per_epoch > EXPLICIT_ORDER_MAX:  # memory O(1): a keyed permutation evaluated per index
                from zerokit.data.permute import IndexPermutation
                self._epochs[e] = (offset, IndexPermutation(self.windows_per_epoch, rng))
            else:  # rng.permutation(n) in int32 (the same draws shuffle the same order): 4 bytes a window
                perm = np.arange(self.windows_per_epoch, dtype=np.int32)
                rng.shuffle(perm)
                self._epochs[e] = (offset, perm)
        return self._epochs[e]

    def _starts(self, samples: np.ndarray) -> np.ndarray:
        """Token offset of each global sample index."""
        epochs, pos = np.divmod(samples, self.windows_per_epoch)
        starts = np.empty_like(samples)
        for e in np.unique(epochs):
            offset, perm = self._epoch(int(e))
            mask = epochs == e
            starts[mask] = offset + perm[pos[mask]].astype(np.int64) * self.block_size  # int64: token offsets pass 2**31
        return starts

    def next_window(self) -> list[dict[str, torch.Tensor]]:
        """The `grad_accum` micro-batches of this rank for the next optimizer step."""
        B, base = self.micro_batch_size, self.samples_seen
        out = []
        for k in range(self.grad_accum):
            first = base + (k * self.world_size + self.rank) * B
            _, x, y = _to_batch(self.tokens, self._starts(np.arange(first, first + B)), self.block_size)
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            out.append({"input_ids": x, "targets": y})
        self.samples_seen += self.global_batch
        return out

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "seed": self.seed, "block_size": self.block_size,
                "n_tokens": len(self.tokens), "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue the global stream of `state`; the rank split (world size, micro-batch) may differ."""
        if (state["block_size"], state["n_tokens"]) != (self.block_size, len(self.tokens)):
            raise UsageError(f"loader state is for block_size={state['block_size']} on {state['n_tokens']} tokens, this "
                             f"loader has block_size={self.block_size} on {len(self.tokens)} tokens; resume with the "
                             "same data and block_size")
        self.samples_seen, self.seed = int(state["samples_seen"]), int(state["seed"])
        self._epochs = {}


def eval_batches(data_dir: str | Path, split: str = "val", block_size: int = 256, micro_batch_size: int = 8,
                 rank: int = 0, world_size: int = 1, max_batches: int | None = None) -> Iterator[dict]:
    """Non-overlapping windows covering `split` in order (a tail shorter than a window is left out).

    Rank r takes windows r, r + world_size, ...; every rank yields the same number of batches (a rank
    that runs out repeats a batch with "weight": 0 and "target_bytes": 0) so collectives never hang.
    Each batch has input_ids, targets, weight (1 or 0) and target_bytes, the UTF-8 bytes of its targets:
    bits per byte = sum(weight * token nats) / ln 2 / sum(target_bytes), summed over batches and ranks.
    """
    if min(block_size, micro_batch_size, world_size) < 1 or not 0 <= rank < world_size:
        raise UsageError(f"eval_batches needs block_size, micro_batch_size, world_size >= 1 and 0 <= rank < world_size "
                         f"(got {block_size}, {micro_batch_size}, {world_size}, rank {rank})")
    tokens = _open_split(data_dir, split)
    byte_lens = np.load(Path(data_dir) / "token_bytes.npy")
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise UsageError(f"the {split} split of {data_dir} has {len(tokens)} tokens, fewer than block_size+1="
                         f"{block_size + 1}; lower block_size or raise val_fraction")
    mine = np.arange(rank, n_windows, world_size) * block_size
    per_rank = -(-n_windows // world_size)  # ceil: rank 0's window count, the most any rank has
    n_batches = -(-per_rank // micro_batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        starts, weight = mine[b * micro_batch_size:(b + 1) * micro_batch_size], 1
        if len(starts) == 0:
            starts, weight = np.arange(min(micro_batch_size, n_windows)) * block_size, 0
        rows, x, y = _to_batch(tokens, starts, block_size)
        yield {"input_ids": x, "targets": y, "weight": weight, "target_bytes": weight * int(byte_lens[rows[:, 1:]].sum())}
