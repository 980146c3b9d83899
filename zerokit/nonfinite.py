"""What a NaN/inf loss or gradient does to a training step (`train.nonfinite`).

Before the optimizer steps, every rank checks its summed loss and, where the backend keeps them
on the parameters (plain/DDP, FSDP shards, DeepSpeed without ZeRO), its gradients; one all-reduce
makes every rank take the same decision. Then:
  skip   the update is dropped (`backend.skip_step()`), the step counted in `skipped_steps`;
  stop   nothing is applied: `NonFiniteStep` names the step and the first parameter whose gradient
         is non-finite, and the loop checkpoints the state before it and exits (status 2).
ZeRO 1-3 partition gradients away from the parameters; DeepSpeed itself refuses an update whose
gradient norm is non-finite, which the backend reports through `skipped_updates`, so the decision
is the same, only made one call later. Under fp16 the loss scaler's own skips (an overflow of the
scaled gradients, a normal event) are counted in `scaler_skipped`, not treated as failures.
"""
from __future__ import annotations

import logging

import torch

from zerokit.dist import all_gather_objects, all_reduce_sum
from zerokit.errors import UsageError

log = logging.getLogger("zerokit")

# A run whose every step is non-finite has diverged: skipping more would only burn compute.
MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteStep(UsageError):
    """A step whose loss or gradient is non-finite under train.nonfinite=stop; the loop adds where the data
    stood and the checkpoint of the last good state, then re-raises it as the run's one-line error."""

    def __init__(self, what: str, parameter: str | None):
        self.what, self.parameter = what, parameter
        super().__init__(what)

    def diagnosis(self, step: int, data_position: dict, checkpoint) -> UsageError:
        where = f"first non-finite gradient: {self.parameter}" if self.parameter else \
            "no single parameter named (the engine discarded the gradients)"
        position = ", ".join(f"{k}={v}" for k, v in data_position.items())
        return UsageError(f"step {step}: {self.what} ({where}; data position before the batch: {position}); "
                          f"the last good state is checkpoint {checkpoint}: resume from it with a lower train.lr, "
                          f"or with train.nonfinite=skip to drop such steps")


def local_grads(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, torch.Tensor | None]]:
    """(name, parameter, this rank's gradient or shard) of each trainable parameter; the gradient is None
    where the engine keeps it elsewhere (ZeRO partitions)."""
    out = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            g = p.grad
            out.append((name, p, g.to_local() if hasattr(g, "to_local") else g))
    return out


def first_nonfinite_grad(module: torch.nn.Module) -> str | None:
    """Name of the first parameter (in module order) whose gradient is non-finite on any rank.
    Collective: every rank walks every parameter (ZeRO gradients are assembled with DeepSpeed's API)."""
    named = local_grads(module)
    first = None
    for i, (_, p, g) in enumerate(named):
        if g is None and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")):
            from deepspeed.utils import safe_get_full_grad
            g = safe_get_full_grad(p)
        if first is None and g is not None and not bool(torch.isfinite(g).all()):
            first = i
    found = [f for f in all_gather_objects(first) if f is not None]
    return named[min(found)][0] if found else None


class NonFiniteGuard:
    """Counts and decides; one per run. `policy` is train.nonfinite (stop | skip)."""

    def __init__(self, policy: str, is_main: bool = True):
        if policy not in ("stop", "skip"):
            raise UsageError(f"train.nonfinite={policy!r}: use stop or skip")
        self.policy, self.is_main = policy, is_main
        self.skipped_steps = self.scaler_skipped = self.consecutive = 0

    def counts(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "scaler_skipped": self.scaler_skipped}

    def check(self, backend, loss_sum: torch.Tensor) -> str | None:
        """Before the update: what is non-finite on any rank (None: all finite). One host sync."""
        grads = [] if backend.precision == "fp16" else [g for _, _, g in local_grads(backend.module) if g is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        flags = torch.stack([~torch.isfinite(loss_sum.detach().float()),
                             ~torch.isfinite(grad_norm.to(loss_sum.device).float())]).float()
        bad_loss, bad_grad = all_reduce_sum(flags).tolist()
        if bad_loss:
            return "non-finite loss"
        return "non-finite gradient" if bad_grad else None

    def handle(self, backend, what: str) -> None:
        """A non-finite step found before its update: skip it, or raise NonFiniteStep (nothing applied)."""
        if self.policy == "stop":
            raise NonFiniteStep(what, first_nonfinite_grad(backend.module))
        if not backend.skip_step():
            log.warning("%s but the engine applied the update (its gradients were finite)", what)
        self._count_skip(what)

    def after_step(self, backend, engine_skips_before: int) -> None:
        """After an update: skips the engine made itself (fp16 loss scaling; DeepSpeed ZeRO's non-finite norm)."""
        if backend.skipped_updates == engine_skips_before:
            self.consecutive = 0
            return
        if backend.precision == "fp16":
            self.scaler_skipped += 1
            return
        if self.policy == "stop":  # the engine dropped the update: the state is still the last good one
            raise NonFiniteStep("non-finite gradient norm", None)
        self._count_skip("non-finite gradient norm")

    def _count_skip(self, what: str) -> None:
        self.skipped_steps += 1
        self.consecutive += 1
        if self.is_main:
            log.warning("%s: update skipped (%d so far, train.nonfinite=skip)", what, self.skipped_steps)
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteStep(f"{self.consecutive} consecutive non-finite steps (the run has diverged)", None)
