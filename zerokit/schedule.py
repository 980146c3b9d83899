"""The learning-rate schedule and the training-time budget that sets its horizon.

Every schedule warms up linearly from ~0 to `lr` over `warmup_steps`, then:
  cosine    decays along a half cosine to `min_lr` at the horizon;
  wsd       stays at `lr` (stable), then decays to `min_lr` over the last `decay_fraction` of the run
            with the 1-sqrt shape (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
            Fixed Training Durations": 1-sqrt beat linear decay at equal length in their sweeps; it drops
            fast first and lingers near the floor, where WSD's loss falls most);
  constant  stays at `lr` (its floor is `lr`).
The horizon is the step at which the schedule reaches its floor: `train.max_steps` in step-count mode
(the last step run is horizon - 1, as the cosine schedule always had it), or, with a time budget, the
last step itself, as TimeBudget predicts it from the measured step time.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")
NO_LIMIT = 10 ** 12  # the last step of a timed run without max_steps, before its step time is measured


def floor_lr(schedule: str, lr: float, min_lr: float) -> float:
    """The lowest rate the schedule reaches (at its horizon)."""
    return lr if schedule == "constant" else min_lr


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: float, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """The rate of step `step` (0-based) of a run whose schedule reaches its floor at step `max_steps`."""
    if step >= max_steps:
        return floor_lr(schedule, lr, min_lr)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        # Decay over the last decay_fraction of the whole run, never into the warm-up.
        decay_start = max(warmup_steps, max_steps - decay_fraction * max_steps)
        if step < decay_start:
            return lr
        progress = (step - decay_start) / max(1e-9, max_steps - decay_start)
        return min_lr + (1.0 - math.sqrt(progress)) * (lr - min_lr)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class TimeBudget:
    """Predicts the step at which `budget_s` seconds of training time run out.

    `update(step, train_seconds)` is called at log steps (where the loop syncs anyway) with the training
    time so far (eval and checkpoint time excluded); the time is a parameter, so any clock can drive it.
    The step time is the average since the first update (the steps before it carry one-off costs:
    allocation, kernel selection) or, across a resume, since the resumed run's first update. Returns the
    predicted last step: at least `step` (`step` itself means: stop now), at most `max_steps` (0: none).
    """

    def __init__(self, budget_s: float, max_steps: int = 0):
        self.budget_s, self.max_steps = budget_s, max_steps
        self.ref: tuple[int, float] | None = None  # (step, seconds) where the step-time measurement starts
        self.end = max_steps or NO_LIMIT  # before any measurement: as far as the step bound allows

    def update(self, step: int, train_seconds: float) -> int:
        remaining = self.budget_s - train_seconds
        if remaining <= 0:
            self.end = step
        elif self.ref is None:
            self.ref = (step, train_seconds)
        elif step > self.ref[0] and train_seconds > self.ref[1]:
            per_step = (train_seconds - self.ref[1]) / (step - self.ref[0])
            # Round to the nearer step: the run then ends within half a step of the budget.
            end = step + round(remaining / per_step)
            self.end = min(end, self.max_steps) if self.max_steps else end
        return self.end
