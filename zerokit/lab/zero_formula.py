"""The ZeRO formula: per-rank bytes of weights, gradients, fp32 master and Adam state for a
parameter layout (`ModelStats`, counted on the meta model), a stage, an offload and a rank,
in DeepSpeed's layout as `zerokit memtest` and `zerokit verify` measure it. The one copy:
`estimate`, `plan`, `verify` and `memtest` all read it.

Per rank, Ψ trainable parameters, N ranks, w bytes per weight (4 fp32, 2 bf16/fp16):
    weights    wΨ;  ZeRO-3: wΨ/N + wΨ_persist (params under the persistence threshold are
               partitioned *and* kept whole on every rank)
    gradients  wΨ (stage 0, 1: full grads through the accumulation window)
               wΨ_r (stage 2: every tensor overlapping rank r's flat partition, whole)
               wΨ/N (stage 3: each tensor split evenly)
    master     4Ψ/N from stage 1 (the ZeRO optimizer keeps its own fp32 partition even for fp32
               models); stage 0: 4Ψ only for bf16/fp16 weights
    moments    the optimizer's state (`optimizer_state_bytes`), of each whole tensor, or from stage 1 of
               each rank's flat partition of each param group (≈ /N): AdamW 8 (m, v fp32), Lion 4 (m),
               Muon 4 (momentum) on the blocks' matrices + AdamW's 8 on the rest; bitsandbytes' 8-bit
               states are 1 byte per moment + one fp32 absmax per 256-element block, but fp32 for a
               tensor (or partition) under 4096 elements: AdamW8bit 2 + 8/256, Lion8bit 1 + 4/256
Offload (--offload optimizer / all) moves master and moments to the host, with the gradient
partition and an fp32 gradient copy 4Ψ/N; parameters (--offload params / all) move the ZeRO-3
weight partition. Each item is returned on the device and on the host.

ZeRO's sizes are DeepSpeed's "auto" values as zerokit's backend fills them
(`zerokit.backends.deepspeed.auto_bucket_sizes`): the estimate models what a run with "auto" gets.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

from zerokit.backends.deepspeed import auto_bucket_sizes
from zerokit.lab.build import blocks, meta_model
from zerokit.lab.flags import offload_parts

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Optimizer state per element: (moments, bytes per moment when 8-bit) -- fp32 moments are 4 bytes each.
MOMENTS = {"adamw": 2, "lion": 1, "adamw8bit": 2, "lion8bit": 1, "muon": 1}
BNB_BLOCK = 256             # bitsandbytes' block-wise quantisation: one fp32 absmax per moment per block
BNB_MIN_8BIT = 4096         # its min_8bit_size: smaller tensors keep fp32 moments
MASTER_BYTES = 4            # fp32 master copy, per trainable parameter
FP32 = 4                    # gradients as the ZeRO optimizer accumulates and offloads them
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # QLoRA base weight: 4 bits + double-quantised absmax
# stage3_max_live_parameters the plan writes: this many blocks (compute + prefetch + backward);
# a setting of the plan's DeepSpeed JSON, not a DeepSpeed default
ZERO3_LIVE_BLOCKS = 3
STATE_ITEMS = ("weights", "gradients", "optimizer_state", "master_weights")


@dataclass(frozen=True)
class ModelStats:
    params: int              # unique parameters (tied weights once)
    trainable: int
    quantizable: int         # frozen params in LoRA-adapted linears (NF4 under QLoRA)
    largest_block: int       # parameters of the largest transformer block
    largest_trainable: int   # largest single trainable tensor
    matmul_params: int       # params that multiply activations: all but the input embedding (unless tied to the head)
    hidden_size: int         # what DeepSpeed's "auto" sizes derive from
    sizes: tuple = ()        # numel of every unique parameter
    groups: tuple = ()       # trainable tensor sizes per optimizer group, in the order ZeRO 1/2 flattens them
    muon_groups: tuple = ()  # the same under optim.name=muon: (sizes, on Muon?) per group (zerokit.optim.muon_groups)

    def persistent(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps whole on every rank: those under stage3_param_persistence_threshold."""
        return sum(n for n in self.sizes if n < threshold)


@functools.lru_cache(maxsize=64)
def _model_stats(cfg_json, cfg_cls, peft, lora_r) -> ModelStats:
    from zerokit.optim import muon_groups, param_groups

    config = cfg_cls.from_dict(json.loads(cfg_json))
    model = meta_model(config, None, "fp32", "sdpa", peft, lora_r, "none")
    params = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    quantizable = 0
    if peft != "none":
        for m in model.modules():
            base = getattr(m, "base_layer", None)
            if base is not None and hasattr(base, "weight"):
                quantizable += base.weight.numel()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return ModelStats(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        quantizable=quantizable,
        largest_block=max(sum(p.numel() for p in b.parameters()) for b in blocks(model)),
        largest_trainable=max(p.numel() for p in trainable),
        matmul_params=sum(p.numel() for p in params) - (0 if head is emb else emb.numel()),
        hidden_size=config.hidden_size,
        sizes=tuple(p.numel() for p in params),
        # the groups zerokit's optimizer gets (weight decay on matrices only), which DeepSpeed flattens
        groups=tuple(tuple(p.numel() for p in g["params"]) for g in param_groups(model, 0.1)),
        muon_groups=tuple((tuple(p.numel() for p in g["params"]), "lr_scale" in g)
                          for g in (lambda adam, muon: adam + muon)(*muon_groups(model, 0.1, 1.0))),
    )


def model_stats(config, peft: str = "none", lora_r: int = 16) -> ModelStats:
    return _model_stats(config.to_json_string(use_diff=False), type(config), peft, lora_r)


def tensor_state_bytes(optim: str, numel: float, muon: bool = False) -> float:
    """Optimizer state bytes of one tensor (or one flat ZeRO partition) of `numel` elements."""
    if optim == "muon":
        return numel * (4 if muon else 8)
    moments = MOMENTS[optim]
    if optim.endswith("8bit") and numel >= BNB_MIN_8BIT:
        return moments * (numel + 4 * math.ceil(numel / BNB_BLOCK))
    return moments * 4 * numel


def optimizer_state_bytes(st: ModelStats, optim: str = "adamw", shards: int = 1) -> float:
    """Per-rank optimizer state: of each whole tensor (`shards` 1: plain, DDP, ZeRO-0), or of each rank's
    1/N of every flattened param group (ZeRO 1-3, `shards` N)."""
    groups = st.muon_groups if optim == "muon" else [(sizes, False) for sizes in st.groups]
    if not groups:  # a ModelStats built by hand: one tensor
        return tensor_state_bytes(optim, st.trainable / shards)
    if shards == 1:
        return sum(tensor_state_bytes(optim, n, muon) for sizes, muon in groups for n in sizes)
    return sum(tensor_state_bytes(optim, sum(sizes) / shards, muon) for sizes, muon in groups)


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


def zero_config(stage: int, offload: str, stats: ModelStats) -> dict:
    """The zero_optimization section whose memory `estimate` models, and that `zerokit plan` writes:
    DeepSpeed's "auto" sizes as zerokit's backend fills them, and ZeRO-3's live parameters capped."""
    z = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    sizes = auto_bucket_sizes(stats.hidden_size)
    if stage >= 1:
        z["reduce_bucket_size"] = sizes["reduce_bucket_size"]
    if stage == 3:
        live = ZERO3_LIVE_BLOCKS * stats.largest_block
        z.update(stage3_prefetch_bucket_size=sizes["stage3_prefetch_bucket_size"], stage3_max_live_parameters=live,
                 stage3_max_reuse_distance=live,
                 stage3_param_persistence_threshold=sizes["stage3_param_persistence_threshold"])
    opt, params = offload_parts(offload)
    if opt:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params:
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
    return z


def model_states(st: ModelStats, *, world_size: int, stage: int, offload: str, precision: str, peft: str,
                 rank: int | None = None, zero: dict | None = None, optim: str = "adamw") -> dict:
    """Per-rank bytes of weights, gradients, optimizer state and fp32 master (see the module doc), on the
    device (the top-level items) and on the host (`host`, same items). `rank`: whose ZeRO-2 gradient
    partition (default: the busiest rank's). `zero`: the run's zero section, for its persistence
    threshold (default `zero_config`'s). `optim`: optim.name."""
    N, w = world_size, BYTES[precision]
    off_opt, off_params = offload_parts(offload)
    nf4 = NF4_BYTES if peft == "qlora" else w
    weight_bytes = (st.params - st.quantizable) * w + st.quantizable * nf4
    zero = zero or zero_config(stage, offload, st)
    persistent = st.persistent(zero.get("stage3_param_persistence_threshold", 0)) if stage == 3 else 0
    opt_shard = N if stage >= 1 else 1
    grads_full = st.trainable * w
    if stage == 2:  # whole gradients of the tensors that straddle the partition
        ranks = [rank] if rank is not None else range(N)
        partition = max(partition_overlap(st.groups, N, r) for r in ranks) if st.groups else st.trainable / N
    else:
        partition = st.trainable / N
    master = st.trainable * MASTER_BYTES / opt_shard if stage >= 1 or precision != "fp32" else 0
    moments = optimizer_state_bytes(st, optim, opt_shard)
    if stage == 3:
        # every param is partitioned; those under the persistence threshold are also kept whole
        device_weights, host_weights = persistent * w, weight_bytes / N
        if not off_params:
            device_weights, host_weights = device_weights + host_weights, 0
    else:
        device_weights, host_weights = weight_bytes, 0
    if stage < 2:
        device_grads = grads_full
    else:
        device_grads = 0 if off_opt else partition * w
    host = {"weights": host_weights, "gradients": 0, "optimizer_state": 0, "master_weights": 0}
    if off_opt:
        # the fp32 gradient partition the CPU optimizer reads, and (stage 2/3) the accumulated partition
        host.update(gradients=st.trainable * FP32 / N + (partition * FP32 if stage >= 2 else 0),
                    optimizer_state=moments, master_weights=master)
    return {
        "weights": device_weights,
        "gradients": device_grads,
        "optimizer_state": 0 if off_opt else moments,
        "master_weights": 0 if off_opt else master,
        "host": host,
        "weight_bytes": weight_bytes,   # all ranks' weights together, unsharded
        "grads_full": grads_full,
    }
