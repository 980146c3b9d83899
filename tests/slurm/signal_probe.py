"""A stand-in recipe for tests/test_slurm.py: does USR1 reach every rank through the batch script?

Called like a recipe (`probe.py key=value ... run_dir=DIR resume=auto`) by the generated script. Each
rank writes DIR/rank<R>.json (its torchrun/SLURM environment and arguments), then, on the first attempt,
waits for SIGUSR1 and follows the training loop's contract: "checkpoint" (3 s), note the signal
(DIR/usr1.<R>), rank 0 writes DIR/PREEMPTED, exit 0. On the requeued attempt (SLURM_RESTART_COUNT set) it records itself and exits 0.
No torch import: this checks the launch path only, in seconds.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[1:])
run_dir = Path(args["run_dir"])
rank = int(os.environ["RANK"])
attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))

keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_RESTART_COUNT", "OMP_NUM_THREADS", "HF_HUB_OFFLINE",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "DS_ACCELERATOR")
info = {"args": args, "env": {k: os.environ.get(k) for k in keys}, "pid": os.getpid()}
# Written last (rename) so the test never reads half a file; the test signals once all ranks are ready.
tmp = run_dir / f".rank{rank}.attempt{attempt}.json"
tmp.write_text(json.dumps(info))
tmp.rename(run_dir / f"rank{rank}.attempt{attempt}.json")

if attempt == 0:
    deadline = time.monotonic() + 120
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    if not got:
        sys.exit(f"rank {rank}: no SIGUSR1 within 120 s")
    # A checkpoint takes a while: if anything kills this rank meanwhile (e.g. torchrun dying of USR1 takes
    # its whole step down), the marker below never appears.
    time.sleep(3)
    (run_dir / f"usr1.{rank}").write_text(str(time.time()))
    if rank == 0:
        (run_dir / "PREEMPTED").write_text("1")
sys.exit(0)
