"""Pipeline parallel (`parallel.pipeline` > 1), data parallel across the replicas of each stage.

Each rank holds one stage (zerokit/pipeline.py) and its optimizer. An accumulation window's micro-batches
go through the GPipe or 1F1B schedule in one call (`run_window`, which replaces the loop's
per-micro-batch forward/backward); the loss is computed on the last stage and summed over the pipeline,
so every rank reports its replica's loss. The replicas of a stage then average their gradients in one
all-reduce over the data-parallel group (what DDP computes; DDP itself fails inside the schedule: its
reducer's bucket rebuild after the first step asserts on the pipeline's split backward, torch 2.13), or
FSDP2 shards each stage over its replicas (the schedule drives its gradient sync). The gradient norm is
the whole model's: the squares of each rank's gradients (FSDP: its shards) summed over the pipeline
(FSDP: over every rank), where torch's clip_grad_norm_ would see one stage only; clipping uses it.
Checkpoints are DCP's, every stage writing its own parameters under the full model's names, the
optimizer state flattened per parameter name (torchtitan does the same for pipelines).
"""
from __future__ import annotations

from pathlib import Path

import logging

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from zerokit.backends.common import resolve_precision
from zerokit.backends.plain import PlainBackend
from zerokit.dist import DistInfo
from zerokit.errors import UsageError
from zerokit.optim import build_optimizer
from zerokit.pipeline import PipelinedLM, Stage, build_schedule, check_pipeline, first_last_group, is_tied, stage_layers

log = logging.getLogger("zerokit")
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class PipelineBackend(PlainBackend):
    """`fsdp`: none (replicas all-reduce their gradients) or an FSDP2 strategy over each stage's replicas.
    fp32 or bf16 autocast (as the plain backend); no fp16 loss scaling, no torch.compile."""
    name = "pipeline"

    def __init__(self, model: torch.nn.Module, train, info: DistInfo, schedule: str = "1f1b", optim=None,
                 fsdp: str = "none"):
        pp = info.pipeline_parallel
        self.info = info
        self.precision = resolve_precision(train.precision, info.device)
        if self.precision == "fp16":
            raise UsageError("parallel.pipeline > 1 with train.precision=fp16 is not supported (no loss scaling "
                             "through the schedule); set train.precision=bf16 or fp32")
        if train.get("compile"):
            raise UsageError("parallel.pipeline > 1 with train.compile=true is not supported; set train.compile=false")
        check_pipeline(model, pp, schedule, train.grad_accum)
        mesh = init_device_mesh(info.device.type, (pp, info.dp_size), mesh_dim_names=("pp", "dp"))
        self.pp_group = mesh["pp"].get_group()
        layers = stage_layers(model, pp)
        self.pipeline_stage = Stage(model, layers[info.pp_rank], info.pp_rank, pp).to(info.device)
        self.tied_group = first_last_group(pp, info.dp_size, info.rank) if is_tied(model) else None
        self.module = PipelinedLM(self.pipeline_stage, self.pp_group)
        self.dp_group = mesh["dp"].get_group()
        self.sharded = fsdp != "none"
        if info.is_main:
            log.info("pipeline: %d stages of decoder layers %s, schedule %s, %d micro-batches, %d %s replicas", pp,
                     " | ".join(f"{r.start}-{r.stop - 1}" for r in layers), schedule, train.grad_accum, info.dp_size,
                     "FSDP2-sharded" if self.sharded else "replicated")
        if self.sharded:  # FSDP2 over the stage's replicas: each decoder layer one unit, the rest the root's
            kw = dict(mesh=mesh["dp"], reshard_after_forward=fsdp == "full_shard")
            for layer in self.pipeline_stage.model.layers.values():
                fully_shard(layer, **kw)
            fully_shard(self.pipeline_stage, **kw)
        self.model = self.pipeline_stage
        self.schedule = build_schedule(self.model, self.pp_group, info.device, schedule,
                                       train.grad_accum, self._loss)
        self.optimizer = build_optimizer(self.pipeline_stage, train, optim)
        self.grad_clip = train.grad_clip
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=False)  # the shared skip/save code reads it
        self.skipped_updates = 0
        self._scale, self._loss_sums = None, {}

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule's loss on the last stage, per micro-batch: the summed token loss, normalised as the
        loop normalises every backend's (by the window's targets over all ranks, times the world size)."""
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        scaled = loss_sum * self._scale
        self._loss_sums[id(scaled)] = loss_sum.detach()
        return scaled

    def run_window(self, window: list[dict], scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the window's micro-batches through the schedule; this replica's summed
        loss, the same on every stage."""
        device = self.info.device
        x = torch.cat([mb["input_ids"] for mb in window]).to(device)
        y = torch.cat([mb["targets"] for mb in window]).to(device) if self.pipeline_stage.is_last else None
        self._scale, self._loss_sums, losses = scale, {}, []
        with self.autocast():
            self.schedule.step(*([x] if self.pipeline_stage.is_first else []), target=y, losses=losses)
        # The micro-batches' own losses: the first step's shape inference calls the loss too, on no data.
        total = torch.zeros((), dtype=torch.float64, device=device)
        for loss in losses:
            total += self._loss_sums[id(loss)]
        dist.all_reduce(total, group=self.pp_group)
        return total

    def step(self) -> torch.Tensor:
        params = [p for p in self.pipeline_stage.parameters() if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in params]
        if self.info.dp_size > 1 and not self.sharded:  # the replicas' mean gradient, in one flat buffer
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dp_group)
            flat /= self.info.dp_size
            for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(mean)
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        tied = self.pipeline_stage.tied_copy
        for p, g in zip(params, local):
            if p is tied:  # both copies take the tied weight's whole gradient
                dist.all_reduce(g, group=self.tied_group)
        # FSDP: this rank's shards, whose squares add up over every rank; else the whole stage's gradients,
        # equal on its replicas, whose squares add up over the stages. The tied weight counts once.
        counted = [g for p, g in zip(params, local) if not (p is tied and self.pipeline_stage.is_last)]
        squares = torch.nn.utils.get_total_norm(counted).double() ** 2 if counted else \
            torch.zeros((), dtype=torch.float64, device=self.info.device)
        dist.all_reduce(squares, group=None if self.sharded else self.pp_group)
        norm = squares.sqrt().float()
        if self.grad_clip > 0:  # torch.nn.utils.clip_grads_with_norm_'s rule, on the local tensors
            torch._foreach_mul_(local, (self.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path) -> None:
        msd, osd = get_state_dict(self.pipeline_stage, self.optimizer, options=_FLAT)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(path) / "dcp"))

    def load(self, path) -> None:
        msd, osd = get_state_dict(self.pipeline_stage, self.optimizer, options=_FLAT)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(Path(path) / "dcp"))
        set_state_dict(self.pipeline_stage, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_FLAT)
