"""`zerokit estimate`: per-rank memory of one training step, for any shape, itemised.

Model states come from the ZeRO formula (`zerokit.lab.zero_formula`) on the meta model's
parameter counts; activations, logits/loss and backward temporaries from the meta-device probe
(`zerokit.lab.probe`); ZeRO's buffers from the run's zero section (default: the "auto" sizes
zerokit's DeepSpeed backend fills). `zerokit.lab.measure` measures the same quantities on real
steps, which is how the tests hold the estimate to account.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

from zerokit.backends.deepspeed import DEEPSPEED_DEFAULT_BUCKETS
from zerokit.errors import UsageError
from zerokit.optim import check_engine
from zerokit.lab.build import default_seq, resolve_config
from zerokit.lab.flags import (GiB, OFFLOADS, STAGES, add_gpus, add_micro_batch, add_model, add_offload, add_json,
                               add_optim, add_precision, add_seq, add_stage, check_offload, fmt_bytes, offload_parts,
                               parser, run_cli)
from zerokit.lab.probe import saved_per_layer, segment_peaks
from zerokit.lab.zero_formula import BYTES, model_states, model_stats, zero_config

# GPU-only overhead, a rule of thumb (no GPU here to measure it): CUDA context, cuBLAS/NCCL
# workspaces, and caching-allocator slack on top of the live-tensor peak.
CUDA_CONTEXT_BYTES = 1 * GiB
ALLOCATOR_SLACK = 0.05
# Host memory, per rank: python + torch + CUDA libraries, before anything offloaded.
HOST_PROCESS_BYTES = 3 * GiB

CKPTS = ("none", "full", "selective")       # selective = every 2nd block checkpointed (HF every_n_layers=2)
PEFTS = ("none", "lora", "qlora")
ATTNS = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")


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
    active_params: int | None = None  # mixture of experts: what one token uses (non-expert + top_k/experts of experts)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def items(self) -> dict:
        return {k: getattr(self, k) for k in ("weights", "gradients", "optimizer_state", "master_weights",
                                              "activations", "logits_loss", "backward_temp",
                                              "zero_buffers", "overhead")}


def _zero_size(zero: dict, key: str) -> int:
    """A size of the zero section; one it leaves out is what DeepSpeed uses then."""
    if key in zero:
        return int(zero[key])
    if key in DEEPSPEED_DEFAULT_BUCKETS:
        return DEEPSPEED_DEFAULT_BUCKETS[key]
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    return int(getattr(DeepSpeedZeroConfig(), key.replace("stage3_", "")))


def _check(name, value, allowed):
    if value not in allowed:
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(map(str, allowed))}")


def estimate(config, *, world_size: int = 1, stage: int = 0, offload: str = "none", micro_batch: int = 1,
             seq: int = 1024, grad_ckpt: str = "none", precision: str = "bf16", peft: str = "none",
             attn: str = "sdpa", grad_accum: int = 1, gpus_per_node: int | None = None,
             lora_r: int = 16, device: str = "cuda", zero: dict | None = None, optim: str = "adamw") -> Estimate:
    """Per-rank memory of one DeepSpeed ZeRO training step on `world_size` data-parallel ranks, with the
    optimizer `optim` (optim.name; its step's temporaries are modelled as AdamW's).

    stage 0 is plain data parallel (what a single-process PyTorch loop does on one rank);
    offload "optimizer" puts fp32 master + Adam state on the CPU (stage >= 1), "params" the
    ZeRO-3 weight partition (stage 3), "all" both. device="cpu" models torch's CPU kernels and
    adds no GPU overhead: that is what the tests compare with `measure_step_peak`.
    `zero`: the run's zero_optimization section, for its sizes (default: `zero_config`: the "auto"
    sizes zerokit's DeepSpeed backend fills, as `zerokit plan` writes them).
    """
    config = resolve_config(config)
    _check("stage", stage, STAGES); _check("offload", offload, OFFLOADS); _check("grad_ckpt", grad_ckpt, CKPTS)
    _check("precision", precision, tuple(BYTES)); _check("peft", peft, PEFTS); _check("attn", attn, ATTNS)
    _check("device", device, DEVICES)
    check_offload(stage, offload)
    # reduce_scatter: off is how ZeRO-3 takes Muon, and it changes no memory item here
    check_engine(optim, "deepspeed" if stage else "plain", offload=offload_parts(offload)[0], stage=stage,
                 reduce_scatter=False)
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
    zero = zero or zero_config(stage, offload, st)
    ms = model_states(st, world_size=N, stage=stage, offload=offload, precision=precision, peft=peft, zero=zero,
                      optim=optim)
    weights, state, master, grads_full = ms["weights"], ms["optimizer_state"], ms["master_weights"], ms["grads_full"]
    on_gpu_optim = not offload_parts(offload)[0]
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
    segs = segment_peaks(*args, grad_factor)
    per_layer = saved_per_layer(*args)

    # ---- ZeRO buffers ----
    # a size the section leaves out is DeepSpeed's own default
    buckets = 2 * _zero_size(zero, "reduce_bucket_size") * w if stage >= 1 else 0  # double-buffered (overlap_comm)
    # stage 1/2's parameter all-gather after the step writes into the flat weight groups in place:
    # allgather_bucket_size allocates nothing (measured by `zerokit plan --verify`); ZeRO-3 gathers
    # up to its live-parameter limit, and never more than the whole model
    gathered = min(_zero_size(zero, "stage3_max_live_parameters"), st.params) * w if stage == 3 else 0

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
    parts.update(weights=int(round(weights)), optimizer_state=int(round(state)), master_weights=int(round(master)))
    live = sum(parts.values())
    overhead = int(CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * live) if device == "cuda" else 0

    # ---- host ----
    host = HOST_PROCESS_BYTES + sum(ms["host"].values())  # + what offload put there (pinned), per rank
    per_node = gpus_per_node or N

    return Estimate(
        total=live + overhead, peak_phase=phase, overhead=overhead,
        host_per_rank=int(host), host_per_node=int(host * per_node),
        params=st.params, trainable_params=st.trainable, per_layer=per_layer, active_params=active_params(config),
        inputs=dict(world_size=N, stage=stage, offload=offload, micro_batch=micro_batch, seq=seq,
                    grad_ckpt=grad_ckpt, precision=precision, peft=peft, attn=attn, grad_accum=grad_accum,
                    device=device, lora_r=lora_r, optim=optim),
        **parts)


OPTIMIZER_STATE = {"adamw": "AdamW m+v fp32", "lion": "Lion m fp32", "adamw8bit": "AdamW m+v 8-bit + block absmax",
                   "lion8bit": "Lion m 8-bit + block absmax", "muon": "Muon momentum fp32 + AdamW m+v on the rest"}
PHASES = {"forward": "forward", "head": "start of backward (loss, lm_head)", "last": "backward of the last block",
           "first": "backward of the first block", "tail": "end of backward (embeddings)",
           "optimizer": "optimizer step"}


def describe(e: Estimate) -> dict:
    """One line per item: what it holds under these settings."""
    i = e.inputs
    N, s, prec = i["world_size"], i["stage"], i["precision"]
    off_opt, off_params = offload_parts(i["offload"])
    shard = lambda on: f"/{N} ranks" if on and N > 1 else "full copy"
    return {
        "weights": f"{prec} weights, {'NF4 base + ' if i['peft'] == 'qlora' else ''}"
                   + ("on CPU (offload params)" if off_params else shard(s == 3)),
        "gradients": f"{prec} grads of {e.trainable_params / 1e6:,.2f}M trainable params, "
                     + ("reduced to CPU" if s >= 2 and off_opt else shard(s >= 2)),
        "optimizer_state": OPTIMIZER_STATE[i.get("optim", "adamw")] + ", " + ("on CPU" if off_opt else shard(s >= 1)),
        "master_weights": "none (fp32 weights, no ZeRO)" if prec == "fp32" and s == 0 else
                          "fp32 master, " + ("on CPU" if off_opt else shard(s >= 1)),
        "activations": f"saved for backward, {i['grad_ckpt']} checkpointing, {i['attn']}",
        "logits_loss": "logits, fp32 log-probs, and their backward temporaries",
        "backward_temp": "recomputed block + gradient temporaries",
        "zero_buffers": {0: "optimizer-step temporaries", 3: "ZeRO-3 gathered params + reduce buckets"}.get(
            s, "reduce buckets + optimizer-step temporaries"),
        "overhead": "CUDA context + allocator slack (rule of thumb)" if i["device"] == "cuda" else "none counted on CPU",
    }


def active_params(config) -> int:
    """Parameters one token passes through: all but the (1 - top_k/num_experts) share of the routed
    experts' (a mixture of experts, counted on the meta model); all of them for a dense model."""
    return _active_params(config.to_json_string(use_diff=False), type(config))


@functools.lru_cache(maxsize=64)
def _active_params(cfg_json, cfg_cls) -> int:
    from zerokit.lab.build import meta_model
    from zerokit.moe import inactive_params
    model = meta_model(cfg_cls.from_dict(json.loads(cfg_json)), None, "fp32", "sdpa", "none", 16, "none")
    return sum({id(p): p.numel() for p in model.parameters()}.values()) - inactive_params(model)


def kv_cache_bytes_per_token(config, precision: str = "bf16") -> int:
    """Generation's KV cache for one token of one sequence: 2 (K and V) x layers x kv_heads x head_dim x dtype
    bytes. kv_heads is num_key_value_heads where the config has it (GQA, MQA), else the attention heads (MHA)."""
    config = resolve_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * BYTES[precision]


def format_estimate(e: Estimate, name: str = "") -> str:
    i = e.inputs
    lines = [f"zerokit estimate{': ' + name if name else ''} | {i['world_size']} rank(s), ZeRO-{i['stage']}, "
             f"offload {i['offload']}, {i['precision']}, micro-batch {i['micro_batch']} x seq {i['seq']}, "
             f"grad-accum {i['grad_accum']}, grad-ckpt {i['grad_ckpt']}, peft {i['peft']}, {i['attn']}, {i['device']}, {i.get('optim', 'adamw')}",
             f"params {e.params / 1e6:,.2f}M, trainable {e.trainable_params / 1e6:,.2f}M"
             + (f", active per token {e.active_params / 1e6:,.2f}M (mixture of experts)"
                if e.active_params not in (None, e.params) else ""),
             f"per rank at the peak ({PHASES.get(e.peak_phase, e.peak_phase)}):"]
    why = describe(e)
    for k, v in e.items().items():
        lines.append(f"  {k:<16}{fmt_bytes(v):>14}   {why[k]}")
    lines.append(f"  {'total':<16}{fmt_bytes(e.total):>14}")
    pl = e.per_layer
    lines.append(f"saved per block: attention {fmt_bytes(pl['attn'])}, MLP {fmt_bytes(pl['mlp'])}, "
                 f"other {fmt_bytes(pl['other'])}")
    lines.append(f"host RAM: {fmt_bytes(e.host_per_rank)} per rank, {fmt_bytes(e.host_per_node)} per node")
    return "\n".join(lines)


def add_model_args(p) -> None:
    """The shape of the run, shared by `zerokit estimate` and `zerokit plan`."""
    add_model(p)
    add_gpus(p, default=1)
    p.add_argument("--nodes", type=int, default=1)
    add_seq(p, None)
    add_precision(p, "bf16")
    p.add_argument("--peft", choices=PEFTS, default="none")
    p.add_argument("--attn", choices=ATTNS, default="sdpa")
    p.add_argument("--lora-r", type=int, default=16)


def estimate_main(argv: list[str] | None = None) -> int:
    p = parser("zerokit estimate", "Per-rank memory of one training step, itemised.",
               "zerokit estimate --model llama-7b --gpus 8 --stage 3 --micro-batch 2 --seq 2048 --grad-ckpt full")
    add_model_args(p)
    add_stage(p)
    add_offload(p)
    add_micro_batch(p)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-ckpt", choices=CKPTS, default="none")
    add_optim(p)
    p.add_argument("--device", choices=DEVICES, default="cuda", help="cpu: model torch's CPU kernels, no GPU overhead")
    add_json(p)
    a = p.parse_args(argv)
    config = resolve_config(a.model)
    e = estimate(config, world_size=a.gpus * a.nodes, stage=a.stage, offload=a.offload, micro_batch=a.micro_batch,
                 seq=default_seq(config, a.seq), grad_ckpt=a.grad_ckpt, precision=a.precision, peft=a.peft,
                 attn=a.attn, grad_accum=a.grad_accum, gpus_per_node=a.gpus, lora_r=a.lora_r, device=a.device,
                 optim=a.optim)
    kv = kv_cache_bytes_per_token(config, a.precision)  # generation, not the training step: reported beside it
    if a.json:
        print(json.dumps(dict(e.as_dict(), model=a.model, descriptions=describe(e), kv_cache_bytes_per_token=kv), indent=2))
    else:
        print(format_estimate(e, a.model) + f"\ngeneration KV cache ({a.precision}): {kv:,} bytes per token per sequence")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(estimate_main))
