"""Single process, or DDP across ranks. Checkpoints through torch.distributed.checkpoint
(as FSDP does), so a plain checkpoint resumes at any world size and under FSDP."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from zerokit.backends.common import resolve_precision
from zerokit.backends.loss_scaling import LossScaledDCP
from zerokit.dist import DistInfo
from zerokit.optim import build_optimizer

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PlainBackend(LossScaledDCP):
    """Weights, gradients (accumulated and all-reduced by DDP) and optimizer state stay fp32; bf16/fp16
    only inside autocast's matmuls."""
    name = "plain"

    def __init__(self, model: torch.nn.Module, train, info: DistInfo, find_unused_parameters: bool = False, optim=None):
        self.info = info
        self.precision = resolve_precision(train.precision, info.device)
        self.module = model.to(info.device)
        self.model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                         find_unused_parameters=find_unused_parameters) if info.world_size > 1 else model
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
