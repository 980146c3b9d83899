"""The learning-rate schedule and the training-time budget that sets its horizon.

Every schedule warms up linearly from ~0 to `lr` over `warmup_steps`, then:
  cosine    decays along a half cosine to `min_lr` at the horizon;
  wsd       stays at `lr` (stable), then decays to `min_lr` over the last `decay_fraction` of the run
            with the 1-sqrt shape (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
            Fixed Training Durations": 1-sqrt beat linear decay at equal length in their sweeps; it drops
            fast first and lingers near the floor, where WSD's loss falls most);
  constant  stays at `lr` (its floor is `lr`).
The horizon is the step at which the schedule reaches its floor. In step-count mode it is
`train.max_steps` (the last step run is horizon - 1, as the cosine schedule always had it). With a time
budget it is the last step itself, as TimeBudget predicts it from the measured step time, so the run
ends at the floor; where `max_steps` ends the run first, the run is the step-count run exactly.
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
    """Predicts the step at which `budget_s` seconds of training time run out (`end`), capped at `max_steps`.

    `update(step, train_seconds)` is called at decision steps (log steps, where the loop syncs anyway) with
    the training time so far (eval and checkpoint time excluded); the time is a parameter, so any clock can
    drive it. The step time is measured over as many past steps as the end is ahead (at least `window`):
    on a shared machine the recent past predicts the next minutes better than the run's average (a
    slow-down half-way would make an average overrun the budget), while far from the end a long look back
    keeps a passing burst from moving the horizon. The first update only starts the clock: the steps before
    it carry one-off costs (allocation, kernel selection; after a resume, the restore). Returns the
    predicted last step, always at least `step` + 1 (once the time is spent: one more step, which runs at
    the floor) and at most `max_steps` (0: no bound).
    """

    def __init__(self, budget_s: float, max_steps: int = 0, window: int = 20):
        self.budget_s, self.max_steps, self.window = budget_s, max_steps, window
        self.history: list[tuple[int, float]] = []  # (step, seconds) at each update
        self.end = max_steps or NO_LIMIT  # before any measurement: as far as the step bound allows

    def update(self, step: int, train_seconds: float) -> int:
        remaining = self.budget_s - train_seconds
        if remaining <= 0:  # spent (the pace fell since the last decision): one more step, at the floor
            self.end = step + 1
        elif self.history and train_seconds > self.history[-1][1]:
            # Look back as far as the end looks ahead (at least `window` steps): far from the end a long
            # average keeps a passing burst of load from moving the horizon; near it, the recent pace rules.
            ahead = remaining / self._per_step(step, train_seconds, self.window)
            per_step = self._per_step(step, train_seconds, max(self.window, ahead))
            # The nearer step, but at least one more while time remains: that step runs at the floor.
            self.end = step + max(1, round(remaining / per_step))
        if self.max_steps:
            self.end = min(self.end, self.max_steps)
        self.history.append((step, train_seconds))
        return self.end

    def _per_step(self, step: int, train_seconds: float, lookback: float) -> float:
        back = [h for h in self.history if h[0] <= step - lookback]
        start = back[-1] if back else self.history[0]
        return (train_seconds - start[1]) / (step - start[0])

    def timed_out(self, end: int) -> bool:
        """Whether the budget, not max_steps, ends the run at `end` (then the horizon is `end` - 1)."""
        return end != self.max_steps

    def next_check(self, step: int, end: int, log_every: int) -> int:
        """The step of the next decision after one at `step`: the next log step or, where it comes first,
        the step half-way to a budget's end, so that a change of pace in the last steps (another job on
        the machine) is caught: about log2(log_every) extra decisions per run."""
        nxt = (step // log_every + 1) * log_every
        if self.timed_out(end):
            nxt = min(nxt, step + max(1, (end - step) // 2))
        return min(nxt, end)
