"""Checkpoints: `<run_dir>/checkpoints/step_<N>/`, never half-written, never silently wrong.

Saving: every rank writes into `step_<N>.tmp/`; then every file is hashed (shared out between the
ranks) and rank 0 writes manifest.json LAST, and renames the folder to `step_<N>` (atomic). A crash
mid-save leaves only a `.tmp` folder, which resume ignores (and the next run removes). A save that
fails (disk full, no permission) removes its temp folder on every rank's agreement, leaves the older
checkpoints as they were, and stops the run with a UsageError.

Resuming: rank 0 lists the candidates, every rank verifies them against their manifests (sizes and
sha256) and the run's shape-fixing config keys (zerokit/manifest.py), so all ranks load the same one.
`resume=auto` takes the newest valid checkpoint; damaged ones are moved aside into
`checkpoints/abandoned/`, never deleted. Resuming from an older step (or starting over with
`resume=none`) moves the newer checkpoints of the old run into `abandoned/` too, so they cannot
win a later `resume=auto`. Retention (`keep`) counts valid checkpoints only.

Layout of one checkpoint:
    deepspeed/ or dcp/      the engine's own sharded state (model, optimizer)
    trainer_state.json      step, tokens seen, data position, backend, world size
    rng_rank<R>.pt          each rank's RNG states (dropout reproduces after resume)
    config.yaml             the run config;   model/  HF config + tokenizer (for export)
    manifest.json           every file's size and sha256, the shape keys, the engine
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from zerokit import manifest as mf
from zerokit.config import MISSING, lookup
from zerokit.dist import DistInfo, all_gather_objects, barrier, broadcast_object
from zerokit.errors import UsageError

log = logging.getLogger("zerokit")

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^step_\d+\.tmp$")
ABANDONED = "abandoned"


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of this run (renamed into place, so complete unless damaged later), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    return json.loads((Path(path) / "trainer_state.json").read_text())["step"]


def move_aside(ckpt: Path, why: str) -> Path:
    """checkpoints/step_N -> checkpoints/abandoned/step_N (a free name): out of resume's and retention's
    sight, kept for the user. Rank 0 only."""
    dest_dir = ckpt.parent / ABANDONED
    dest_dir.mkdir(exist_ok=True)
    dest, k = dest_dir / ckpt.name, 1
    while dest.exists():
        dest, k = dest_dir / f"{ckpt.name}.{k}", k + 1
    ckpt.rename(dest)
    log.warning("moved %s aside to %s (%s)", ckpt, dest, why)
    return dest


# ----------------------------------------------------------------------------- resume

def resolve_resume(resume: str | None, run_dir: Path, info: DistInfo, identity: dict) -> Path | None:
    """The checkpoint to resume from, the same on every rank (collective), or None to start afresh.

    `auto`: the newest valid checkpoint of this run; `none`: none; a path: that checkpoint, which must
    be valid. Raises UsageError (on every rank) for an explicit damaged checkpoint or one whose shape
    keys differ from this run's."""
    fresh = not resume or resume == "none"
    candidates = _on_main(info, lambda: _tidy(Path(run_dir), fresh))
    if fresh:
        return None
    if resume == "auto":
        chosen = _newest_valid(candidates, info)
    else:
        chosen = Path(resume)
        if not chosen.is_dir():
            raise UsageError(f"resume={resume}: no such checkpoint folder; pass a <run_dir>/checkpoints/step_N "
                             f"folder, resume=auto or resume=none")
        found = mf.problems(chosen, info)
        if found:
            raise UsageError(f"resume={resume}: not a usable checkpoint ({'; '.join(found[:3])}); "
                             f"resume from another checkpoint or resume=auto")
    if chosen is None:
        return None
    error = _on_main(info, lambda: _compatibility(chosen, identity))
    if error:
        raise UsageError(error)
    if resume != "auto":
        _on_main(info, lambda: _abandon_newer(Path(run_dir), chosen, f"resume={resume}"))
    return chosen


def _on_main(info: DistInfo, fn):
    """`fn()` on rank 0, its result on every rank; a file-system error there is a UsageError everywhere."""
    out = None
    if info.is_main:
        try:
            out = (fn(), None)
        except OSError as e:
            out = (None, str(e))
    result, error = broadcast_object(out)
    if error:
        raise UsageError(f"cannot set up the checkpoints folder ({error}); check its permissions and free space")
    return result


def _tidy(run_dir: Path, fresh: bool) -> list[str]:
    """Remove half-written saves; starting over, move the old checkpoints aside (they would outrank the
    new run's). Returns the checkpoints left, oldest first."""
    root = run_dir / "checkpoints"
    for stale in root.iterdir() if root.is_dir() else []:
        if _TMP_DIR.match(stale.name) and stale.is_dir():
            log.info("removing %s: a save that never finished", stale)
            shutil.rmtree(stale)
    if fresh:
        for old in checkpoints(run_dir):
            move_aside(old, "resume=none starts over")
    return [str(p) for p in checkpoints(run_dir)]


def _abandon_newer(run_dir: Path, chosen: Path, why: str) -> None:
    """Resuming from an older step: the newer checkpoints of this run_dir belong to the abandoned line."""
    step = step_of(chosen)
    for newer in checkpoints(run_dir):
        if newer.resolve() != chosen.resolve() and int(newer.name[5:]) > step:
            move_aside(newer, f"{why} continues from step {step}")


def _newest_valid(candidates: list[str], info: DistInfo) -> Path | None:
    """Newest first, the first checkpoint that verifies; the damaged newer ones are moved aside."""
    for path in map(Path, reversed(candidates)):
        found = mf.problems(path, info)
        if not found:
            return path
        if info.is_main:
            log.warning("checkpoint %s is damaged (%s); passing over it to an older one", path, "; ".join(found[:3]))
        _on_main(info, lambda: move_aside(path, "damaged"))
    return None


def _compatibility(ckpt: Path, identity: dict) -> str | None:
    """Why `ckpt` cannot load into this run (differing shape keys or ZeRO stage), or None."""
    manifest = mf.read_manifest(ckpt)
    if manifest is None:
        log.warning("checkpoint %s has no manifest (written by an earlier zerokit): its files are not verified", ckpt)
        saved = _legacy_identity(ckpt)
    else:
        saved = {"config": manifest.get("config", {}), "zero_stage": manifest.get("zero_stage")}
    diff = mf.identity_mismatch(saved, identity)
    if diff:
        return (f"checkpoint {ckpt} was written with {diff}, which changes the model's tensor shapes; run with the "
                f"checkpoint's setting, or start over (resume=none or another run_dir)")
    return None


def _legacy_identity(ckpt: Path) -> dict:
    import yaml
    path = ckpt / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return {"config": {k: v for k in mf.SHAPE_KEYS if (v := lookup(cfg, k)) is not MISSING}, "zero_stage": None}


def rng_state() -> dict:
    """Every RNG a step may draw from, as tensors, ints and strings only: the file then loads with
    torch.load(weights_only=True), which runs no pickled code (numpy's key array becomes a tensor)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, backend, info: DistInfo) -> dict:
    """Restore the engine state and this rank's RNG; returns trainer_state."""
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    if state["backend"] != backend.name and backend.name == "deepspeed" or \
            state["backend"] == "deepspeed" and backend.name != "deepspeed":
        raise UsageError(f"checkpoint {path} was written by the {state['backend']} backend and cannot be resumed by "
                         f"{backend.name}; resume with the same engine, or export it (zerokit export) and start from the weights")
    backend.load(path)
    rng = Path(path) / f"rng_rank{info.rank}.pt"
    if rng.is_file() and state["world_size"] == info.world_size:
        set_rng_state(torch.load(rng, weights_only=True))
    return state


# ----------------------------------------------------------------------------- save

def save_checkpoint(run_dir: Path, step: int, backend, trainer_state: dict, info: DistInfo, keep: int,
                    write_extras=None, identity: dict | None = None) -> Path:
    """All ranks call this. `write_extras(dir)` (rank 0) adds the config, tokenizer and model config;
    `identity` (manifest.identity) goes into the manifest."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"

    def start():
        if info.is_main:
            _check_free_space(root)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_state():
        backend.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
        if info.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(
                {**trainer_state, "step": step, "backend": backend.name, "world_size": info.world_size,
                 "format": mf.FORMAT}, indent=1))
            if write_extras:
                write_extras(tmp)

    def seal():  # after every file is written: the manifest last, then the atomic rename
        mf.write_manifest(tmp, info, {"step": step, "world_size": info.world_size, "backend": backend.name,
                                      **(identity or {"config": {}, "zero_stage": getattr(backend, "stage", None)})})
        if info.is_main:
            _fsync_dir(tmp)
            if final.exists():  # the same step saved before (and since abandoned by a resume): keep it aside
                move_aside(final, f"step {step} saved again")
            tmp.rename(final)
            _fsync_dir(root)

    for phase in (start, write_state, seal):
        _collectively(phase, info, tmp, step, root)
    if info.is_main:
        try:
            prune(run_dir, keep)
        except OSError as e:  # the new checkpoint is in place; an old one staying is no reason to stop
            log.warning("could not prune old checkpoints in %s: %s", root, e)
    barrier()
    return final


def _collectively(phase, info: DistInfo, tmp: Path, step: int, root: Path) -> None:
    """Run one phase of a save on every rank; if it failed anywhere, every rank learns it, rank 0
    removes the temp folder, and every rank raises (UsageError for a write error, else the bug)."""
    try:
        phase()
        failure = None
    except (Exception, CheckpointException) as e:
        failure = (info.rank, _write_error(e), f"{type(e).__name__}: {e}"[:500])
        error = e
    failures = [f for f in all_gather_objects(failure) if f]
    if not failures:
        return
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    rank, write_error, text = failures[0]
    if failure and not write_error:
        raise error  # a bug, with its traceback
    if not write_error:
        raise RuntimeError(f"checkpoint step_{step} failed on rank {rank}: {text}")
    previous = checkpoints(root.parent)
    cleaned = f"could not remove {tmp}" if tmp.exists() else "the half-written folder was removed"
    raise UsageError(f"cannot write checkpoint step_{step} in {root} ({write_error}; {_free(root)}); {cleaned} and "
                     f"{f'{previous[-1].name} is intact' if previous else 'no older checkpoint exists'}; "
                     f"free space or fix permissions there, then resume with resume=auto")


def _write_error(e: BaseException) -> str | None:
    """A short description if `e` is a failed write (disk full, read-only, no permission), else None."""
    seen = [e]
    if isinstance(e, CheckpointException):
        seen += [exc for exc, _ in e.failures.values()]
    for exc in list(seen):
        seen += [c for c in (exc.__cause__, exc.__context__) if c is not None]
    for exc in seen:
        if isinstance(exc, OSError):
            return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        # torch.save's zip writer reports a short write as "unexpected pos" / "file write failed"
        if isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("inline_container", "PytorchStreamWriter")):
            return "write failed"
    return None


def _free(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free / 2**20:,.1f} MiB free there"
    except OSError:
        return "free space unknown"


def _check_free_space(root: Path) -> None:
    """Refuse a save that cannot fit: a new checkpoint is about the size of the newest one."""
    newest = checkpoints(root.parent)
    try:
        manifest = mf.read_manifest(newest[-1]) if newest else None
    except ValueError:
        manifest = None
    if manifest is None:
        return
    need = sum(f["size"] for f in manifest["files"].values())
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device for another checkpoint (the last took "
                                    f"{need / 2**20:,.1f} MiB)", str(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` valid checkpoints (0: all); delete older valid ones; move damaged ones
    aside (a damaged checkpoint never counts towards `keep`, and is never deleted). Rank 0."""
    valid = 0
    for ckpt in reversed(checkpoints(run_dir)):
        if mf.problems(ckpt, hashes=False):  # sizes only: hashing every save would cost too much
            move_aside(ckpt, "damaged")
        elif keep <= 0 or valid < keep:
            valid += 1
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
