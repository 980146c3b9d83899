"""Where a recipe builds its from-scratch preset, from the engine it will run (zerokit.sharded_init):
the one place that asks which engine before the backend exists."""
from __future__ import annotations

from typing import Callable

from zerokit.backends.common import accelerate_deepspeed_config, deepspeed_config_path


def plan(cfg, info) -> tuple[str, Callable | None]:
    """Where a recipe builds its from-scratch preset: construct's mode, and for zero3 the factory of its
    deepspeed.zero.Init (given the model's config). full for a pretrained model, model.sharded_init=false,
    tensor or pipeline parallelism (their splits start from the whole weights) and ZeRO 0-2. ZeRO-3 in
    bf16/fp16 builds in its dtype; DeepSpeedBackend then sets the fp32 masters (sharded_init.fp32_inits)."""
    if (cfg.model.get("name_or_path") or not cfg.model.get("sharded_init", True) or info.tensor_parallel > 1
            or info.pipeline_parallel > 1):
        return "full", None
    if cfg.get("fsdp", "none") != "none":
        return "meta", None
    from zerokit.backends.deepspeed import load_ds_json, zero3_init
    ds = deepspeed_config_path(cfg.get("ds_config")) or (accelerate_deepspeed_config() if not cfg.get("ds_config") else None)
    if not ds:
        return "full", None
    if (load_ds_json(ds) if not isinstance(ds, dict) else ds)["zero_optimization"].get("stage", 0) != 3:
        return "full", None
    return "zero3", lambda config: zero3_init(ds, cfg.train, info, getattr(config, "hidden_size", None))
