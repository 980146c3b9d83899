"""Backends: the handful of verbs the training loop needs from a sharding engine.

    model               what the forward pass is called on (the engine's wrapper)
    module              the plain nn.Module (eval, generation, export)
    autocast()          context for evaluation's forward: torch.autocast for plain bf16/fp16; a no-op where
                        the engine casts the weights itself (DeepSpeed, FSDP2)
    micro_batch(sync)   context for one micro-batch's forward+backward (gradient sync on/off)
    backward(loss, sync) backward of an already-normalised loss
    set_lr(lr)          the step's learning rate
    step()              optimizer step at the end of an accumulation window; returns the grad norm
    skip_step()         drop the window's gradients without an update (train.nonfinite=skip)
    skipped_updates     updates the engine itself refused (fp16 overflow)
    save(dir) / load(dir)  a sharded checkpoint directory (all ranks call)
    name, precision, optimizer   which engine, the resolved precision, the optimizer holding the lr

One class per engine (plain/DDP, DeepSpeed, FSDP2); the loop never asks which one it has.
"""
from __future__ import annotations

import os

import torch

# The helpers every engine shares live in backends/common.py; re-exported here as the package's API.
from zerokit.backends.common import (accelerate_deepspeed_config, check_accelerate_flags,  # noqa: F401
                                     deepspeed_config_path, env_true, resolve_precision)
from zerokit.dist import DistInfo
from zerokit.errors import UsageError
from zerokit.optim import check_engine


def make_backend(model: torch.nn.Module, train, info: DistInfo, ds_config: str | None = None,
                 fsdp: str = "none", fsdp_offload: bool = False, find_unused_parameters: bool = False, optim=None,
                 megatron_sp: bool = False, pipeline_schedule: str = "1f1b"):
    """`find_unused_parameters`: DDP tolerates parameters the loss never reaches (ZeRO and FSDP always do).
    `optim`: the run's optim section (zerokit.optim.build_optimizer); None is AdamW. `megatron_sp`: with
    tensor parallelism (info.tensor_parallel), split the blocks' norms along the sequence too. `pipeline_schedule`:
    with pipeline parallelism (info.pipeline_parallel), gpipe or 1f1b."""
    # A JSON (ds_config= or --deepspeed_config_file), else accelerate's --use_deepspeed/--zero_stage flags.
    ds = deepspeed_config_path(ds_config) or (accelerate_deepspeed_config() if not ds_config else None)
    if ds and fsdp != "none":
        where = ds if isinstance(ds, str) else f"accelerate launch --zero_stage {ds['zero_optimization']['stage']}"
        raise UsageError(f"both a DeepSpeed config ({where}) and fsdp={fsdp} given; choose one sharding engine")
    if env_true(os.environ, "ACCELERATE_USE_FSDP") and fsdp == "none":
        raise UsageError("accelerate launch --use_fsdp is not read by zerokit; drop it and set fsdp=full_shard "
                         "(or fsdp=shard_grad_op) in the run config")
    if info.pipeline_parallel > 1:
        if ds or fsdp_offload:
            raise UsageError(f"parallel.pipeline={info.pipeline_parallel} runs with data parallel or FSDP2 across the "
                             f"replicas; drop {'the DeepSpeed config' if ds else 'fsdp_offload'} (or set parallel.pipeline=1)")
        check_engine((optim or {}).get("name", "adamw"), "fsdp" if fsdp != "none" else "plain")
        from zerokit.backends.pipeline import PipelineBackend
        return PipelineBackend(model, train, info, pipeline_schedule, optim, fsdp)
    if ds:
        from zerokit.backends.deepspeed import DeepSpeedBackend
        return DeepSpeedBackend(model, train, info, ds, optim)
    check_engine((optim or {}).get("name", "adamw"), "fsdp" if fsdp != "none" else "plain")
    if fsdp != "none":
        from zerokit.backends.fsdp import FSDPBackend
        return FSDPBackend(model, train, info, fsdp, fsdp_offload, optim, megatron_sp)
    from zerokit.backends.plain import PlainBackend
    return PlainBackend(model, train, info, find_unused_parameters, optim, megatron_sp)
