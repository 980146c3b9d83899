"""The lab's one torchrun-worker runner: `bench`, `memtest` and `verify` each start N local ranks of
one of their own modules (`python -m torch.distributed.run ... -m zerokit.lab.X --worker ...`) and
read back what each rank wrote. Here: the command, the environment, a log, and on a failure or a
timeout every rank killed and the log's tail raised."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def worker_env() -> dict:
    import torch
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning
    env.setdefault("HF_HUB_OFFLINE", "1")   # the lab builds models from configs: nothing to download
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank: torchrun puts each rank in a session of its own."""
    import psutil
    groups = {proc.pid}
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
    except psutil.NoSuchProcess:
        pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_workers(module: str, args: list[str], world_size: int, *, timeout: float, what: str,
                log: Path | None = None, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run `module --worker args...` on `world_size` local ranks; its output goes to `log` (default: a
    temporary file). Raises RuntimeError with the log's tail if it fails or outlives `timeout` s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
           "-m", module, "--worker", *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="zerokit-workers-") as tmp:
        path = Path(log) if log else Path(tmp, "workers.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            # own session: on a timeout the launcher and its ranks go together
            proc = subprocess.Popen(cmd, env=env or worker_env(), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                proc.wait()
                rc = f"timeout after {timeout:.0f} s"
        if rc != 0:
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if "return func(" not in ln]
            where = f"; full log: {path}" if log else ""
            raise RuntimeError(f"{what} failed (exit {rc}){where}\n" + "\n".join(lines[-40:]))
