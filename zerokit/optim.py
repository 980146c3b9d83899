"""AdamW with decoupled weight decay on matrices only (the learning-rate schedule is zerokit/schedule.py)."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices (embeddings, linears); never biases or norm gains (nanoGPT/GPT-3 practice).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                cpu_adam: bool = False) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam when DeepSpeed offloads the optimizer to the host, else torch AdamW with the
    fastest multi-tensor kernel the device has (fused on CUDA, foreach on CPU)."""
    groups = param_groups(model, weight_decay)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_cuda or None, foreach=None if on_cuda else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
