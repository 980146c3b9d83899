"""Base-model loading, LoRA / QLoRA wrapping, adapter saving and merging.

* `load_base_model(path, kind, quantize_4bit)`: full precision, or the QLoRA base (4-bit NF4 with
  double quantisation; compute in bf16 on GPU, fp32 on CPU where bitsandbytes also runs).
* `apply_peft(model, mode)`: "none" returns the model unchanged, "lora" / "qlora" wrap it with
  peft LoRA on per-architecture target modules; classification heads stay fully trainable.
* Gradient checkpointing with a frozen base: with reentrant checkpointing a block whose inputs
  do not require grad records no graph, so the LoRA weights inside silently get no gradient.
  We use non-reentrant checkpointing *and* make the embedding output require grad
  (`enable_input_require_grads`), so either style the loop picks yields gradients.
* `save_adapter` (small, what training writes) and `merge_and_save` (full weights that
  `from_pretrained` loads without peft).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from zerokit.errors import UsageError

MODES = ("none", "lora", "qlora")
KINDS = ("causal_lm", "seq_cls", "seq2seq")

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# All linear layers of attention and MLP: LoRA on every projection trains better than q/v only
# (QLoRA paper) at a small cost in adapter size.
TARGET_MODULES = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "bert": ["query", "key", "value", "dense"],
}
_HEADS = ("classifier", "score")  # sequence-classification heads (BERT-style, decoder-style)


def _auto_class(kind: str):
    import transformers as tf
    if kind not in KINDS:
        raise UsageError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    return {"causal_lm": tf.AutoModelForCausalLM, "seq_cls": tf.AutoModelForSequenceClassification,
            "seq2seq": tf.AutoModelForSeq2SeqLM}[kind]


def load_base_model(name_or_path: str | os.PathLike, kind: str = "causal_lm", quantize_4bit: bool = False,
                    num_labels: int = 2, dtype: torch.dtype | None = None, pad_token_id: int | None = None,
                    attn_implementation: str | None = None):
    """Load a pretrained model of `kind` (causal_lm | seq_cls | seq2seq).

    quantize_4bit=True gives the QLoRA base: weights in NF4 with double quantisation placed on this
    process's GPU (LOCAL_RANK) or the CPU. `pad_token_id` is copied into the config (decoder
    classification heads need it to find each row's last token). `attn_implementation`: transformers'
    (None: its default, sdpa where the model has it).
    """
    from transformers import BitsAndBytesConfig

    cls = _auto_class(kind)
    kwargs: dict = {"num_labels": num_labels} if kind == "seq_cls" else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    on_gpu = torch.cuda.is_available()
    if quantize_4bit:
        compute = torch.bfloat16 if on_gpu else torch.float32
        kwargs.update(
            # A classification head stays full precision: it is new (random) and trained in full by LoRA
            # (modules_to_save), which cannot copy a 4-bit layer.
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
                                                   llm_int8_skip_modules=list(_HEADS) if kind == "seq_cls" else None),
            device_map={"": int(os.environ.get("LOCAL_RANK", "0"))} if on_gpu else "cpu",
            dtype=compute)
    else:
        kwargs["dtype"] = dtype or torch.float32
    try:
        model = cls.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise UsageError(f"cannot load {kind} model {str(name_or_path)!r} ({' '.join(str(e).split())}); give a local model folder "
                         "(config.json + weights) or a hub name reachable from this machine") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def is_4bit(model) -> bool:
    # transformers sets this on bitsandbytes-4-bit models; a PeftModel forwards the attribute.
    return bool(getattr(model, "is_loaded_in_4bit", False))


def default_target_modules(model) -> list[str] | None:
    """Our per-architecture choice; None lets peft use its own table (q/v only) for others."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    model_type = getattr(model.config, "model_type", None)
    if model_type in TARGET_MODULES:
        return TARGET_MODULES[model_type]
    if model_type in PEFT_TABLE:
        return None
    raise UsageError(f"no default LoRA target modules for model type {model_type!r}; pass target_modules "
                     "(names of its Linear layers, e.g. ['q_proj','v_proj'])")


def _task_type(model, task_type):
    from peft import TaskType
    names = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS, "seq2seq": TaskType.SEQ_2_SEQ_LM}
    if task_type is None:
        if getattr(model.config, "is_encoder_decoder", False):
            return TaskType.SEQ_2_SEQ_LM
        return TaskType.SEQ_CLS if type(model).__name__.endswith("ForSequenceClassification") else TaskType.CAUSAL_LM
    if isinstance(task_type, TaskType):
        return task_type
    if task_type in names:
        return names[task_type]
    raise UsageError(f"unknown task_type {task_type!r}; choose one of {', '.join(names)}")


def enable_gradient_checkpointing(model) -> None:
    """Checkpointing that keeps LoRA gradients (see module docstring); works on peft models too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    base.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing


def apply_peft(model, mode: str = "none", r: int = 16, alpha: int = 32, dropout: float = 0.05,
               target_modules: list[str] | None = None, task_type=None, gradient_checkpointing: bool = False):
    """Wrap `model` for parameter-efficient fine-tuning; returns the model to train.

    mode "qlora" expects a base from `load_base_model(..., quantize_4bit=True)`. task_type
    (causal_lm | seq_cls | seq2seq) is inferred from the model when None.
    """
    if mode not in MODES:
        raise UsageError(f"unknown peft mode {mode!r}; choose one of {', '.join(MODES)}")
    quantized = is_4bit(model)
    if mode == "none":
        if quantized:
            raise UsageError("a 4-bit model cannot be fully fine-tuned; use mode='qlora' (or load without quantize_4bit)")
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model
    if mode == "qlora" and not quantized:
        raise UsageError("mode='qlora' needs a 4-bit base: load it with load_base_model(..., quantize_4bit=True)")
    if mode == "lora" and quantized:
        raise UsageError("the base is 4-bit: use mode='qlora' (or load without quantize_4bit for plain LoRA)")

    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    task = _task_type(model, task_type)
    if quantized:
        # Casts norms/embeddings to fp32 for stable training and freezes the quantized base;
        # checkpointing is switched on just below, the one way for both modes.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    else:
        # Cheap insurance: if the loop turns on (reentrant) checkpointing later, LoRA still gets grads.
        model.enable_input_require_grads()
    targets = target_modules if target_modules is not None else default_target_modules(model)
    heads = [h for h in _HEADS if hasattr(model, h)] if task == TaskType.SEQ_CLS else None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task,
                        modules_to_save=heads or None,
                        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2")  # GPT-2 uses Conv1D (in, out)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "not found" in str(e) or "Target modules" in str(e):
            raise UsageError(f"LoRA target modules {targets} do not match this model ({e}); pass target_modules "
                             "naming its Linear layers") from None
        raise


def _partitioned(model) -> bool:
    # DeepSpeed ZeRO-3 replaces each parameter by an empty shard and tags it with ds_id.
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _require_peft(model, what: str):
    from peft import PeftModel
    if not isinstance(model, PeftModel):
        raise UsageError(f"{what} needs a LoRA model (apply_peft(..., mode='lora'|'qlora')); for a full model use save_pretrained")


def save_adapter(model, out_dir: str | os.PathLike, tokenizer=None, rank: int = 0) -> Path:
    """Write the LoRA adapter (adapter_config.json + adapter_model.safetensors), tokenizer beside it.

    Under ZeRO-3 every rank must call this (the adapter shards are gathered collectively); rank 0 writes.
    """
    _require_peft(model, "save_adapter")
    out = Path(out_dir)
    if _partitioned(model):
        import deepspeed
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                model.save_pretrained(out)
    elif rank == 0:
        model.save_pretrained(out)
    if tokenizer is not None and rank == 0:
        tokenizer.save_pretrained(out)
    return out


def merge_and_save(model, out_dir: str | os.PathLike, tokenizer=None):
    """Fold the LoRA weights into the base and save full weights `from_pretrained` loads.

    The peft model is consumed (its layers are replaced by merged ones); returns the merged model.
    A 4-bit (QLoRA) base is not merged in place — that would requantise the sum — but into a
    full-precision reload of the base named in the adapter config.
    """
    _require_peft(model, "merge_and_save")
    if _partitioned(model):
        raise UsageError("cannot merge a ZeRO-3 partitioned model in place; save_adapter() on all ranks, then "
                         "merge_adapter(base, adapter_dir, out_dir) in one process")
    if is_4bit(model):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            cfg = model.peft_config[model.active_adapter]
            return merge_adapter(cfg.base_model_name_or_path, tmp, out_dir, tokenizer,
                                 num_labels=getattr(model.config, "num_labels", 2))
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return merged


def merge_adapter(base: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  tokenizer=None, num_labels: int = 2):
    """Merge a saved adapter into a full-precision base and save the result."""
    from peft import PeftConfig, PeftModel

    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    kind = {"SEQ_CLS": "seq_cls", "SEQ_2_SEQ_LM": "seq2seq"}.get(str(getattr(cfg.task_type, "value", cfg.task_type)), "causal_lm")
    base_model = load_base_model(base, kind=kind, num_labels=num_labels)
    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return merged
