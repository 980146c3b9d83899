"""PyTorch FSDP2 (`fully_shard`), driven directly rather than through accelerate's plugin:
on CPU that plugin either refuses ("no available devices") or silently skips wrapping,
so the ranks would train independently. Each transformer block is one FSDP unit."""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from zerokit.backends.common import resolve_precision
from zerokit.backends.loss_scaling import LossScaledDCP
from zerokit.dist import DistInfo
from zerokit.errors import UsageError
from zerokit.models import block_classes
from zerokit.optim import build_optimizer
from zerokit.parallelize import split_for_tensor_parallel
from zerokit.sharded_init import unit_materializer

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDPBackend(LossScaledDCP):
    """The sharded parameters (the optimizer's masters) and their optimizer state stay fp32. Under
    bf16/fp16 the mixed-precision policy gathers 16-bit copies for compute, and gradients are
    reduce-scattered and accumulated (`to_accumulated_grad_if_needed`, no-sync micro-batches) in fp32."""
    name = "fsdp"

    def __init__(self, model: torch.nn.Module, train, info: DistInfo, strategy: str, offload: bool, optim=None,
                 megatron_sp: bool = False):
        if strategy not in ("full_shard", "shard_grad_op"):
            raise UsageError(f"fsdp must be none, full_shard or shard_grad_op, not '{strategy}'")
        self.info = info
        self.precision = resolve_precision(train.precision, info.device)
        if offload and info.tensor_parallel > 1:
            raise UsageError("fsdp_offload with parallel.tensor > 1 is not supported; drop one of them")
        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[self.precision], reduce_dtype=torch.float32) \
            if self.precision in _DTYPES else MixedPrecisionPolicy()
        # full_shard frees gathered weights after forward (ZeRO-3); shard_grad_op keeps them (ZeRO-2).
        # A model built on meta (zerokit.sharded_init) gets each unit's weights just before that unit is sharded.
        materialize = unit_materializer(model, None if offload else info.device)
        if not offload and materialize is None:
            model.to(info.device)
        # Tensor parallelism first (its DTensors are then sharded over the data-parallel dimension: 2-D).
        mesh = split_for_tensor_parallel(model, info, megatron_sp) or init_device_mesh(info.device.type, (info.world_size,))
        kw = dict(mesh=mesh, reshard_after_forward=strategy == "full_shard", mp_policy=mp,
                  offload_policy=CPUOffloadPolicy() if offload else None)
        kw = {k: v for k, v in kw.items() if v is not None}
        blocks = block_classes(model)
        for m in model.modules():
            if type(m).__name__ in blocks:
                if materialize:
                    materialize(m)
                fully_shard(m, **kw)
        if materialize:
            materialize(model)
        fully_shard(model, **kw)
        self.model = self.module = model
        if train.get("compile"):
            self.model = torch.compile(model)
        self.optimizer = build_optimizer(model, train, optim, engine="fsdp")
        self.grad_clip = train.grad_clip
        # fp16: dynamic loss scaling whose inf check is all-reduced, so every rank skips the same steps.
        self.scaler = ShardedGradScaler(info.device.type, enabled=self.precision == "fp16")
        self.skipped_updates = 0  # steps the loss scaler skipped (fp16 overflow)

    def autocast(self):
        # The engine casts weights itself (bf16/fp16 sections, or the mixed-precision policy).
        return contextlib.nullcontext()

    def micro_batch(self, sync: bool):
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
