"""One rank of a 2-rank gloo group that ends while a gloo worker thread still has Python work to do.

    python tests/workers/late_gloo_work.py exit_process|return OUT_DIR   (RANK, WORLD_SIZE, MASTER_* set)

Rank 0 starts an all_reduce that rank 1 joins only ~2 s later and hangs a Python callback on it: the
gloo worker thread that completes it must take the GIL, as it does to free a finished collective's
tensors. Rank 0 then ends at once, either through zerokit.dist.exit_process or by returning, with an
object whose finalizer keeps interpreter finalization busy until rank 1 has arrived (standing in for
a long teardown; rank 1 arrives ~2 s in). Returning lets the worker thread meet a finalizing interpreter: SIGABRT, "terminate
called without an active exception". Rank 0 also registers an atexit handler that writes
OUT_DIR/atexit_ran, which both ways of ending must run.
"""
import atexit
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from zerokit.dist import exit_process

mode, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")


class SlowFinalizer:
    def __del__(self, sleep=time.sleep):  # module globals are gone by the time this runs
        sleep(6)


if dist.get_rank() == 0:
    atexit.register(lambda: (out / "atexit_ran").write_text("yes"))
    work = dist.all_reduce(torch.ones(1 << 10), async_op=True)
    work.get_future().then(lambda fut: None)
    slow = SlowFinalizer()
    print("rank 0: leaving with the all_reduce in flight", end="")  # no newline: exit must flush it
    if mode == "exit_process":
        exit_process(0)
else:
    time.sleep(2)
    try:
        dist.all_reduce(torch.ones(1 << 10))
    except RuntimeError:  # rank 0 may be gone already (exit_process does not wait for its peers)
        pass
    os._exit(0)
