"""Attention settings of a run: model.attn (eager | sdpa | flash) as transformers' `attn_implementation`,
and model.sdpa_backend, the kernel PyTorch's scaled_dot_product_attention may use (math, efficient, flash, cudnn)."""
from __future__ import annotations

import importlib.util

import torch

from zerokit.errors import UsageError

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash")
SDPA_BACKENDS = ("auto", "math", "efficient", "flash", "cudnn")
_SDPA_KERNELS = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def attn_implementation(attn: str = "sdpa", sdpa_backend: str = "auto") -> str:
    """transformers' `attn_implementation` for model.attn (eager | sdpa | flash), checked against this machine."""
    if attn not in ATTN_IMPLEMENTATIONS or sdpa_backend not in SDPA_BACKENDS:
        raise UsageError(f"model.attn={attn} model.sdpa_backend={sdpa_backend}: choose model.attn from "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)} and model.sdpa_backend from {', '.join(SDPA_BACKENDS)}")
    if sdpa_backend != "auto" and attn != "sdpa":
        raise UsageError(f"model.sdpa_backend={sdpa_backend} picks a kernel of model.attn=sdpa, not of model.attn={attn}; "
                         "set model.attn=sdpa or model.sdpa_backend=auto")
    cuda = torch.cuda.is_available()
    if sdpa_backend in ("efficient", "cudnn") and not cuda:
        raise UsageError(f"model.sdpa_backend={sdpa_backend} is a CUDA kernel, and this machine has no CUDA GPU; PyTorch's "
                         "CPU attention has math and flash (tiled, memory-efficient): set model.sdpa_backend=flash or auto")
    if attn != "flash":
        return attn
    if not cuda:
        raise UsageError("model.attn=flash needs a CUDA GPU (flash-attn or the kernels hub kernel), and this machine has "
                         "none; use model.attn=sdpa (model.sdpa_backend=flash is PyTorch's fused kernel, on CPUs too)")
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("kernels") is None:
        raise UsageError("model.attn=flash needs the flash-attn package (pip install flash-attn) or the kernels package "
                         "(pip install kernels: transformers then loads the hub's flash kernel); or use model.attn=sdpa")
    return "flash_attention_2"  # transformers takes the kernels hub kernel when flash-attn is not installed


def pin_sdpa_backend(model: torch.nn.Module, sdpa_backend: str) -> torch.nn.Module:
    """model.sdpa_backend: every attention module's forward runs inside torch.nn.attention.sdpa_kernel(<backend>).

    Hooks on the attention modules rather than a context in the loop or a backend: they sit inside every caller
    (training, evaluation, generation, each engine's wrapper) and inside activation checkpointing's recomputation,
    which re-runs a block outside the model's own forward. Backward needs no context: the kernel chosen in forward
    fixes its backward. `auto` leaves PyTorch's own choice and adds no hooks."""
    if sdpa_backend == "auto":
        return model
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = getattr(SDPBackend, _SDPA_KERNELS[sdpa_backend])
    entered: list = []  # a stack: attention modules may nest (BERT's BertAttention holds BertSelfAttention)

    def enter(module, args):
        context = sdpa_kernel(kernel)
        context.__enter__()
        entered.append(context)

    def leave(module, args, output):
        entered.pop().__exit__(None, None, None)

    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    if not attention:
        raise UsageError(f"model.sdpa_backend={sdpa_backend}: {type(model).__name__} has no *Attention modules to pin; "
                         "set model.sdpa_backend=auto")
    for m in attention:
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave, always_call=True)  # also when forward raises: the kernel flags are restored
    return model
