"""The throw-away 2-node SLURM test cluster (tests/slurm/cluster.sh) and helpers to use it: conftest.py's
session fixture `slurm` brings it up once for every test that asks (tests/test_slurm.py,
tests/test_prepare_slurm.py) and takes it down at the end."""
from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


class Slurm:
    """The running cluster: the environment that reaches it, and a few helpers."""

    def __init__(self, state: Path):
        self.state = state
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(SLURM_CONF=str(state / "slurm.conf"), PATH=f"{BIN}:{env['PATH']}", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
        self.env = env

    def run(self, *cmd, cwd=REPO, check=True, timeout=120) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=self.env, text=True, capture_output=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, cmd))} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                        f"\n{self.logs()}")
        return proc

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        """Poll until the job reaches a final state (a requeue passes through PENDING, not a final state)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if not info:
                pytest.fail(f"job {job_id} vanished before we saw it end\n{self.logs()}")
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout} s\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for log in sorted((self.state / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def cluster():
    """Generator for the session fixture: yields a Slurm once the cluster is up, takes it down after."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests need root (they install slurm and start munged/slurmctld/slurmd)")
    # One test cluster per machine (fixed ports, node names in /etc/hosts): wait for another session's.
    lock = open("/tmp/zerokit-slurm-tests.lock", "w")
    deadline = time.monotonic() + 900
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail("another pytest -m slurm session held /tmp/zerokit-slurm-tests.lock for 15 min")
            time.sleep(2)
    state = Path(tempfile.mkdtemp(prefix="zerokit-slurm-"))
    env = dict(os.environ, ZEROKIT_SLURM_DIR=str(state))
    t0 = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, text=True, capture_output=True, timeout=900)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True)
        pytest.fail(f"cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    print(f"\nSLURM cluster up in {time.monotonic() - t0:.1f} s ({state})")
    try:
        yield Slurm(state)
    finally:
        down = subprocess.run(["bash", str(CLUSTER), "down"], env=env, text=True, capture_output=True)
        lock.close()
        assert down.returncode == 0, down.stderr
