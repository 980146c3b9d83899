"""The probe: one training step of the real architecture on the meta device (no memory, no
compute), with the live-storage counter of `zerokit.lab.measure`, at the real sequence length,
for 2 and 4 layers and micro-batch 2 and 3; `segment_peaks` extrapolates to the real depth and
batch: every storage is either proportional to the micro-batch or independent of it (exact
linear fit), and between the backward of the last and of the first block everything grows
linearly with depth.

Textbook activation formulas miss what HF modules really keep (unfused gelu_new saves four
activation-sized tensors, CPU dropout saves a full-size noise tensor, the loss keeps fp32
log-probs and needs two more batch x seq x vocab temporaries in backward); running the module
sees all of it.

Meta tensors run the CPU code paths, so two GPU behaviours are substituted while probing for
device="cuda": dropout keeps a 1-byte mask (native_dropout), and SDPA is flash attention (saves
q, k, v, out and an fp32 logsumexp; dropout is in-kernel). For device="cpu" SDPA with dropout
falls back to the math path, as torch does on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import json

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from zerokit.lab.build import blocks, meta_model, quiet_transformers
from zerokit.lab.measure import LiveBytes


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
    tensors for values they do not have; True is the answer for unpadded training batches.
    torch's meta kernel of `_grouped_mm` (MoE experts) accepts bf16 only, where the CPU and CUDA
    kernels also run fp32/fp16: other dtypes go to transformers' fallback op, whose meta kernel has
    the same output and whose autograd saves the same two tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        if func is torch._grouped_mm and args[0].is_meta and args[1].dtype != torch.bfloat16:
            # _grouped_mm(mat_a, mat_b, offs, bias, out_dtype): transformers passes no bias or out_dtype
            kwargs = kwargs or {}
            offs = args[2] if len(args) > 2 else kwargs.get("offs")
            extra = [*args[3:], *(v for k, v in kwargs.items() if k != "offs")]
            if all(x is None for x in extra):
                return torch.ops.transformers.grouped_mm_fallback(args[0], args[1], offs)
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
    model = meta_model(config, n_layers, precision, attn, peft, lora_r, grad_ckpt)
    counter = LiveBytes(log=True)
    for t in list(model.parameters()) + list(model.buffers()):
        counter.track(t, "base")
    hooks = []
    for p in model.parameters():
        if p.requires_grad:
            hooks.append(p.register_post_accumulate_grad_hook(lambda p: counter.retag(p.grad, "grad")))
    blks = blocks(model)

    def enter(name, cat):
        return lambda *_: counter.set_phase(name, cat)

    for i, blk in enumerate(blks):
        name = "last" if i == len(blks) - 1 else "first" if i == 0 else "mid"

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
    hooks.append(blks[0].register_forward_pre_hook(in_hook, with_kwargs=True))
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
    with counter, _as_on_device(device), quiet_transformers():
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


def segment_peaks(config, micro_batch, seq, precision, attn, peft, lora_r, grad_ckpt, device, grad_factor):
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


def saved_per_layer(config, micro_batch, seq, precision, attn, peft, lora_r, grad_ckpt, device):
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
