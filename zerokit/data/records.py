"""Reading a task's records: a local file (.tsv/.csv/.jsonl/.json), a folder of split files, a hub dataset,
or a list of dicts, as a list of dicts; and their columns, checked."""
from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from zerokit.errors import UsageError

_LOCAL_EXTS = (".tsv", ".csv", ".jsonl", ".json")
# File names tried, in order, when a local *folder* is given with a split name.
_SPLIT_FILES = {
    "train": ("train", "train_full"),
    "validation": ("validation", "dev", "val", "valid"),
    "test": ("test",),
}


def load_records(spec: str | os.PathLike | Sequence[dict], split: str = "train") -> list[dict]:
    """Read a split as a list of dicts.

    `spec` is a list of dicts (returned as a copy), a local file (.tsv/.csv/.jsonl/.json; `split`
    is then ignored), a local folder (holding e.g. `dev.tsv` for split "validation"), or a hub
    dataset name, optionally "name:config" (`datasets.load_dataset(name, config, split=split)`).
    """
    if isinstance(spec, (list, tuple)):
        return [dict(r) for r in spec]
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_file(_find_split_file(path, split))
    if path.is_file():
        return _read_file(path)
    if text.lower().endswith(_LOCAL_EXTS) or text.startswith(("/", ".", "~")) or os.sep + os.sep in text:
        raise UsageError(f"data file not found: {text}; check the path (relative paths start from {os.getcwd()})")
    return _load_hub(text, split)


def _find_split_file(folder: Path, split: str) -> Path:
    stems = _SPLIT_FILES.get(split, (split,))
    for stem in stems:
        for ext in _LOCAL_EXTS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    wanted = ", ".join(f"{s}{{{','.join(_LOCAL_EXTS)}}}" for s in stems)
    raise UsageError(f"no file for split {split!r} in {folder}; expected one of {wanted}, or give the file path itself")


def _read_file(path: Path) -> list[dict]:
    ext = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if ext in (".tsv", ".csv"):
                # GLUE TSVs are unquoted (sentences contain bare '"'), so TSV is read without quoting.
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv" else csv.DictReader(f)
                rows = list(reader)
                if reader.fieldnames is None:
                    raise UsageError(f"{path} is empty; it needs a header line naming the columns")
                if any(None in r for r in rows):
                    bad = next(i for i, r in enumerate(rows) if None in r)
                    raise UsageError(f"{path} line {bad + 2} has more fields than the header; fix the row or the delimiter")
                return rows
            if ext == ".jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        rows.append(_json_object(line, path, n))
                return rows
            if ext == ".json":
                data = json.load(f)
                if isinstance(data, dict) and isinstance(data.get("data"), list):
                    data = data["data"]
                if not isinstance(data, list):
                    raise UsageError(f"{path} must hold a JSON list of objects (or {{\"data\": [...]}}); use JSONL for one object per line")
                return [_check_object(r, path, i + 1) for i, r in enumerate(data)]
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); fix the file") from None
    raise UsageError(f"unsupported data file type {path.suffix!r} for {path}; use one of {', '.join(_LOCAL_EXTS)}")


def _json_object(line: str, path: Path, n: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} line {n} is not valid JSON ({e}); fix or remove that line") from None
    return _check_object(obj, path, n)


def _check_object(obj: Any, path: Path, n: int) -> dict:
    if not isinstance(obj, dict):
        raise UsageError(f"{path} record {n} is a {type(obj).__name__}, not an object; each record must be a JSON object")
    return obj


def _load_hub(name: str, split: str) -> list[dict]:
    repo, _, config = name.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # network, unknown name, unknown split: all things the user fixes
        raise UsageError(f"could not load dataset {name!r} split {split!r} from the hub ({type(e).__name__}: {e}); "
                         "check the name and network access, or pass a local file") from None
    return [dict(r) for r in ds]


def column(records: list[dict], col: str, where: str, kind: type) -> list:
    """One column of the records as `kind` (str, or int for labels), naming the record that is wrong."""
    out = []
    for i, r in enumerate(records):
        if col not in r:
            raise UsageError(f"{where}: record {i} has no column {col!r} (columns: {sorted(r)}); "
                             "fix the data or set the task's column option")
        v = r[col]
        if kind is str:
            if not isinstance(v, str):
                raise UsageError(f"{where}: record {i} column {col!r} is {type(v).__name__}, expected text")
        else:
            try:
                v = int(v)
            except (TypeError, ValueError):
                raise UsageError(f"{where}: record {i} column {col!r} = {v!r} is not an integer label") from None
        out.append(v)
    return out


def read_columns(spec, split: str, columns: Sequence[tuple[str, type]]) -> tuple[str, list[list]]:
    """`load_records(spec, split)`'s columns ((name, str or int) pairs), and how to name the split in errors.
    No spec (a task without that split): empty columns."""
    if spec is None:
        return str(split), [[] for _ in columns]
    recs = load_records(spec, split)
    where = f"{spec if not isinstance(spec, (list, tuple)) else 'records'} ({split})"
    return where, [column(recs, col, where, kind) for col, kind in columns]


def jsonl_texts(path: Path, fields: list[str]) -> Iterator[str]:
    """The text of each line of a .jsonl(.gz) corpus: its `fields` joined by newlines (the pre-training recipe
    and `zerokit prepare` read corpora through this one reader)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); each line of a .jsonl corpus must be one JSON object") from e
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise UsageError(f"{path}:{n}: text field(s) {','.join(fields)} missing or not text (line has {keys}); "
                                 f"set data.text_field (zerokit prepare: --text-field)")
            yield "\n".join(row[k] for k in fields)
