"""The model a lab measurement or estimate is about, built the way training builds it: its config
from a preset, alias or folder (through zerokit.models, the one preset table), zerokit's own LoRA
set-up and activation checkpointing, on whatever device is current (the probe uses meta)."""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch

from zerokit.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_config(model):
    """A transformers config from a config object, a preset name or alias, or a local path."""
    from pathlib import Path

    from transformers import AutoConfig, PretrainedConfig

    from zerokit.models import model_config

    if isinstance(model, PretrainedConfig):
        return model
    if Path(str(model)).exists():
        return AutoConfig.from_pretrained(str(model))
    return model_config(model)


def default_seq(config, seq):
    if seq:
        return seq
    return min(1024, getattr(config, "max_position_embeddings", None) or 1024)


def apply_grad_ckpt(model, mode: str) -> None:
    """none | full (every block recomputed) | selective (every 2nd block, starting at block 0).

    Non-reentrant, as zerokit.models.enable_grad_ckpt does. A peft model: pass its base model.
    """
    if mode == "none":
        return
    every = {"full": 1, "selective": 2}[mode]
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                          every_n_layers=every)
    model.config.use_cache = False


@contextlib.contextmanager
def quiet_transformers():
    """The probe builds and runs throw-away models: their config/loss warnings are noise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calling transformers' deprecated names
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def training_model(config, n_layers: int | None = None, precision: str = "fp32", attn: str = "sdpa",
                   peft: str = "none", lora_r: int = 16, grad_ckpt: str = "none"):
    """The causal LM the estimate models, built on the current default device (random weights):
    zerokit's own LoRA set-up (targets, r, dropout) and checkpointing, so we model what trains."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    if n_layers is not None:
        cfg.num_hidden_layers = n_layers
        kinds = getattr(cfg, "layer_types", None)  # per-layer attention kinds (e.g. Qwen2-MoE), one per layer
        if kinds:
            cfg.layer_types = [kinds[i % len(kinds)] for i in range(n_layers)]
    cfg.use_cache = False
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
        model.to(DTYPES[precision])
        model.train()
        if peft != "none":
            # on meta a QLoRA base is modelled as LoRA (same saved tensors, weights counted as NF4)
            from zerokit.peft_setup import apply_peft
            model = apply_peft(model, "lora", r=lora_r)
        apply_grad_ckpt(model.get_base_model() if peft != "none" else model, grad_ckpt)
    return model


def meta_model(config, n_layers: int | None, precision: str, attn: str, peft: str, lora_r: int, grad_ckpt: str):
    with torch.device("meta"):
        return training_model(config, n_layers, precision, attn, peft, lora_r, grad_ckpt)


def blocks(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        raise UsageError(f"{type(model).__name__}: no transformer blocks found (needs a transformers "
                         "decoder whose layers derive from GradientCheckpointingLayer)")
    return found
