"""Fixed-size token shards: a writer that publishes each shard atomically and records where the next one
starts (so a killed run resumes from its last complete shard), and a reader that shows a split's shards
as one flat token array (memory-mapped; a window may cross a shard boundary)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file and a rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1).encode())


class ShardWriter:
    """Token ids of one split into `<dir>/<split>_NNNNN.bin`, `shard_tokens` each (the last one shorter).

    `state` is what a resumed run needs: the shards done (file, tokens, sha256) and the document (its index
    in the source stream, and how many of its tokens the done shards already hold) the next shard starts at.
    `on_shard(state)` is called after each shard is on disk, to persist the state.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype, state: dict | None, on_shard):
        self.out_dir, self.split, self.shard_tokens, self.dtype = Path(out_dir), split, shard_tokens, np.dtype(dtype)
        self.state = state or {"shards": [], "next_doc": 0, "skip_tokens": 0}
        self.on_shard = on_shard
        self.buf = np.empty(shard_tokens, dtype=self.dtype)
        self.fill = 0

    def add(self, tokens: np.ndarray, doc: int, skipped: int = 0) -> None:
        """Append document `doc`'s tokens (its first `skipped` tokens already in done shards)."""
        pos = 0
        while pos < len(tokens):
            take = min(self.shard_tokens - self.fill, len(tokens) - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                done = pos == len(tokens)
                self._flush(doc + 1 if done else doc, 0 if done else skipped + pos)

    def close(self) -> None:
        if self.fill:
            self._flush(None, 0)

    def _flush(self, next_doc, skip_tokens: int) -> None:
        name = f"{self.split}_{len(self.state['shards']):05d}.bin"
        data = self.buf[:self.fill].tobytes()
        atomic_write(self.out_dir / name, data)
        self.state["shards"].append({"file": name, "tokens": self.fill, "sha256": hashlib.sha256(data).hexdigest()})
        self.state["next_doc"], self.state["skip_tokens"] = next_doc, skip_tokens
        self.fill = 0
        self.on_shard(self.state)


class ShardedTokens:
    """A split's shards as one read-only token array: len() and integer-array indexing (as np.memmap)."""

    def __init__(self, out_dir: Path, shards: list[dict], dtype):
        self.parts = [np.memmap(Path(out_dir) / s["file"], dtype=dtype, mode="r") for s in shards]
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        flat = idx.ravel()
        shard = np.searchsorted(self.bounds, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.parts[s][flat[mask] - self.bounds[s]]
        return out.reshape(idx.shape)
