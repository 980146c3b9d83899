"""Checkpoints: `<run_dir>/checkpoints/step_<N>/`, never half-written.

Every rank writes into `step_<N>.tmp/`; after a barrier rank 0 renames it to `step_<N>`
(a rename is atomic), then prunes all but the newest `keep`. A crash mid-save leaves only
a `.tmp` folder, which resume ignores. Layout of one checkpoint:
    deepspeed/ or dcp/      the engine's own sharded state (model, optimizer)
    trainer_state.json      step, tokens seen, data position, backend, world size
    rng_rank<R>.pt          each rank's RNG states (dropout reproduces after resume)
    config.yaml             the run config;   model/  HF config + tokenizer (for export)
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from zerokit.dist import DistInfo, barrier
from zerokit.errors import UsageError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`auto`: the newest complete checkpoint of this run, if any; a path: that checkpoint."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"resume={resume}: not a checkpoint directory (no trainer_state.json); "
                         f"pass a <run_dir>/checkpoints/step_N folder or resume=auto")
    return path


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


def save_checkpoint(run_dir: Path, step: int, backend, trainer_state: dict, info: DistInfo, keep: int,
                    write_extras=None) -> Path:
    """All ranks call this. `write_extras(dir)` (rank 0) adds the config, tokenizer and model config."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    backend.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(
            {**trainer_state, "step": step, "backend": backend.name, "world_size": info.world_size}, indent=1))
        if write_extras:
            write_extras(tmp)
    barrier()
    if info.is_main:
        if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


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
