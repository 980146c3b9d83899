"""Process-group set-up shared by every backend and launcher.

We initialise torch.distributed ourselves from the launcher's environment (torchrun,
`accelerate launch`, the `deepspeed` launcher and our SLURM scripts all export RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Doing it here, with gloo on CPU and
NCCL on GPUs, is what makes `accelerate launch` + DeepSpeed on CPU really run N ranks:
left to accelerate, every CPU process silently believes it is rank 0 of 1.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from zerokit.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tensor_parallel: int = 1  # ranks per tensor-parallel group: consecutive ranks, the inner mesh dimension
    pipeline_parallel: int = 1  # pipeline stages: the outer mesh dimension, (pipeline, data, tensor)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def model_parallel(self) -> int:
        """Ranks that read the same micro-batches (one model replica)."""
        return self.tensor_parallel * self.pipeline_parallel

    # Data parallel: the ranks of a tensor-parallel group, and the stages of a pipeline, read the same
    # micro-batches, so the data is split over these (the middle mesh dimension), not over every rank.
    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tensor_parallel) % self.dp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tensor_parallel * self.dp_size)


def set_cpu_threads(cpu_threads: int | str = "auto") -> None:
    """Intra-op threads per rank on CPU. torchrun and `accelerate launch` export OMP_NUM_THREADS=1,
    which leaves a single-process CPU run on one core (the demo ran 1.6x slower); `auto` splits this
    node's cores between its ranks instead."""
    if cpu_threads == "auto":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cpu_threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    torch.set_num_threads(int(cpu_threads))


def init_distributed(timeout_s: float = 600.0, cpu_threads: int | str = "auto", tensor_parallel: int = 1,
                     pipeline_parallel: int = 1) -> DistInfo:
    """Join the process group the launcher describes (a 1-rank group for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel > 1 and pipeline_parallel > 1:
        raise UsageError(f"parallel.tensor={tensor_parallel} with parallel.pipeline={pipeline_parallel} is not "
                         f"supported yet; set one of them to 1")
    if world % pipeline_parallel:
        raise UsageError(f"parallel.pipeline={pipeline_parallel} does not divide the {world} ranks; launch a multiple "
                         f"of {pipeline_parallel} ranks or choose a pipeline size that divides {world}")
    if world % tensor_parallel:
        raise UsageError(f"parallel.tensor={tensor_parallel} does not divide the {world} ranks; launch a multiple of "
                         f"{tensor_parallel} ranks or choose a tensor-parallel size that divides {world}")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        set_cpu_threads(cpu_threads)
    if not dist.is_initialized():
        # A dead peer must become an error, not a hang: NCCL needs async error handling for that,
        # gloo notices a closed connection; both give up after `timeout_s` at the latest.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        # One process gets a group too (DeepSpeed and FSDP's device mesh require one); an in-memory
        # store needs no MASTER_ADDR/port, so `python recipe.py` runs side by side without clashes.
        single = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if world == 1 else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None, **single)
    return DistInfo(rank, world, local_rank, device, tensor_parallel, pipeline_parallel)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group (idempotent). Its gloo worker threads may live on: see exit_process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End a process that joined a process group: the one exit of recipes run as scripts, the bench,
    verify and memtest workers and tests/workers/run_recipe_many.py.

    It does what a normal exit does up to interpreter finalization (non-daemon threads joined, atexit
    handlers: logging, W&B, temp dirs), then leaves with os._exit, skipping finalization. Why: torch's
    gloo ProcessGroup has 2 worker threads ("pt_gloo_runloop") that end only when the ProcessGroupGloo
    object is freed. destroy_process_group frees it unless someone else holds it, and here someone
    does: DeepSpeed 0.19.8 (TorchBackend.barrier's default argument captured the world group;
    deepspeed.utils.groups._WORLD_GROUP keeps its clone) and, under FSDP2, torch's DTensor
    redistribute-planner cache (DeviceMesh -> group). A worker frees each finished collective's
    AsyncWork; dropping its reference to a tensor that Python also holds takes the GIL (torch 2.13
    TensorImpl::decref_pyobject, after a Py_IsInitialized() check). If it gets the GIL only after
    finalization began, CPython 3.11 ends the thread with pthread_exit, whose unwinding meets the
    noexcept ~AsyncWork: std::terminate, "terminate called without an active exception", SIGABRT
    after a finished run (~1 multi-rank exit in 7 on a loaded machine). Freeing those groups means
    editing DeepSpeed's and torch's private state, so instead we never finalize with them alive.
    """
    shutdown()
    threading._shutdown()  # what finalization runs first: join non-daemon threads and executors
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced stream
            pass
    os._exit(status)
