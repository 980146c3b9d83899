"""Learning-rate schedules (cosine, wsd, constant) and the training-time budget (train.max_minutes)."""
import json
import math
import re
import shutil

import pytest

from launch_util import losses, metrics, pretrain
from zerokit.schedule import TimeBudget, lr_at

LR, MIN_LR, WARMUP, STEPS = 3e-3, 1e-4, 100, 1000


def at(step, schedule, max_steps=STEPS, **kw):
    return lr_at(step, lr=LR, warmup_steps=WARMUP, max_steps=max_steps, min_lr=MIN_LR, schedule=schedule, **kw)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_to_lr(schedule):
    assert at(0, schedule) == pytest.approx(LR / WARMUP)
    assert at(49, schedule) == pytest.approx(LR / 2)
    assert at(WARMUP - 1, schedule) == pytest.approx(LR)


def test_cosine_is_the_schedule_it_was():
    """The pre-move formula, written out again: existing runs keep their losses."""
    def old(step):
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        progress = (step - WARMUP) / (STEPS - WARMUP)  # in this order: equal to the last bit
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LR - MIN_LR)
    assert [at(s, "cosine") for s in range(STEPS)] == [old(s) for s in range(STEPS)]
    assert at(WARMUP, "cosine") == LR  # warm-up end: the peak
    assert at(550, "cosine") == pytest.approx((LR + MIN_LR) / 2)  # half-way through the decay
    assert at(STEPS, "cosine") == MIN_LR  # the floor, at the horizon


def test_wsd_is_stable_then_decays_as_one_minus_sqrt():
    # decay_fraction 0.2 of 1000 steps: stable at LR until step 800, then 1 - sqrt(progress) to the floor.
    assert all(at(s, "wsd") == LR for s in range(WARMUP, 801))
    assert at(900, "wsd") == pytest.approx(MIN_LR + (1 - 0.5 ** 0.5) * (LR - MIN_LR))
    assert at(999, "wsd") == pytest.approx(MIN_LR + (1 - (199 / 200) ** 0.5) * (LR - MIN_LR))
    assert at(STEPS, "wsd") == MIN_LR
    lrs = [at(s, "wsd") for s in range(800, STEPS + 1)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    # decay_fraction 0.5: decay starts at step 500.
    assert at(500, "wsd", decay_fraction=0.5) == LR
    assert at(750, "wsd", decay_fraction=0.5) == pytest.approx(MIN_LR + (1 - 0.5 ** 0.5) * (LR - MIN_LR))
    # A decay longer than the run after warm-up starts at the end of warm-up, never inside it.
    assert at(WARMUP - 1, "wsd", decay_fraction=0.95) == pytest.approx(LR)
    assert at(WARMUP + 450, "wsd", decay_fraction=0.95) == pytest.approx(MIN_LR + (1 - 0.5 ** 0.5) * (LR - MIN_LR))


def test_constant_stays_at_lr():
    assert {at(s, "constant") for s in range(WARMUP, STEPS + 5)} == {LR}


def simulate(budget_s, step_time, log_every=20, max_steps=0):
    """The loop's decisions against a fake clock: at log steps, and at TimeBudget.next_check's steps near
    a budget's end; the predicted last step is final. Returns the last step, the training seconds, the
    horizons predicted at log steps and the lr of the last step."""
    budget, seconds, step, horizons = TimeBudget(budget_s, max_steps), 0.0, 0, []
    end, decision, lr = budget.end, None, None
    while step < end:
        lr = at(step, "wsd", max_steps=end - 1 if budget.timed_out(end) else end)
        seconds += step_time(step)
        step += 1
        if step == end:
            break
        if step == decision or step % log_every == 0:
            end = budget.update(step, seconds)
            decision = budget.next_check(step, end, log_every)
            if step % log_every == 0:
                horizons.append(end)
    return step, seconds, horizons, lr


def test_budget_ends_the_run_within_half_a_step_at_the_floor():
    step, seconds, horizons, lr = simulate(120.0, lambda s: 0.05)
    assert step == pytest.approx(2400, abs=1) and seconds == pytest.approx(120.0, abs=0.05)
    assert horizons[0] > 10 ** 9  # the first log step only starts the clock: no horizon yet
    assert set(horizons[1:]) == {2400}
    assert lr == MIN_LR


def test_budget_follows_a_change_of_step_time():
    """Steps slow down 3x half-way (another job starts): the horizon is re-estimated down, and the run
    still ends at the budget (the plan made at a fast rate would have overrun by half)."""
    step, seconds, horizons, lr = simulate(120.0, lambda s: 0.05 if s < 1200 else 0.15)
    assert seconds == pytest.approx(120.0, rel=0.005) and lr == MIN_LR
    assert step == pytest.approx(1200 + 60 / 0.15, abs=2)
    assert horizons[59] == 2400 and horizons[-1] == step  # index 59: step 1200
    assert sorted(horizons[60:], reverse=True) == horizons[60:]  # each estimate no higher than the last


def test_budget_with_noisy_steps():
    import random
    rng = random.Random(0)
    step, seconds, _, lr = simulate(60.0, lambda s: rng.uniform(0.02, 0.2) + (3.0 if s == 0 else 0))
    assert seconds == pytest.approx(60.0, rel=0.01) and lr == MIN_LR


def test_max_steps_first_is_the_step_count_run():
    """max_steps ends the run before the budget: the horizon is max_steps, as without a budget."""
    step, seconds, _, lr = simulate(120.0, lambda s: 0.05, max_steps=1000)
    assert (step, seconds) == (1000, pytest.approx(50.0)) and lr == at(999, "wsd")
    budget = TimeBudget(120.0, 1000)
    assert not budget.timed_out(1000) and budget.timed_out(900)


def test_decisions_halve_the_distance_to_a_budgets_end():
    budget = TimeBudget(60.0)
    assert [budget.next_check(s, 1000, 20) for s in (1, 20, 975, 980, 990)] == [20, 40, 980, 990, 995]
    assert budget.next_check(998, 1000, 20) == 999 and budget.next_check(999, 1000, 20) == 1000
    assert TimeBudget(60.0, 1000).next_check(985, 1000, 20) == 1000  # max_steps' end: log steps only


def test_spent_budget_ends_with_one_step_at_the_floor():
    assert TimeBudget(10.0).update(37, 10.5) == 38


def test_a_passing_burst_far_from_the_end_barely_moves_the_horizon():
    """One slow log interval (10x) early in a long run: the look back spans the whole run so far."""
    slow = simulate(120.0, lambda s: 0.5 if 400 <= s < 420 else 0.05)
    # The end is step 2220; the last 20 steps alone (0.5 s a step) would have predicted ~600.
    assert min(slow[2][21:]) > 1600 and slow[2][-1] == slow[0] == pytest.approx(2220, abs=1)
    assert slow[1] == pytest.approx(120.0, rel=0.005) and slow[3] == MIN_LR


@pytest.mark.parametrize("override,message", [
    ("train.schedule=linear", "train.schedule=linear is not one of cosine, wsd, constant"),
    ("train.decay_fraction=0", "train.decay_fraction=0.0 is not a number in (0, 1]"),
    ("train.max_minutes=-1", "train.max_minutes=-1.0 is not a number >= 0"),
])
def test_settings_are_checked(override, message):
    from launch_util import REPO
    from zerokit.config import load_config
    from zerokit.errors import UsageError
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(REPO / "recipes" / "configs" / "pretrain_gpt.yaml", [override])


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


TIMED = ["train.log_every=20", "train.max_steps=0", "train.schedule=wsd", "train.warmup_steps=20"]


@pytest.mark.slow  # two recipe starts and 12 s of training: 43-67 s on the shared 2-core machine
def test_short_budget_ends_at_budget_and_floor(tmp_path):
    """A real 12 s run: training time within 2 % of the budget, the last step at min_lr; started again,
    the finished run has nothing to do."""
    run_dir = tmp_path / "timed"
    pretrain(run_dir, *TIMED, "train.max_minutes=0.2", "train.checkpoint_every=100000")
    s = _summary(run_dir)
    assert 0.98 * 12 <= s["train_seconds"] <= 1.02 * 12, s
    assert s["final_lr"] == 1e-4
    logged = [m["lr"] for m in metrics(run_dir) if "lr" in m]
    assert logged[-1] == 1e-4 and max(logged) == 1e-3
    assert (run_dir / "checkpoints" / f"step_{s['step']}").is_dir()  # the last step is saved
    again = pretrain(run_dir, *TIMED, "train.max_minutes=0.2", "train.checkpoint_every=100000", "resume=auto")
    assert "nothing to do" in again.stdout and "time budget" in again.stdout


@pytest.mark.slow
def test_step_mode_wsd_resume_is_exact(tmp_path):
    """Step-count mode stays bit-exact across a resume (the horizon is max_steps, not a clock)."""
    args = ["train.max_steps=30", "train.schedule=wsd", "train.decay_fraction=0.5", "train.checkpoint_every=15",
            "train.micro_batch_size=4"]
    pretrain(tmp_path / "ref", *args)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_15", tmp_path / "step_15")
    pretrain(tmp_path / "resumed", *args, f"resume={tmp_path / 'step_15'}")
    want = {k: v for k, v in losses(tmp_path / "ref").items() if k > 15}
    assert losses(tmp_path / "resumed") == want
    lrs = {m["step"]: m["lr"] for m in metrics(tmp_path / "resumed") if "lr" in m}
    assert lrs[30] == lr_at(29, lr=1e-3, warmup_steps=2, max_steps=30, min_lr=1e-4, schedule="wsd", decay_fraction=0.5)


@pytest.mark.slow
def test_timed_resume_spends_the_rest_of_the_budget(tmp_path):
    """A timed run resumed from a mid-run checkpoint trains the rest of the budget (train_seconds carries)."""
    pretrain(tmp_path / "ref", *TIMED, "train.max_minutes=0.25", "train.checkpoint_every=20", "train.keep_checkpoints=0")
    # The first checkpoint: how many steps 15 s hold depends on the machine's load.
    first = min((tmp_path / "ref" / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    shutil.copytree(first, tmp_path / "mid")
    spent = json.loads((tmp_path / "mid" / "trainer_state.json").read_text())["train_seconds"]
    assert 0 < spent < 15
    pretrain(tmp_path / "resumed", *TIMED, "train.max_minutes=0.25", f"resume={tmp_path / 'mid'}")
    s = _summary(tmp_path / "resumed")
    assert 0.98 * 15 <= s["train_seconds"] <= 1.02 * 15 and s["final_lr"] == 1e-4, s
    assert min(losses(tmp_path / "resumed")) > int(first.name.split("_")[1])


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_size", [2, 16])
def test_two_minute_budget(tmp_path, micro_batch_size):
    """O2: train.max_minutes=2 ends within 2 % (1.96-2.04 min of training time), final lr at the floor."""
    run_dir = tmp_path / "run"
    pretrain(run_dir, *TIMED, "train.max_minutes=2", f"train.micro_batch_size={micro_batch_size}", timeout=400)
    s = _summary(run_dir)
    print(f"micro_batch_size={micro_batch_size}: {s['train_seconds']:.2f} s of training, {s['step']} steps, "
          f"final lr {s['final_lr']}")
    assert 1.96 * 60 <= s["train_seconds"] <= 2.04 * 60, s
    assert s["final_lr"] == 1e-4


@pytest.mark.slow
def test_two_ranks_agree_on_the_last_step(tmp_path):
    """2 ranks (torchrun, gloo): rank 0's clock decides the end; a rank stepping on alone would hang the
    run in its next collective (the launcher's timeout fails the test), and both ranks' memory is logged."""
    pretrain(tmp_path / "two", *TIMED, "train.max_minutes=0.2", "train.micro_batch_size=4", nproc=2, timeout=300)
    s = _summary(tmp_path / "two")
    assert s["world_size"] == 2 and 0.98 * 12 <= s["train_seconds"] <= 1.02 * 12 and s["final_lr"] == 1e-4, s
    assert all(len(m["peak_mem_mb_per_rank"]) == 2 for m in metrics(tmp_path / "two") if "loss" in m)
