"""What the fine-tuning recipes share: one `finetune(cfg, ...)` that loads the base model and its
tokenizer, wraps it for LoRA / QLoRA, builds the task's loader, runs the training loop on any
backend, and exports the trained weights.

    recipe -> finetune(cfg, kind, make_task)
                 tokenizer + task (data, metric) + base model (+ LoRA) -> make_backend -> loop.train
                 -> <run_dir>/adapter (LoRA, loadable by peft) and <run_dir>/model (full weights)

Export is engine-agnostic: the trained weights are gathered parameter by parameter as the fp32
masters (ZeRO-3 and FSDP2 shards all-gathered, DeepSpeed bf16/fp16 masters taken from its optimizer,
every rank taking part), then rank 0 loads them into a full-precision model as `zerokit export` does
(zerokit/export.py) and saves from there. A QLoRA adapter is thus merged into the full-precision
base, not into its 4-bit copy (that would requantise the sum). Checkpoints carry the same recipe
(<ckpt>/model: config, tokenizer, task kind, base path, LoRA layout), so `zerokit export` turns
any of them into the same directories.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Callable

import torch

from zerokit.errors import UsageError
from zerokit.models import MODEL_ALIASES, resolve_model_path  # noqa: F401  (MODEL_ALIASES: re-exported)

log = logging.getLogger("zerokit")

def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {path!r} ({' '.join(str(e).split())[:300]}); "
                         "the model folder needs its tokenizer files (zerokit export writes them)") from None
    if tok.pad_token is None:  # decoder tokenizers often lack one; padding is masked anyway
        if tok.eos_token is None:
            raise UsageError(f"the tokenizer of {path} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def is_encoder_decoder(path: str) -> bool:
    from transformers import AutoConfig
    try:
        return bool(getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {path!r} ({' '.join(str(e).split())[:300]}); give a local model folder "
                         "(config.json + weights) or a hub name reachable from this machine") from None


def check_context(path: str, max_length: int) -> None:
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    ctx = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if ctx and max_length > ctx:
        raise UsageError(f"data.max_length={max_length} exceeds the context of {path} ({ctx} positions); "
                         f"set data.max_length={ctx} or less")


def lora_options(cfg) -> dict:
    lo = cfg.lora
    targets = lo.target_modules
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return dict(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=targets or None)


def check_peft(cfg) -> None:
    from zerokit.peft_setup import MODES
    if cfg.peft not in MODES:
        raise UsageError(f"peft={cfg.peft} is not one of {', '.join(MODES)}")


def build_model(cfg, path: str, kind: str, tokenizer, num_labels: int = 2):
    """The base (4-bit for QLoRA) wrapped for `cfg.peft`, with gradient checkpointing if asked.
    Seeded: the new weights (LoRA A, a classification head) must be equal on every rank, since
    FSDP2 shards each rank's own copy."""
    from zerokit.attention import attn_implementation, pin_sdpa_backend
    from zerokit.peft_setup import apply_peft, load_base_model
    check_peft(cfg)
    torch.manual_seed(cfg.train.seed)
    attn, sdpa_backend = cfg.model.get("attn", "sdpa"), cfg.model.get("sdpa_backend", "auto")
    model = load_base_model(path, kind, quantize_4bit=cfg.peft == "qlora", num_labels=num_labels,
                            pad_token_id=tokenizer.pad_token_id,  # sdpa: transformers' default (eager where a model lacks it)
                            attn_implementation=None if attn == "sdpa" else attn_implementation(attn, sdpa_backend))
    pin_sdpa_backend(model, sdpa_backend)
    dropout = cfg.model.get("dropout")
    if dropout is not None:  # before LoRA: lora.dropout keeps its own value
        set_dropout(model, _number("model.dropout", dropout))
    return apply_peft(model, cfg.peft, gradient_checkpointing=cfg.model.grad_ckpt, **lora_options(cfg))


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout layer of the model to `p` (hidden, attention and head dropout alike; for this run,
    the saved config keeps the base's values)."""
    if not 0 <= p < 1:
        raise UsageError(f"model.dropout must be in [0, 1), got {p}")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def resolve_schedule(cfg, n_train: int, world_size: int) -> None:
    """train.lr null -> lr_auto[peft]; train.epochs -> train.max_steps (epochs x samples / global batch)."""
    t = cfg.train
    t.lr = _number("train.lr", cfg.lr_auto[cfg.peft] if t.lr is None else t.lr)
    if t.epochs is not None:
        t.epochs = _number("train.epochs", t.epochs)
    if t.epochs:
        global_batch = t.micro_batch_size * t.grad_accum * world_size
        t.max_steps = max(1, math.ceil(t.epochs * n_train / global_batch))
        log.info("train.epochs=%s: %d samples / global batch %d -> %d steps", t.epochs, n_train, global_batch, t.max_steps)
    if t.max_steps is None or t.max_steps < 0:
        raise UsageError("set train.max_steps (>= 0) or train.epochs")


def _number(key: str, value) -> float:
    # Keys whose default is null take any YAML value; YAML 1.1 reads 3e-4 (no dot) as a string.
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be a number, got {value!r}") from None


# ----------------------------------------------------------------------------- export

def gather_parameters(module: torch.nn.Module, names: set[str], optimizer=None) -> dict[str, torch.Tensor]:
    """Full CPU copies of the named parameters, whatever shards them, as the fp32 masters where the
    engine keeps 16-bit module copies (DeepSpeed bf16/fp16): ZeRO 1-3 through DeepSpeed's
    safe_get_full_fp32_param (gathers the partitioned masters), ZeRO-0 from the FP16 optimizer's
    groups (`optimizer`, the engine's); frozen ZeRO-3 partitions gathered as they are, FSDP2 DTensors
    by full_tensor (fp32: FSDP's mixed precision casts only for compute). Collective: all ranks call."""
    from torch.distributed.tensor import DTensor
    zero0 = zero0_master_params(optimizer)
    out = {}
    for name, p in module.named_parameters():
        if name not in names:
            continue
        if id(p) in zero0:
            t = zero0[id(p)]
        elif p.requires_grad and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")):
            from deepspeed.utils import safe_get_full_fp32_param
            t = safe_get_full_fp32_param(p)
        elif hasattr(p, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([p]):
                t = p.detach().to("cpu", copy=True)
        elif isinstance(p, DTensor):
            t = p.full_tensor()
        else:
            t = p
        out[name] = t.detach().to("cpu", copy=True)
    return out


def zero0_master_params(optimizer) -> dict[int, torch.Tensor]:
    """id(16-bit param) -> its fp32 master, for DeepSpeed's ZeRO-0 bf16/fp16 optimizers (the
    unfused one keeps a master per parameter, the fused one a flat tensor per group); else empty."""
    if optimizer is None:  # not DeepSpeed: nothing to import
        return {}
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups) for lp, hp in zip(lps, hps)}
    if isinstance(optimizer, FP16_Optimizer):
        out = {}
        for lps, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            for lp, hp in zip(lps, flat[:sum(lp.numel() for lp in lps)].split([lp.numel() for lp in lps])):
                out[id(lp)] = hp.view_as(lp)
        return out
    return {}


def trained_state(backend, peft: str) -> dict[str, torch.Tensor]:
    """What training changed, in fp32: the trainable parameters under LoRA/QLoRA (the frozen base is the
    file we started from); every parameter and persistent buffer under full fine-tuning."""
    module = backend.module
    names = {n for n, p in module.named_parameters() if p.requires_grad or peft == "none"}
    state = gather_parameters(module, names, getattr(getattr(backend, "engine", None), "optimizer", None))
    if peft == "none":
        persistent = module.state_dict().keys()
        state.update({n: b.detach().to("cpu", copy=True) for n, b in module.named_buffers() if n in persistent})
    return state


def run_model_config(path: str, kind: str, num_labels: int, pad_token_id: int | None):
    """The config of the trained model as load_base_model builds it (labels, pad token), full precision."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, **({"num_labels": num_labels} if kind == "seq_cls" else {}))
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config


def export_trained(cfg, backend, info, spec, config, lora_config, tokenizer) -> dict:
    """export.adapter -> <run_dir>/adapter (LoRA only); export.merge -> <run_dir>/model (full weights
    from_pretrained loads: LoRA merged into the full-precision base, or the fully fine-tuned model).
    Both from the fp32 masters, assembled on rank 0 as `zerokit export` does. All ranks call."""
    from zerokit.dist import barrier
    from zerokit.export import atomic_dir, save_adapter_dir, save_model_dir, trained_model
    ex, run_dir = cfg.export, Path(cfg.run_dir)
    adapter = ex.adapter and cfg.peft != "none"
    if not (adapter or ex.merge):
        return {}
    state = trained_state(backend, cfg.peft)
    written = {}
    if info.is_main:
        model = trained_model(spec, config, lora_config, state)
        if adapter:
            with atomic_dir(run_dir / "adapter") as tmp:
                save_adapter_dir(model, tmp, tokenizer)
            written["adapter"] = str(run_dir / "adapter")
        if ex.merge:
            with atomic_dir(run_dir / "model") as tmp:
                save_model_dir(model, tmp, tokenizer)
            written["model"] = str(run_dir / "model")
        log.info("exported %s", ", ".join(f"{k} -> {v}" for k, v in written.items()))
    barrier()
    return written


# ----------------------------------------------------------------------------- the recipe body

def finetune(cfg, kind: str, make_task: Callable, num_labels: int = 2, on_summary: Callable | None = None) -> dict:
    """Run a fine-tuning recipe. `kind` is seq_cls, or causal_lm (seq2seq is picked when the base is
    an encoder-decoder); `make_task(tokenizer, encoder_decoder)` returns the task (data + metric)."""
    from zerokit.backends import make_backend
    from zerokit.config import save_config
    from zerokit.dist import init_distributed
    from zerokit.export import ModelSpec, write_model_info
    from zerokit.loop import train

    check_peft(cfg)
    for key in ("tensor", "pipeline"):  # its evaluation gathers predictions from every rank: each group's would repeat
        if cfg.parallel.get(key, 1) > 1:
            raise UsageError(f"parallel.{key}={cfg.parallel[key]}: the fine-tuning recipes do not take {key} "
                             f"parallelism yet; set parallel.{key}=1 (recipes/pretrain_gpt.py does)")
    info = init_distributed(cfg.train.dist_timeout_s, cfg.train.cpu_threads)
    path = resolve_model_path(cfg.model.name_or_path)
    encoder_decoder = kind == "causal_lm" and is_encoder_decoder(path)
    if encoder_decoder:
        kind = "seq2seq"
    tokenizer = load_tokenizer(path)
    task = make_task(tokenizer, encoder_decoder)
    check_context(path, task.max_length)
    t = cfg.train
    loader = task.train_batches(t.micro_batch_size, t.grad_accum, info.rank, info.world_size, t.seed,
                                 group_by_length=cfg.data.group_by_length)
    resolve_schedule(cfg, loader.n, info.world_size)
    model = build_model(cfg, path, kind, tokenizer, num_labels)
    # Pre-trained bases carry parts a task never uses (an encoder-decoder's encoder pooler), which DDP
    # refuses unless told; HF Trainer's default too. The cost is one autograd-graph walk per step.
    backend = make_backend(model, t, info, cfg.ds_config, cfg.fsdp, cfg.fsdp_offload, find_unused_parameters=True,
                           optim=cfg.optim)

    # What `zerokit export` needs besides the weights: the model config, tokenizer, task kind, base, LoRA layout.
    base = str(Path(path).resolve()) if Path(path).exists() else path  # export may run from another folder
    spec = ModelSpec(kind=kind, peft=cfg.peft, base=base)
    config = run_model_config(path, kind, num_labels, tokenizer.pad_token_id)
    lora_config = None
    if cfg.peft != "none":
        lora_config = copy.deepcopy(model.peft_config[model.active_adapter])
        lora_config.base_model_name_or_path = base

    def write_extras(ckpt: Path) -> None:
        save_config(cfg, ckpt / "config.yaml")
        write_model_info(ckpt / "model", spec, config, tokenizer, lora_config)

    summary = train(cfg, backend=backend, task=task, loader=loader, info=info, seq_len=task.max_length,
                    write_extras=write_extras)
    if summary.get("preempted") or summary.get("nothing_to_do"):
        return summary
    export_trained(cfg, backend, info, spec, config, lora_config, tokenizer)
    if info.is_main and on_summary:
        on_summary(summary)
    return summary
