"""One rank of a 2-rank gloo group that ends while a gloo worker thread still has to take the GIL.

    python tests/workers/late_gloo_work.py exit_process|return OUT_DIR   (RANK, WORLD_SIZE, MASTER_* set)

Rank 0 starts an all_reduce that rank 1 joins ~0.5 s later, keeps the tensor (as callers do) and the
group (as DeepSpeed's groups._WORLD_GROUP does), calls destroy_process_group and ends. When the
collective completes, the gloo worker frees its AsyncWork, whose second reference to the tensor
makes torch take the GIL to drop the Python object. Rank 0's last exit handler, a C loop holding the
GIL (standing in for a main thread that does not hand the GIL over before finalization), keeps it
from getting it until finalization starts. A plain return then aborts exactly as the multi-rank runs
did: SIGABRT, "terminate called without an active exception"; exit_process must end with 0. Rank 0
also registers an atexit handler writing OUT_DIR/atexit_ran, which both ways of ending must run.
"""
import atexit
import os
import sys
from pathlib import Path

if os.environ["RANK"] == "0":  # registered first, so it runs last
    atexit.register(sum, range(150_000_000))

import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from zerokit.dist import exit_process  # noqa: E402

mode, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    atexit.register(lambda: (out / "atexit_ran").write_text("yes"))
    tensor = torch.ones(1 << 10)
    work = dist.all_reduce(tensor, async_op=True)
    del work
    held = dist.group.WORLD
    dist.destroy_process_group()
    print("rank 0: leaving with the all_reduce in flight", end="")  # no newline: exit must flush it
    if mode == "exit_process":
        exit_process(0)
else:
    time.sleep(0.5)
    dist.all_reduce(torch.ones(1 << 10))
    time.sleep(5)  # stay connected while rank 0 ends
    os._exit(0)
