"""Mixture of experts: the router's load-balancing loss in the training loss, the router's load
(tokens per expert, aux loss, z-loss) for metrics.jsonl, and total vs active parameters.

The aux loss is the model's own (transformers' `load_balancing_loss_func`, Switch Transformer eq. 4-6,
computed per forward pass, i.e. per micro-batch). zerokit's loss is a token *sum* normalised by the
target count of the whole window on all ranks (zerokit/loop.py), so each micro-batch adds
coef * aux * its target count: the step optimises the token-weighted mean of the micro-batch aux losses.
That is exact under any split of the same micro-batches over ranks and accumulation steps (2 ranks x
micro-batch 4 = 1 rank x micro-batch 4 x grad_accum 2); it is not the aux loss of one larger batch,
which is not a sum over tokens (a product of two batch means).
"""
from __future__ import annotations

import torch

from zerokit.dist import all_reduce_sum


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under DDP / DeepSpeed / torch.compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def is_moe(config) -> bool:
    return bool(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None))


def expert_params(model: torch.nn.Module) -> int:
    """Parameters of the routed experts (modules named `experts`; a shared expert or the router is not one)."""
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] == "experts":
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += getattr(p, "ds_numel", p.numel())
    return total


def active_fraction(config) -> float:
    """Share of the expert parameters one token passes through: top_k / num_experts (1.0 for a dense model)."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return config.num_experts_per_tok / experts if experts else 1.0


def inactive_params(model: torch.nn.Module) -> int:
    """Parameters a token does not use: the (1 - top_k/num_experts) share of the experts."""
    cfg = unwrap(model).config
    return round(expert_params(model) * (1 - active_fraction(cfg))) if is_moe(cfg) else 0


class RouterStats:
    """Adds the aux loss to a micro-batch's loss sum and keeps, until the next log step, this rank's
    top-k assignments per layer and expert and the target-weighted aux and z-loss sums."""

    def __init__(self):
        self.counts = None            # (layers, experts) assignments, float64
        self.sums = torch.zeros(3, dtype=torch.float64)  # aux * targets, z-loss * targets, targets

    def add(self, model, out, n_targets: torch.Tensor):
        """coef * aux * n_targets for the loss sum (0 when the model has no router output)."""
        router_logits = getattr(out, "router_logits", None)
        aux = getattr(out, "aux_loss", None)
        if not router_logits or aux is None:
            return 0
        cfg = unwrap(model).config
        with torch.no_grad():
            logits = torch.stack([g.float() for g in router_logits])           # (layers, tokens, experts)
            chosen = logits.topk(cfg.num_experts_per_tok, dim=-1).indices   # the model's own routing (softmax is monotone)
            counts = torch.nn.functional.one_hot(chosen, logits.shape[-1]).sum(dim=(1, 2)).double()
            # Router z-loss (ST-MoE eq. 5): logged only; transformers' Mixtral does not compute or train on it.
            z = logits.logsumexp(-1).pow(2).mean()
            n = n_targets.double()
            self.sums = self.sums.to(counts.device) + torch.stack([aux.detach().double() * n, z.double() * n, n])
            self.counts = counts if self.counts is None else self.counts + counts
        return cfg.router_aux_loss_coef * aux * n_targets

    def record(self, device: torch.device) -> dict:
        """The interval's router metrics over all ranks (a collective: every rank calls it), then reset.
        moe_expert_tokens[layer][expert]: top-k assignments in the interval; moe_expert_load: their share
        of the layer (1/experts each when balanced); moe_load_max: the largest share x experts (1 = balanced)."""
        if self.counts is None:
            return {}
        packed = all_reduce_sum(torch.cat([self.counts.flatten(), self.sums.to(self.counts.device)]).to(device))
        layers, experts = self.counts.shape
        counts = packed[:-3].view(layers, experts)
        aux_sum, z_sum, n = packed[-3:].tolist()
        load = counts / counts.sum(-1, keepdim=True)
        self.counts, self.sums = None, torch.zeros(3, dtype=torch.float64)
        return {"router_aux_loss": aux_sum / n, "router_z_loss": z_sum / n,
                "moe_load_max": float(load.max() * experts),
                "moe_expert_tokens": counts.long().tolist(),
                "moe_expert_load": [[round(x, 4) for x in row] for row in load.tolist()]}


def router_record(task, device: torch.device) -> dict:
    """The loop's one hook: the task's router metrics for this log step ({} for tasks without any)."""
    stats = getattr(task, "router", None)
    return stats.record(device) if stats is not None else {}
