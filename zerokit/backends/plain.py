"""Single process, or DDP across ranks. Checkpoints through torch.distributed.checkpoint
(as FSDP does), so a plain checkpoint resumes at any world size and under FSDP."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from zerokit.backends.common import resolve_precision
from zerokit.backends.loss_scaling import LossScaledDCP
from zerokit.dist import DistInfo
from zerokit.errors import UsageError
from zerokit.optim import build_optimizer
from zerokit.parallelize import split_for_tensor_parallel

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PlainBackend(LossScaledDCP):
    """Weights, gradients (accumulated and all-reduced by DDP) and optimizer state stay fp32; bf16/fp16
    only inside autocast's matmuls."""
    name = "plain"

    def __init__(self, model: torch.nn.Module, train, info: DistInfo, find_unused_parameters: bool = False, optim=None,
                 megatron_sp: bool = False):
        self.info = info
        self.precision = resolve_precision(train.precision, info.device)
        self.module = model.to(info.device)
        if info.tensor_parallel > 1 and info.dp_size > 1:
            raise UsageError(f"parallel.tensor={info.tensor_parallel} on {info.world_size} ranks leaves {info.dp_size} "
                             f"data-parallel groups, which DDP cannot serve (it takes no DTensor parameters); "
                             f"set fsdp=full_shard (or shard_grad_op), or launch {info.tensor_parallel} ranks")
        split_for_tensor_parallel(model, info, megatron_sp)  # tensor parallel only: no data-parallel ranks, so no DDP
        self.model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                         find_unused_parameters=find_unused_parameters) if info.dp_size > 1 else model
        if train.get("compile"):
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(model, train, optim)
        self.grad_clip = train.grad_clip
        # fp16 needs dynamic loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.precision == "fp16")
        self.skipped_updates = 0  # steps the loss scaler skipped (fp16 overflow)

    def autocast(self):
        return torch.autocast(self.info.device.type, dtype=_DTYPES[self.precision]) \
            if self.precision in _DTYPES else contextlib.nullcontext()

    def micro_batch(self, sync: bool):
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast())
        if isinstance(self.model, DDP) and not sync:
            # DDP needs forward *and* backward inside no_sync to skip the all-reduce.
            stack.enter_context(self.model.no_sync())
        return stack
