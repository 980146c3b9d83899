import os
from pathlib import Path

import pytest

from launch_util import EXTENSIONS

REPO = Path(__file__).resolve().parents[1]
# One setting finds the shared data: ZEROKIT_DATA, default ../shared/data beside the repo.
DATA_DIR = Path(os.environ.get("ZEROKIT_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process DeepSpeed starts build their ops where the subprocesses do (launch_util.EXTENSIONS), not in ~/.cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    # A missing data folder is a failure, never a skip (CI must not go green without it).
    if not (DATA_DIR / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(f"shared data not found at {DATA_DIR}: set ZEROKIT_DATA to the folder holding tinyshakespeare/, sst2/, dialogsum/")
    return DATA_DIR


@pytest.fixture(scope="session")
def slurm():
    """The 2-node SLURM test cluster (tests/slurm_cluster.py), up once a session for every test that asks."""
    from slurm_cluster import cluster
    yield from cluster()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def pytest_sessionstart(session):
    """A DeepSpeed op build killed in an earlier session left its lock: without this every DeepSpeed test
    would wait on it until its timeout. No build takes 10 minutes, so an older lock has no owner."""
    import time

    for lock in EXTENSIONS.glob("*/lock"):  # TORCH_EXTENSIONS_DIR/<op>/lock
        if time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
            print(f"removed a stale DeepSpeed build lock: {lock}")
