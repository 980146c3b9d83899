"""Documents of a corpus, streamed one at a time in a fixed order (memory independent of corpus size).

A source is a file, a folder or a glob of .txt (one document per file), .jsonl / .jsonl.gz (one per line)
and .parquet (one per row) files, 'tinyshakespeare', or a `datasets` name "name[:config]" read with
streaming=True (its train split). The order is the sorted file order, then the order inside each file,
so two passes over an unchanged source see the same documents at the same positions.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator

from zerokit.data.records import jsonl_texts
from zerokit.errors import UsageError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def _kind(path: Path) -> str | None:
    name = path.name
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def source_files(source: str) -> list[Path] | None:
    """The files a local source reads, in order; None for a datasets name."""
    if source in ("", "tinyshakespeare"):
        from zerokit.data.packed import DEFAULT_CORPUS  # here only: packed imports torch (seconds of start-up)
        return [DEFAULT_CORPUS]
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True))
    elif path.is_dir():
        files = sorted(path.rglob("*"))
    elif path.is_file():
        files = [path]
    elif source.startswith(("/", ".", "~")) or _kind(path):
        raise UsageError(f"corpus not found: {source}; pass an existing file, folder or glob, or a datasets name")
    else:
        return None
    files = [f for f in files if f.is_file() and _kind(f)]
    if not files:
        raise UsageError(f"no {'/'.join(SUFFIXES)} files in {source}; point at a folder or glob that has some")
    return files




def _parquet_rows(path: Path, fields: list[str]) -> Iterator[str]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    missing = [k for k in fields if k not in pf.schema_arrow.names]
    if missing:
        raise UsageError(f"{path} has no column(s) {missing} (it has {pf.schema_arrow.names}); set --text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=fields):  # one row group slice at a time
        cols = [batch.column(k).to_pylist() for k in fields]
        for values in zip(*cols):
            yield "\n".join(v or "" for v in values)


def _hub_rows(spec: str, fields: list[str]) -> Iterator[str]:
    import datasets
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for row in ds:
            yield "\n".join(row[k] for k in fields)
    except (KeyError, OSError, ValueError, ConnectionError) as e:
        raise UsageError(f"corpus {spec!r}: not a local path, and the datasets hub could not stream it ({e.__class__.__name__}: "
                         f"{e}); offline machines need a local file, folder or glob") from e


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Every document of `source`, in the fixed order (see the module docstring)."""
    fields = [f.strip() for f in text_field.split(",") if f.strip()]
    files = source_files(source)
    if files is None:
        yield from _hub_rows(source, fields)
        return
    for f in files:
        kind = _kind(f)
        if kind == ".txt":
            try:
                yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from e
        elif kind == ".parquet":
            yield from _parquet_rows(f, fields)
        else:
            yield from jsonl_texts(f, fields)


def fingerprint(source: str) -> list | None:
    """(path, size, mtime) of each file a local source reads: what a resumed run checks is unchanged."""
    files = source_files(source)
    return None if files is None else [[str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]
