"""What every engine resolves the same way from the run config and `accelerate launch`'s environment: the
precision, the DeepSpeed config accelerate's flags ask for (or its JSON's path), and the flags' agreement
with that JSON. A sibling of the engines, not their package's __init__, so no engine imports the package
that imports it."""
from __future__ import annotations

import os
from typing import Mapping

import torch

from zerokit.errors import UsageError
from zerokit.resources import find_ds_config

_ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16"}


def resolve_precision(precision: str, device: torch.device, env: Mapping[str, str] | None = None) -> str:
    """`auto` is bf16 where the GPU supports it, else fp32 (the CPU default). `accelerate launch
    --mixed_precision bf16|fp16` (ACCELERATE_MIXED_PRECISION) sets it; one that contradicts an explicit
    train.precision is an error. accelerate exports `no` when the flag is absent, so `no` requests nothing."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"train.precision must be auto, fp32, bf16 or fp16, not '{precision}'")
    launcher = (os.environ if env is None else env).get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", *_ACCELERATE_PRECISION):
        raise UsageError(f"accelerate launch --mixed_precision {launcher} is not supported by zerokit; "
                         f"use --mixed_precision bf16, fp16 or no")
    if launcher in _ACCELERATE_PRECISION:
        if precision not in ("auto", _ACCELERATE_PRECISION[launcher]):
            raise UsageError(f"accelerate launch --mixed_precision {launcher} contradicts train.precision={precision}; "
                             f"pass only one of them (or make them agree)")
        precision = _ACCELERATE_PRECISION[launcher]
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def env_true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").lower() == "true"


def accelerate_deepspeed_config(env: Mapping[str, str] | None = None) -> dict | None:
    """What `accelerate launch --use_deepspeed --zero_stage N [--offload_*_device D]` asks for without a
    JSON: the stage's config (accelerate's own default stage is 2), every batch value "auto"."""
    env = os.environ if env is None else env
    if not env_true(env, "ACCELERATE_USE_DEEPSPEED") or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        return None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("0", "1", "2", "3"):
        raise UsageError(f"accelerate launch --zero_stage {stage}: ZeRO stages are 0, 1, 2 and 3")
    zero: dict = {"stage": int(stage), "reduce_bucket_size": "auto"}
    if stage == "3":
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    for section, var in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                         ("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
        device = env.get(var, "none").lower()
        if device == "nvme":
            raise UsageError(f"accelerate launch --{section}_device nvme needs an NVMe path and aio settings; "
                             f"pass a DeepSpeed JSON instead (e.g. --deepspeed_config_file ds_configs/zero3_nvme.json)")
        if device == "cpu":
            if section == "offload_param" and stage != "3":
                raise UsageError(f"accelerate launch --offload_param_device cpu needs --zero_stage 3, not {stage}")
            zero[section] = {"device": "cpu"}
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0},
            "steps_per_print": 1000000000, "zero_optimization": zero}


def check_accelerate_flags(ds: dict, train, env: Mapping[str, str] | None = None) -> None:
    """accelerate's DeepSpeed flags that the JSON or the run config already settle: they must agree."""
    env = os.environ if env is None else env
    zero = ds.get("zero_optimization", {}) or {}
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and int(stage) != int(zero.get("stage", 0)):
        raise UsageError(f"accelerate launch --zero_stage {stage} contradicts the DeepSpeed JSON's zero_optimization.stage="
                         f"{zero.get('stage', 0)}; pass only one of them")
    for section, var in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                         ("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
        flag = env.get(var)
        in_json = ((zero.get(section) or {}).get("device") or "none").lower()
        if flag is not None and flag.lower() != in_json:
            raise UsageError(f"accelerate launch --{section}_device {flag} contradicts the DeepSpeed JSON's "
                             f"zero_optimization.{section}.device={in_json}; pass only one of them")
    accum = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accum is not None and accum != "auto" and int(accum) != train.grad_accum:
        raise UsageError(f"accelerate launch --gradient_accumulation_steps {accum} contradicts train.grad_accum="
                         f"{train.grad_accum}; set train.grad_accum={accum} instead of the accelerate flag")
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clip is not None and clip != "auto" and float(clip) != float(train.grad_clip):
        raise UsageError(f"accelerate launch --gradient_clipping {clip} contradicts train.grad_clip={train.grad_clip}; "
                         f"set train.grad_clip={clip} instead of the accelerate flag")


def deepspeed_config_path(ds_config: str | None) -> str | None:
    """The run's DeepSpeed JSON: `ds_config=` (a path, or a packaged name: zerokit.resources.find_ds_config)
    or `accelerate launch --deepspeed_config_file`."""
    ds_config = find_ds_config(ds_config)
    from_accelerate = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") \
        if env_true(os.environ, "ACCELERATE_USE_DEEPSPEED") else None
    if ds_config and from_accelerate and os.path.abspath(ds_config) != os.path.abspath(from_accelerate):
        raise UsageError(f"two DeepSpeed configs given: ds_config={ds_config} and accelerate's "
                         f"--deepspeed_config_file {from_accelerate}; pass only one")
    return ds_config or from_accelerate
