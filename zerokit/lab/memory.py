"""Per-rank memory of a training step: measure it, and estimate it for any shape.

Measuring (`measure_step_peak`): a TorchDispatchMode sees every op's outputs and counts
the bytes of live tensor storages (a storage counts once however many views share it,
until it is freed); the peak is taken over one steady-state step.

Estimating (`estimate`): textbook activation formulas miss what HF modules really keep
(unfused gelu_new saves four activation-sized tensors, CPU dropout saves a full-size
noise tensor, the loss keeps fp32 log-probs and needs two more batch x seq x vocab
temporaries in backward). So the estimator does not use one: it *runs* the real
architecture on the meta device (no memory, no compute), with the same counter, at the
real sequence length, for 2 and 4 layers and micro-batch 2 and 3, and extrapolates:
every storage is either proportional to the micro-batch or independent of it (exact
linear fit), and between the backward of the last and of the first block everything
grows linearly with depth. Model states (weights, grads, optimizer, fp32 master) and
ZeRO partitioning are exact formulas on parameter counts of the meta model.

Meta tensors run the CPU code paths, so two GPU behaviours are substituted while
probing for device="cuda": dropout keeps a 1-byte mask (native_dropout), and SDPA is
flash attention (saves q, k, v, out and an fp32 logsumexp; dropout is in-kernel).
For device="cpu" SDPA with dropout falls back to the math path, as torch does on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import math
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zerokit.errors import UsageError

GiB = 2**30
MiB = 2**20

# ---- every constant the estimate uses -------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATE_BYTES = 8        # exp_avg + exp_avg_sq, fp32, per trainable parameter
MASTER_BYTES = 4            # fp32 master copy, per trainable parameter (bf16/fp16 only)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # QLoRA base weight: 4 bits + double-quantised absmax
# DeepSpeed knobs, in elements. planner writes exactly these into the DeepSpeed JSON,
# so what we estimate is what runs.
ZERO_REDUCE_BUCKET = int(5e7)       # reduce_bucket_size; double-buffered with overlap_comm
ZERO_ALLGATHER_BUCKET = int(5e7)    # allgather_bucket_size (stage 1/2 param allgather after step; no buffer)
ZERO3_PERSISTENCE = int(1e5)        # stage3_param_persistence_threshold: smaller params stay whole
ZERO3_LIVE_BLOCKS = 3               # stage3_max_live_parameters = this many blocks (compute + prefetch + backward)
# GPU-only overhead, a rule of thumb (no GPU here to measure it): CUDA context, cuBLAS/NCCL
# workspaces, and caching-allocator slack on top of the live-tensor peak.
CUDA_CONTEXT_BYTES = 1 * GiB
ALLOCATOR_SLACK = 0.05
# Host memory, per rank: python + torch + CUDA libraries, before anything offloaded.
HOST_PROCESS_BYTES = 3 * GiB

STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "optimizer", "params")  # "params" = ZeRO-Infinity: params *and* optimizer on CPU
CKPTS = ("none", "full", "selective")       # selective = every 2nd block checkpointed (HF every_n_layers=2)
PEFTS = ("none", "lora", "qlora")
ATTNS = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")


# ======================================================================================
# Measuring
# ======================================================================================
class LiveBytes(TorchDispatchMode):
    """Counts live tensor-storage bytes, the peak, and (optionally) a log per category.

    A storage is added when an op first returns it and removed when its C++ storage dies
    (storages keep their Python object while alive, so a weakref finalizer fires exactly
    then). Tensors made before the mode was entered count only if passed to `track`.
    Kernel-internal scratch that never leaves an op is not seen. Each storage carries a
    category (`self.cat` when it appeared; `retag` moves it, e.g. into "grad").
    """

    def __init__(self, log: bool = False):
        super().__init__()
        self.live: dict[int, list] = {}  # storage address -> [bytes, category, tag]
        self.by_cat: dict[str, int] = {}
        self.by_tag: dict[str, int] = {}
        self.current = self.peak = 0
        self.cat, self.tag = "act", "other"
        self.phase = self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.marks: dict[str, int] = {}  # live bytes as each phase began
        self.log = [] if log else None   # (phase, saved, logits, temp, grad) at each allocation

    def track(self, t: torch.Tensor, cat: str | None = None) -> None:
        st = t.untyped_storage()
        key = st._cdata  # the StorageImpl address, shared by every view
        if key in self.live:
            return
        n, cat = st.nbytes(), cat or self.cat
        tag = self.tag if cat == "saved" else cat  # sub-module tags only for what forward saves
        self.live[key] = [n, cat, tag]
        self.by_cat[cat] = self.by_cat.get(cat, 0) + n
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n
        self.current += n
        weakref.finalize(st, self._free, key)
        self._changed()

    def retag(self, t: torch.Tensor, cat: str) -> None:
        entry = self.live.get(t.untyped_storage()._cdata)
        if entry and entry[1] != cat:
            self.by_cat[entry[1]] -= entry[0]
            self.by_cat[cat] = self.by_cat.get(cat, 0) + entry[0]
            entry[1] = cat
            self._changed()

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry:
            self.current -= entry[0]
            self.by_cat[entry[1]] -= entry[0]
            self.by_tag[entry[2]] -= entry[0]

    def _changed(self) -> None:
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        if self.log is not None:
            c = self.by_cat
            self.log.append((self.phase, c.get("saved", 0), c.get("logits", 0), c.get("temp", 0), c.get("grad", 0)))

    def set_phase(self, name: str, cat: str | None = None) -> None:
        self.phase = name
        self.cat = cat or self.cat
        self.phase_peaks.setdefault(name, self.current)
        self.marks.setdefault(name, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer, with_params: bool = False):
    """State tensors of a torch optimizer, or of the ones a wrapper (DeepSpeed engine/ZeRO) holds
    in `.optimizer`; with_params adds the tensors it updates (ZeRO's fp32 master partitions)."""
    out = []
    for _ in range(4):  # engine -> ZeRO optimizer -> torch optimizer
        if optimizer is None:
            break
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            out += [t for s in state.values() if isinstance(s, dict) for t in s.values() if isinstance(t, torch.Tensor)]
        if with_params:
            out += [p for g in getattr(optimizer, "param_groups", []) for p in g.get("params", [])
                    if isinstance(p, torch.Tensor)]
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def _train_step(model, batch, optimizer, counter=None, backward=None, step=None):
    phase = counter.set_phase if counter else (lambda name: None)
    phase("forward")
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = out.loss if hasattr(out, "loss") else out
    del out  # a training loop keeps only the loss: the logits die here unless autograd saved them
    phase("backward")
    (backward or (lambda loss: loss.backward()))(loss)
    grads = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    phase("optimizer")
    if step is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        step()
    return grads


def measure_step_peak(model, batch, optimizer, *, warmup: bool = True, backward=None, step=None) -> dict:
    """Peak bytes of live tensors during one steady-state training step.

    `batch`: a dict for `model(**batch)` (the output needs `.loss`), or one tensor for a
    model that returns the loss. With `warmup`, one unmeasured step runs first so the
    optimizer state exists (a first step differs: Adam allocates its state in it).
    `backward(loss)` and `step()` replace `loss.backward()` and `optimizer.step(); zero_grad()`,
    e.g. `backward=engine.backward, step=engine.step` for a DeepSpeed engine.
    Returns bytes: the peak and its phase, the baseline (weights + optimizer state + batch),
    each phase's peak, what forward left alive for backward, the grads; on CUDA also the
    allocator's own peak (`cuda_peak_allocated_bytes`), which sees ZeRO's flat buffers that
    `model.parameters()` and `optimizer.state` do not expose.
    """
    if warmup:
        _train_step(model, batch, optimizer, backward=backward, step=step)
    gc.collect()
    counter = LiveBytes()
    params = list(model.parameters())
    batch_tensors = list(batch.values()) if isinstance(batch, dict) else [batch]
    for t in params + list(model.buffers()) + _optimizer_tensors(optimizer, with_params=True) + batch_tensors:
        counter.track(t)
    baseline = counter.current
    on_cuda = torch.cuda.is_available() and any(t.is_cuda for t in params)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with counter:
        grads = _train_step(model, batch, optimizer, counter, backward, step)
    result = {
        "peak_bytes": counter.peak,
        "peak_phase": counter.peak_phase,
        "baseline_bytes": baseline,
        "params_bytes": _storage_bytes(params),
        "optimizer_state_bytes": _storage_bytes(_optimizer_tensors(optimizer)),
        "grads_bytes": grads,
        "after_forward_bytes": counter.marks["backward"] - baseline,
        "phase_peaks": dict(counter.phase_peaks),
    }
    if on_cuda:
        torch.cuda.synchronize()
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


# ======================================================================================
# Building the model the way training will (shared with the probe and the tests)
# ======================================================================================
def resolve_config(model):
    """A transformers config from a config object, a preset name, or a local path."""
    from pathlib import Path

    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if Path(str(model)).exists():
        return AutoConfig.from_pretrained(str(model))
    try:
        from zerokit.models import model_config
    except ImportError as e:
        raise UsageError(
            f"model {model!r}: presets need zerokit.models, which is not available ({e}); "
            "pass a path to a folder with config.json instead") from e
    return model_config(model)


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
def _quiet_transformers():
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
    cfg.use_cache = False
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
        model.to(DTYPES[precision])
        model.train()
        if peft != "none":
            # on meta a QLoRA base is modelled as LoRA (same saved tensors, weights counted as NF4)
            from zerokit.peft_setup import apply_peft
            model = apply_peft(model, "lora", r=lora_r)
        apply_grad_ckpt(model.get_base_model() if peft != "none" else model, grad_ckpt)
    return model


def _meta_model(config, n_layers: int | None, precision: str, attn: str, peft: str, lora_r: int, grad_ckpt: str):
    with torch.device("meta"):
        return training_model(config, n_layers, precision, attn, peft, lora_r, grad_ckpt)


def _blocks(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise UsageError(f"{type(model).__name__}: no transformer blocks found (needs a transformers "
                         "decoder whose layers derive from GradientCheckpointingLayer)")
    return blocks


# ======================================================================================
# The probe: one training step on the meta device
# ======================================================================================
class _FlashAttention(torch.autograd.Function):
    """Memory model of flash attention: saves q, k, v, out and an fp32 logsumexp; no S x S."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _dropout_as(device):
    def dropout(input, p=0.5, training=True, inplace=False):
        if device == "cuda" and training and p > 0:
            return torch.native_dropout(input, p, True)[0]  # CUDA keeps a 1-byte mask
        return _ORIG["dropout"](input, p, training, inplace)  # CPU (and meta): a noise tensor of input's dtype
    return dropout


def _sdpa_as(device):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        if device == "cpu" and dropout_p > 0:
            # torch on CPU: no fused kernel does dropout, so the math path (S x S probs and noise)
            return torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale)[0]
        return _FlashAttention.apply(q, k, v)
    return sdpa


_ORIG = {"dropout": F.dropout, "sdpa": F.scaled_dot_product_attention}


class _MetaTruth(TorchFunctionMode):
    """transformers' data-dependent checks ("packed sequences?", "mask all ones?") ask meta
    tensors for values they do not have; True is the answer for unpadded training batches."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _as_on_device(device: str):
    """Make meta tensors keep what the target device's kernels keep (see module doc).

    Patches torch.nn.functional for the duration (module globals, so checkpointing's
    recompute inside backward sees them too); not thread-safe, which a probe need not be.
    """
    F.dropout, F.scaled_dot_product_attention = _dropout_as(device), _sdpa_as(device)
    try:
        with _MetaTruth():
            yield
    finally:
        F.dropout, F.scaled_dot_product_attention = _ORIG["dropout"], _ORIG["sdpa"]


def _first_tensor(x):
    for t in tree_leaves(x):
        if isinstance(t, torch.Tensor):
            return t
    return None


def _probe_log(config, n_layers, batch, seq, precision, attn, peft, lora_r, grad_ckpt, device):
    """Run forward+backward on meta; return the allocation log and the forward's saved bytes by tag.

    Phases: forward; head (backward of loss, lm_head, final norm); last / mid / first (the
    backward of the last, middle and first blocks, recompute included); tail (embeddings).
    Categories: saved (kept by forward before the lm_head), logits (lm_head + loss, and their
    backward), temp (backward of blocks: recomputed activations, gradient temporaries), grad.
    """
    model = _meta_model(config, n_layers, precision, attn, peft, lora_r, grad_ckpt)
    counter = LiveBytes(log=True)
    for t in list(model.parameters()) + list(model.buffers()):
        counter.track(t, "base")
    hooks = []
    for p in model.parameters():
        if p.requires_grad:
            hooks.append(p.register_post_accumulate_grad_hook(lambda p: counter.retag(p.grad, "grad")))
    blocks = _blocks(model)

    def enter(name, cat):
        return lambda *_: counter.set_phase(name, cat)

    for i, blk in enumerate(blocks):
        name = "last" if i == len(blocks) - 1 else "first" if i == 0 else "mid"

        def out_hook(mod, args, out, name=name):
            t = _first_tensor(out)
            if t is not None and t.requires_grad and counter.phase == "forward":
                t.register_hook(enter(name, "temp"))
        hooks.append(blk.register_forward_hook(out_hook))
    # grad w.r.t. block 0's input arrives when block 0's backward is done
    def in_hook(mod, args, kwargs):
        t = _first_tensor((args, kwargs))
        if t is not None and t.requires_grad and counter.phase == "forward":
            t.register_hook(enter("tail", "temp"))
    hooks.append(blocks[0].register_forward_pre_hook(in_hook, with_kwargs=True))
    # tag what forward saves by sub-module: attention, MLP, or other (norms, residual, embeddings)
    for mname, mod in model.named_modules():
        leaf = mname.rsplit(".", 1)[-1]
        tag = "attn" if leaf in ("attn", "self_attn", "attention") else "mlp" if leaf in ("mlp", "feed_forward") else None
        if tag:
            hooks.append(mod.register_forward_pre_hook(lambda *_, tag=tag: setattr(counter, "tag", tag)))
            hooks.append(mod.register_forward_hook(lambda *_: setattr(counter, "tag", "other")))
    head = model.get_output_embeddings()
    hooks.append(head.register_forward_pre_hook(lambda *_: setattr(counter, "cat", "logits")))

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with counter, _as_on_device(device), _quiet_transformers():
        counter.set_phase("forward", "saved")
        loss = model(input_ids=ids, labels=ids).loss
        saved_by_tag = {k: v for k, v in counter.by_tag.items()}
        counter.set_phase("head", "logits")
        loss.backward()
    for h in hooks:
        h.remove()
    return counter.log, saved_by_tag


@functools.lru_cache(maxsize=256)
def _probe(cfg_json, cfg_cls, n_layers, batch, seq, precision, attn, peft, lora_r, grad_ckpt, device):
    config = cfg_cls.from_dict(json.loads(cfg_json))
    return _probe_log(config, n_layers, batch, seq, precision, attn, peft, lora_r, grad_ckpt, device)


PROBE_LAYERS = (2, 4)   # block counts probed: 4 - 2 keeps selective's every-2nd pattern aligned
PROBE_BATCHES = (2, 3)  # micro-batches probed (1 can skip copies: size-1 dims are always contiguous)


def _segment_peaks(config, micro_batch, seq, precision, attn, peft, lora_r, grad_ckpt, device, grad_factor):
    """Per phase, (saved, logits, temp, grad) at that phase's peak, extrapolated to the real depth and batch.

    `grad_factor` scales the gradients that build up during backward (1: they stay, as in
    stage 0/1; 0: ZeRO-2/3 reduce them away into partitions counted elsewhere).
    """
    key = (config.to_json_string(use_diff=False), type(config))
    n_layers = config.num_hidden_layers
    per_depth = {}
    for L in PROBE_LAYERS:
        logs = [_probe(*key, L, b, seq, precision, attn, peft, lora_r, grad_ckpt, device)[0] for b in PROBE_BATCHES]
        if len(logs[0]) != len(logs[1]) or any(a[0] != b[0] for a, b in zip(*logs)):
            # the two batches did not run the same storages: probe the real batch instead
            logs = [_probe(*key, L, micro_batch, seq, precision, attn, peft, lora_r, grad_ckpt, device)[0]] * 2
            scale = 0.0
        else:
            scale = (micro_batch - PROBE_BATCHES[0]) / (PROBE_BATCHES[1] - PROBE_BATCHES[0])
        peaks = {}
        for e0, e1 in zip(*logs):
            comps = [a + scale * (b - a) for a, b in zip(e0[1:4], e1[1:4])] + [grad_factor * e0[4]]
            if sum(comps) > sum(peaks.get(e0[0], (-1,))):
                peaks[e0[0]] = comps
        per_depth[L] = peaks
    lo, hi = PROBE_LAYERS
    out = {}
    for seg in ("forward", "head", "last", "first", "tail"):  # "mid" lies between last and first
        if seg in per_depth[lo] and seg in per_depth[hi]:
            a, b = per_depth[lo][seg], per_depth[hi][seg]
            out[seg] = [max(0.0, x + (y - x) * (n_layers - lo) / (hi - lo)) for x, y in zip(a, b)]
    return out


def _saved_per_layer(config, micro_batch, seq, precision, attn, peft, lora_r, grad_ckpt, device):
    """Bytes one block's forward keeps for backward, by sub-module (attn, mlp, other)."""
    key = (config.to_json_string(use_diff=False), type(config))
    lo, hi = PROBE_LAYERS
    b0, b1 = PROBE_BATCHES
    per = {}
    for b in (b0, b1):
        s_lo = _probe(*key, lo, b, seq, precision, attn, peft, lora_r, grad_ckpt, device)[1]
        s_hi = _probe(*key, hi, b, seq, precision, attn, peft, lora_r, grad_ckpt, device)[1]
        per[b] = {t: (s_hi.get(t, 0) - s_lo.get(t, 0)) / (hi - lo) for t in ("attn", "mlp", "other")}
    scale = (micro_batch - b0) / (b1 - b0)
    return {t: int(round(per[b0][t] + scale * (per[b1][t] - per[b0][t]))) for t in per[b0]}


# ======================================================================================
# Model states and ZeRO
# ======================================================================================
@dataclass(frozen=True)
class ModelStats:
    params: int              # unique parameters (tied weights once)
    trainable: int
    quantizable: int         # frozen params in LoRA-adapted linears (NF4 under QLoRA)
    largest_block: int       # parameters of the largest transformer block
    persistent: int          # params below ZeRO-3's persistence threshold (kept whole on every rank)
    largest_trainable: int   # largest single trainable tensor
    matmul_params: int       # params that multiply activations: all but the input embedding (unless tied to the head)
    groups: tuple = ()       # trainable tensor sizes per optimizer group, in the order ZeRO 1/2 flattens them


@functools.lru_cache(maxsize=64)
def _model_stats(cfg_json, cfg_cls, peft, lora_r) -> ModelStats:
    from zerokit.optim import param_groups

    config = cfg_cls.from_dict(json.loads(cfg_json))
    model = _meta_model(config, None, "fp32", "sdpa", peft, lora_r, "none")
    params = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    quantizable = 0
    if peft != "none":
        for m in model.modules():
            base = getattr(m, "base_layer", None)
            if base is not None and hasattr(base, "weight"):
                quantizable += base.weight.numel()
    blocks = _blocks(model)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return ModelStats(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        quantizable=quantizable,
        largest_block=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        persistent=sum(p.numel() for p in params if p.numel() < ZERO3_PERSISTENCE),
        largest_trainable=max(p.numel() for p in trainable),
        matmul_params=sum(p.numel() for p in params) - (0 if head is emb else emb.numel()),
        # the groups zerokit's optimizer gets (weight decay on matrices only), which DeepSpeed flattens
        groups=tuple(tuple(p.numel() for p in g["params"]) for g in param_groups(model, 0.1)),
    )


def partition_overlap(groups, world_size: int, rank: int) -> int:
    """Ψ_r: elements of every tensor that overlaps `rank`'s partition of ZeRO 1/2's flat groups
    (each param group flattened in order, padded to a multiple of 2N, cut in N). ZeRO-2 keeps the
    whole gradient of each such tensor, so a rank holds Ψ_r gradient elements, not Ψ/N."""
    total = 0
    for sizes in groups:
        padded = math.ceil(sum(sizes) / (2 * world_size)) * 2 * world_size
        lo, hi = rank * padded // world_size, (rank + 1) * padded // world_size
        start = 0
        for numel in sizes:
            if start < hi and start + numel > lo:
                total += numel
            start += numel
    return total


def model_stats(config, peft: str = "none", lora_r: int = 16) -> ModelStats:
    return _model_stats(config.to_json_string(use_diff=False), type(config), peft, lora_r)


def zero_config(stage: int, offload: str, stats: ModelStats) -> dict:
    """The zero_optimization section of the DeepSpeed config whose memory `estimate` models."""
    z = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
         "reduce_bucket_size": ZERO_REDUCE_BUCKET}
    if stage in (1, 2):
        z["allgather_bucket_size"] = ZERO_ALLGATHER_BUCKET
    if stage == 3:
        live = ZERO3_LIVE_BLOCKS * stats.largest_block
        z.update(stage3_prefetch_bucket_size=stats.largest_block, stage3_max_live_parameters=live,
                 stage3_max_reuse_distance=live, stage3_param_persistence_threshold=ZERO3_PERSISTENCE)
    if offload in ("optimizer", "params"):
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "params":
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
    return z


# ======================================================================================
# The estimate
# ======================================================================================
@dataclass
class Estimate:
    """Per-rank bytes at the peak of one training step, itemised (the items add up to `total`)."""
    total: int
    peak_phase: str          # forward | head | last | first | tail (backward parts) | optimizer
    weights: int
    gradients: int           # held at the peak (stage 0/1 with no accumulation: what backward has built so far)
    optimizer_state: int
    master_weights: int
    activations: int         # saved by forward for backward, embeddings + all blocks (what is left at the peak)
    logits_loss: int         # logits, fp32 log-probs, their backward temporaries
    backward_temp: int       # recomputed block (checkpointing) + gradient temporaries of blocks
    zero_buffers: int        # buckets, ZeRO-3 gathered params (fwd/bwd) or the step's fp32 grads/temporaries
    overhead: int            # GPU: CUDA context + allocator slack; CPU: 0 (RSS sits above live tensors)
    host_per_rank: int       # CPU RAM per process (offloaded states + process)
    host_per_node: int
    params: int
    trainable_params: int
    per_layer: dict = field(default_factory=dict)  # saved bytes of one block: attn / mlp / other
    inputs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def items(self) -> dict:
        return {k: getattr(self, k) for k in ("weights", "gradients", "optimizer_state", "master_weights",
                                              "activations", "logits_loss", "backward_temp",
                                              "zero_buffers", "overhead")}


def model_states(st: ModelStats, *, world_size: int, stage: int, offload: str, precision: str, peft: str) -> dict:
    """Per-rank bytes of weights, gradients, Adam state and fp32 master: the ZeRO paper's 2+2+12 per
    param, with DeepSpeed's layout as `zerokit memtest` and `zerokit verify` measure it.

    Partitioning: optimizer state + master from stage 1, gradients from stage 2 (whole tensors at
    partition edges), weights in stage 3 (params under the persistence threshold also kept whole).
    Offload moves optimizer state + master (and with "params" the weight partition) to the CPU.
    """
    N, w = world_size, BYTES[precision]
    nf4 = NF4_BYTES if peft == "qlora" else w
    weight_bytes = (st.params - st.quantizable) * w + st.quantizable * nf4
    if stage == 3:
        # every param is partitioned; those under the persistence threshold are also kept whole
        # on every rank (measured by memtest), so they count twice
        weights = st.persistent * w + (0 if offload == "params" else weight_bytes / N)
    else:
        weights = weight_bytes
    opt_shard = N if stage >= 1 else 1
    on_gpu = offload == "none"
    grads_full = st.trainable * w
    if stage == 2:  # ZeRO-2 keeps whole gradients of the tensors that straddle its partition: the busiest rank
        partition_grads = w * (max(partition_overlap(st.groups, N, r) for r in range(N)) if st.groups
                               else st.trainable / N)
    else:
        partition_grads = grads_full / N
    return {
        "weights": weights,
        "weight_bytes": weight_bytes,   # all ranks' weights together, unsharded
        "grads_full": grads_full,
        # gradients kept through the step: full for stage 0/1, the partition for 2/3, none on GPU when offloaded
        "gradients": grads_full if stage < 2 else (partition_grads if on_gpu else 0),
        "optimizer_state": st.trainable * ADAM_STATE_BYTES / opt_shard if on_gpu else 0,
        # ZeRO 1-3 keep an fp32 partition to update even when the model is fp32 (measured by memtest);
        # stage 0 needs a master copy only for bf16/fp16 weights
        "master_weights": (st.trainable * MASTER_BYTES / opt_shard
                           if on_gpu and (stage >= 1 or precision != "fp32") else 0),
    }


def _check(name, value, allowed):
    if value not in allowed:
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(map(str, allowed))}")


def estimate(config, *, world_size: int = 1, stage: int = 0, offload: str = "none", micro_batch: int = 1,
             seq: int = 1024, grad_ckpt: str = "none", precision: str = "bf16", peft: str = "none",
             attn: str = "sdpa", grad_accum: int = 1, gpus_per_node: int | None = None,
             lora_r: int = 16, device: str = "cuda", zero: dict | None = None) -> Estimate:
    """Per-rank memory of one DeepSpeed ZeRO training step (AdamW) on `world_size` data-parallel ranks.

    stage 0 is plain data parallel (what a single-process PyTorch loop does on one rank);
    offload "optimizer" puts fp32 master + Adam state on the CPU (stage >= 1), "params"
    also the weights (stage 3). device="cpu" models torch's CPU kernels and adds no GPU
    overhead: that is what the tests compare with `measure_step_peak`.
    `zero`: the run's zero_optimization section, for its bucket sizes (default: `zero_config`,
    what `zerokit plan` writes).
    """
    config = resolve_config(config)
    _check("stage", stage, STAGES); _check("offload", offload, OFFLOADS); _check("grad_ckpt", grad_ckpt, CKPTS)
    _check("precision", precision, tuple(BYTES)); _check("peft", peft, PEFTS); _check("attn", attn, ATTNS)
    _check("device", device, DEVICES)
    if offload == "optimizer" and stage == 0:
        raise UsageError("--offload optimizer needs ZeRO: use --stage 1, 2 or 3")
    if offload == "params" and stage != 3:
        raise UsageError("--offload params needs --stage 3 (DeepSpeed offloads parameters only in ZeRO-3)")
    if peft == "qlora" and stage == 3:
        raise UsageError("--peft qlora with --stage 3 is not modelled: use --stage 0-2, or --peft lora")
    if min(world_size, micro_batch, seq, grad_accum) < 1:
        raise UsageError("--gpus, --micro-batch, --seq and grad_accum must be >= 1")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and seq > max_pos:
        raise UsageError(f"--seq {seq} exceeds the model's {max_pos} positions: lower --seq")

    N, w = world_size, BYTES[precision]
    mixed = precision != "fp32"
    st = model_stats(config, peft, lora_r)
    ms = model_states(st, world_size=N, stage=stage, offload=offload, precision=precision, peft=peft)
    weights, optim, master, grads_full = ms["weights"], ms["optimizer_state"], ms["master_weights"], ms["grads_full"]
    weight_bytes = ms["weight_bytes"]
    on_gpu_optim = offload == "none"
    opt_shard = N if stage >= 1 else 1

    # gradients: held all step (accumulation, or the ZeRO-2/3 partition) + what backward builds
    if stage >= 2:
        grads_held, grad_factor = ms["gradients"], 0.0
    elif grad_accum > 1:
        grads_held, grad_factor = grads_full, 0.0
    else:
        grads_held, grad_factor = 0, 1.0

    # ---- activations (probed) ----
    args = (config, micro_batch, seq, precision, attn, peft, lora_r, grad_ckpt, device)
    segs = _segment_peaks(*args, grad_factor)
    per_layer = _saved_per_layer(*args)

    # ---- ZeRO buffers ----
    zero = zero or zero_config(stage, offload, st)
    buckets = 0
    if stage >= 1:
        buckets += 2 * zero.get("reduce_bucket_size", ZERO_REDUCE_BUCKET) * w  # double-buffered (overlap_comm)
    # stage 1/2's parameter all-gather after the step writes into the flat weight groups in place:
    # allgather_bucket_size allocates nothing (measured by `zerokit plan --verify`)
    gathered = zero.get("stage3_max_live_parameters", ZERO3_LIVE_BLOCKS * st.largest_block) * w if stage == 3 else 0

    # ---- the optimizer step ----
    step_grads = ms["gradients"]
    if on_gpu_optim:
        if device == "cpu":  # torch's single-tensor AdamW: sqrt and divide, two temporaries of the largest param
            step_temp = 2 * st.largest_trainable * 4
        else:                # foreach AdamW: one fp32 temporary the size of the (partitioned) group
            step_temp = st.trainable * 4 / opt_shard
        if mixed:            # DeepSpeed casts the gradient partition to fp32 for the update
            step_temp += st.trainable * 4 / opt_shard
    else:
        step_temp = 0

    candidates = {}  # per phase: what is live besides weights, optimizer state and master (always there)
    for seg, (saved, logits, temp, grad) in segs.items():
        candidates[seg] = dict(gradients=grads_held + grad, activations=saved, logits_loss=logits,
                               backward_temp=temp, zero_buffers=buckets + gathered)
    candidates["optimizer"] = dict(gradients=step_grads, activations=0, logits_loss=0, backward_temp=0,
                                   zero_buffers=buckets + step_temp)
    phase = max(candidates, key=lambda k: sum(candidates[k].values()))
    parts = {k: int(round(v)) for k, v in candidates[phase].items()}
    parts.update(weights=int(round(weights)), optimizer_state=int(round(optim)), master_weights=int(round(master)))
    live = sum(parts.values())
    overhead = int(CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * live) if device == "cuda" else 0

    # ---- host ----
    host = HOST_PROCESS_BYTES
    if offload != "none":  # master + Adam + fp32 grad partition (pinned), per rank
        host += st.trainable * (MASTER_BYTES + ADAM_STATE_BYTES + 4) / N
    if offload == "params":
        host += (weight_bytes - st.persistent * w) / N
    per_node = gpus_per_node or N

    return Estimate(
        total=live + overhead, peak_phase=phase, overhead=overhead,
        host_per_rank=int(host), host_per_node=int(host * per_node),
        params=st.params, trainable_params=st.trainable, per_layer=per_layer,
        inputs=dict(world_size=N, stage=stage, offload=offload, micro_batch=micro_batch, seq=seq,
                    grad_ckpt=grad_ckpt, precision=precision, peft=peft, attn=attn, grad_accum=grad_accum,
                    device=device, lora_r=lora_r),
        **parts)


# ======================================================================================
# CLI: zerokit estimate
# ======================================================================================
def parse_bytes(text: str) -> int:
    """'80GB', '24GiB', '512G', '1.5TB' -> bytes (GB and GiB both mean 2**30: GPU and DIMM sizes are binary)."""
    t = str(text).strip().upper().replace("IB", "B")
    for suffix, mult in (("TB", 2**40), ("GB", GiB), ("MB", MiB), ("T", 2**40), ("G", GiB), ("M", MiB), ("B", 1)):
        if t.endswith(suffix):
            t, m = t[: -len(suffix)], mult
            break
    else:
        m = GiB  # a bare number means GiB
    try:
        return int(float(t) * m)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a size: write e.g. 80GB or 512GiB") from None


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if abs(n) >= GiB else f"{n / MiB:,.1f} MiB"


_PHASES = {"forward": "forward", "head": "start of backward (loss, lm_head)", "last": "backward of the last block",
           "first": "backward of the first block", "tail": "end of backward (embeddings)",
           "optimizer": "optimizer step"}


def describe(e: Estimate) -> dict:
    """One line per item: what it holds under these settings."""
    i = e.inputs
    N, s, prec = i["world_size"], i["stage"], i["precision"]
    shard = lambda on: f"/{N} ranks" if on and N > 1 else "full copy"
    return {
        "weights": f"{prec} weights, {'NF4 base + ' if i['peft'] == 'qlora' else ''}"
                   + ("on CPU (offload params)" if i["offload"] == "params" else shard(s == 3)),
        "gradients": f"{prec} grads of {e.trainable_params / 1e6:,.2f}M trainable params, "
                     + ("reduced to CPU" if s >= 2 and i["offload"] != "none" else shard(s >= 2)),
        "optimizer_state": "AdamW m+v fp32, " + ("on CPU" if i["offload"] != "none" else shard(s >= 1)),
        "master_weights": "none (fp32 weights, no ZeRO)" if prec == "fp32" and s == 0 else
                          "fp32 master, " + ("on CPU" if i["offload"] != "none" else shard(s >= 1)),
        "activations": f"saved for backward, {i['grad_ckpt']} checkpointing, {i['attn']}",
        "logits_loss": "logits, fp32 log-probs, and their backward temporaries",
        "backward_temp": "recomputed block + gradient temporaries",
        "zero_buffers": {0: "optimizer-step temporaries", 3: "ZeRO-3 gathered params + reduce buckets"}.get(
            s, "reduce buckets + optimizer-step temporaries"),
        "overhead": "CUDA context + allocator slack (rule of thumb)" if i["device"] == "cuda" else "none counted on CPU",
    }


def format_estimate(e: Estimate, name: str = "") -> str:
    i = e.inputs
    lines = [f"zerokit estimate{': ' + name if name else ''} | {i['world_size']} rank(s), ZeRO-{i['stage']}, "
             f"offload {i['offload']}, {i['precision']}, micro-batch {i['micro_batch']} x seq {i['seq']}, "
             f"grad-accum {i['grad_accum']}, grad-ckpt {i['grad_ckpt']}, peft {i['peft']}, {i['attn']}, {i['device']}",
             f"params {e.params / 1e6:,.2f}M, trainable {e.trainable_params / 1e6:,.2f}M",
             f"per rank at the peak ({_PHASES.get(e.peak_phase, e.peak_phase)}):"]
    why = describe(e)
    for k, v in e.items().items():
        lines.append(f"  {k:<16}{fmt_bytes(v):>14}   {why[k]}")
    lines.append(f"  {'total':<16}{fmt_bytes(e.total):>14}")
    pl = e.per_layer
    lines.append(f"saved per block: attention {fmt_bytes(pl['attn'])}, MLP {fmt_bytes(pl['mlp'])}, "
                 f"other {fmt_bytes(pl['other'])}")
    lines.append(f"host RAM: {fmt_bytes(e.host_per_rank)} per rank, {fmt_bytes(e.host_per_node)} per node")
    return "\n".join(lines)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (e.g. gpt2-124m, llama-7b) or path to a config folder")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: min(1024, model's context))")
    p.add_argument("--precision", choices=tuple(BYTES), default="bf16")
    p.add_argument("--peft", choices=PEFTS, default="none")
    p.add_argument("--attn", choices=ATTNS, default="sdpa")
    p.add_argument("--lora-r", type=int, default=16)


def default_seq(config, seq):
    if seq:
        return seq
    return min(1024, getattr(config, "max_position_embeddings", None) or 1024)


def estimate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zerokit estimate", description="Per-rank memory of one training step, itemised.")
    add_model_args(p)
    p.add_argument("--stage", type=int, choices=STAGES, default=0)
    p.add_argument("--offload", choices=OFFLOADS, default="none",
                   help="optimizer: fp32 master + Adam on CPU; params: weights too (stage 3)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-ckpt", choices=CKPTS, default="none")
    p.add_argument("--device", choices=DEVICES, default="cuda", help="cpu: model torch's CPU kernels, no GPU overhead")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    config = resolve_config(a.model)
    e = estimate(config, world_size=a.gpus * a.nodes, stage=a.stage, offload=a.offload, micro_batch=a.micro_batch,
                 seq=default_seq(config, a.seq), grad_ckpt=a.grad_ckpt, precision=a.precision, peft=a.peft,
                 attn=a.attn, grad_accum=a.grad_accum, gpus_per_node=a.gpus, lora_r=a.lora_r, device=a.device)
    if a.json:
        print(json.dumps(dict(e.as_dict(), model=a.model, descriptions=describe(e)), indent=2))
    else:
        print(format_estimate(e, a.model))
    return 0


def _run_cli(main, argv=None) -> int:
    try:
        return main(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(_run_cli(estimate_main))
