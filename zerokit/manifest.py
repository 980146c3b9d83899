"""A checkpoint's manifest.json: what was written (every file, its size and sha256) and what it
fits (the config keys that fix tensor shapes, the engine). Written last, just before the folder is
renamed into place, so a folder with a manifest is complete; checked before anything is loaded.

Hashing and checking are shared out between the ranks (file i goes to rank i % world) and the
results gathered, so every rank reaches the same verdict.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from zerokit.config import MISSING, lookup
from zerokit.dist import DistInfo, all_gather_objects, broadcast_object

MANIFEST = "manifest.json"
FORMAT = 2  # trainer_state.json carries it: such a checkpoint must have a manifest (older ones have none)

# Config keys that decide tensor shapes (or which tensors exist): a checkpoint only loads into a run
# that agrees on all of them. Everything else (steps, lr, eval, logging) may change on resume.
SHAPE_KEYS = ("model.preset", "model.kv_heads", "model.name_or_path", "data.tokenizer", "data.vocab_size", "data.block_size",
              "data.num_labels", "peft", "lora.r", "lora.target_modules", "optim.name", "parallel.pipeline")


def _normal(value):
    """Comparable form: a path that exists as its absolute form; a comma list as a list."""
    if isinstance(value, str):
        if "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        if os.path.exists(os.path.expanduser(value)):
            return str(Path(value).expanduser().resolve())
    return value


def identity(cfg: dict, backend) -> dict:
    """What a checkpoint must agree with to load: the shape keys present in this recipe's config, and
    the DeepSpeed ZeRO stage (each stage lays its files out differently)."""
    shape = {k: _normal(v) for k in SHAPE_KEYS if (v := lookup(cfg, k)) is not MISSING}
    if shape.get("data.tokenizer", "train") != "train":
        shape.pop("data.vocab_size", None)  # only a trained tokenizer reads it
    if shape.get("peft") == "none":
        shape = {k: v for k, v in shape.items() if not k.startswith("lora.")}
    return {"config": shape, "zero_stage": getattr(backend, "stage", None)}


def identity_mismatch(saved: dict, now: dict) -> str | None:
    """The first difference that stops `saved` (a checkpoint's identity) loading into this run."""
    for key, value in now["config"].items():
        if key in saved["config"] and _normal(saved["config"][key]) != value:
            return f"{key}={saved['config'][key]} (this run: {key}={value})"
    if saved.get("zero_stage") is not None and now["zero_stage"] is not None \
            and saved["zero_stage"] != now["zero_stage"]:
        return f"DeepSpeed ZeRO stage {saved['zero_stage']} (this run: stage {now['zero_stage']})"
    return None


def _sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
        if sync:  # on disk before the manifest says it is
            os.fsync(f.fileno())
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, info: DistInfo, extra: dict) -> None:
    """All ranks call this once every file is in `folder`; rank 0 writes manifest.json (fsynced)."""
    names = broadcast_object(_files(folder) if info.is_main else None)
    mine = {n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n, sync=True)}
            for n in names[info.rank::info.world_size]}
    files = {n: e for part in all_gather_objects(mine) for n, e in part.items()}
    if info.is_main:
        path = folder / MANIFEST
        with open(path, "w") as f:
            json.dump({"format": FORMAT, **extra, "files": dict(sorted(files.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def read_manifest(folder: Path) -> dict | None:
    """The manifest, None if the folder has none (an older checkpoint); raises ValueError if unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
        return manifest
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{MANIFEST} unreadable ({e})") from None


def _trainer_state_format(folder: Path) -> int | None:
    try:
        return json.loads((folder / "trainer_state.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def problems(folder: Path, info: DistInfo | None = None, hashes: bool = True) -> list[str] | None:
    """What is wrong with a checkpoint folder: [] if nothing, None if it is an older checkpoint without
    a manifest (nothing to check against). With `info`, collective (every rank gets the same list);
    `hashes=False` checks presence and sizes only (cheap, for retention)."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ValueError as e:
        return [str(e)]
    if manifest is None:
        if _trainer_state_format(folder) == FORMAT:
            return [f"{MANIFEST} missing"]
        return None if (folder / "trainer_state.json").is_file() else ["no trainer_state.json"]
    names = sorted(manifest["files"])
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    found = []
    for name in names[rank::world]:
        want, path = manifest["files"][name], folder / name
        if not path.is_file():
            found.append(f"{name} missing")
        elif path.stat().st_size != want["size"]:
            found.append(f"{name} has {path.stat().st_size} bytes, {want['size']} written")
        elif hashes and _sha256(path) != want["sha256"]:
            found.append(f"{name} sha256 differs from the one written")
    if info:
        found = [p for part in all_gather_objects(found) for p in part]
    return sorted(found)
