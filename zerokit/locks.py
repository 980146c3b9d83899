"""Work one process does while the others on the node wait for it: tokenizing and packing a corpus,
converting a checkpoint. They wait on a file lock, not in a collective, because every collective
gives up after the process group's timeout (train.dist_timeout_s), which a large corpus outlasts."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: str | Path):
    """Hold `<path>.lock` (created beside `path`) for the block; other processes block until it is free."""
    from filelock import FileLock
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        yield
