"""Backends: the handful of verbs the training loop needs from a sharding engine.

    micro_batch(sync)   context for one micro-batch's forward+backward (gradient sync on/off)
    backward(loss, sync) backward of an already-normalised loss
    step()              optimizer step at the end of an accumulation window; returns the grad norm
    set_lr(lr)
    save(dir) / load(dir)  a sharded checkpoint directory (all ranks call)
    module              the plain nn.Module (eval, generation)
    model               what the forward pass is called on

One class per engine (plain/DDP, DeepSpeed, FSDP2); the loop never asks which one it has.
"""
from __future__ import annotations

import os

import torch

from zerokit.dist import DistInfo
from zerokit.errors import UsageError


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 where the GPU supports it, else fp32 (the CPU default)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"train.precision must be auto, fp32, bf16 or fp16, not '{precision}'")
    return precision


def deepspeed_config_path(ds_config: str | None) -> str | None:
    """The run's DeepSpeed JSON: `ds_config=` or `accelerate launch --deepspeed_config_file`."""
    from_accelerate = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") \
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else None
    if ds_config and from_accelerate and os.path.abspath(ds_config) != os.path.abspath(from_accelerate):
        raise UsageError(f"two DeepSpeed configs given: ds_config={ds_config} and accelerate's "
                         f"--deepspeed_config_file {from_accelerate}; pass only one")
    return ds_config or from_accelerate


def make_backend(model: torch.nn.Module, train, info: DistInfo, ds_config: str | None = None,
                 fsdp: str = "none", fsdp_offload: bool = False, find_unused_parameters: bool = False):
    """`find_unused_parameters`: DDP tolerates parameters the loss never reaches (ZeRO and FSDP always do)."""
    ds_path = deepspeed_config_path(ds_config)
    if ds_path and fsdp != "none":
        raise UsageError(f"both a DeepSpeed config ({ds_path}) and fsdp={fsdp} given; choose one sharding engine")
    if ds_path:
        from zerokit.backends.deepspeed import DeepSpeedBackend
        return DeepSpeedBackend(model, train, info, ds_path)
    if fsdp != "none":
        from zerokit.backends.fsdp import FSDPBackend
        return FSDPBackend(model, train, info, fsdp, fsdp_offload)
    from zerokit.backends.plain import PlainBackend
    return PlainBackend(model, train, info, find_unused_parameters)
