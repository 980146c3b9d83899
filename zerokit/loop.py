"""The training loop: one for every recipe and every backend.

A step is: take the next accumulation window of micro-batches, count its target tokens
across ranks, run forward+backward on each micro-batch with the loss normalised by that
count (so accumulation and padding are exact), then one optimizer step. Around it: lr
schedule, logging, evaluation, checkpoints and preemption. The backend hides the engine.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import torch

from zerokit.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, step_of
from zerokit.config import save_config
from zerokit.dist import DistInfo, all_gather_objects, all_reduce_sum
from zerokit.errors import UsageError
from zerokit.manifest import identity as checkpoint_identity
from zerokit.metrics import (MetricsLogger, json_line, model_flops_per_token, peak_flops, peak_memory_mb, progress_bar,
                             system_stats)
from zerokit.moe import router_record
from zerokit.nonfinite import NonFiniteGuard, NonFiniteStep
from zerokit.schedule import NO_LIMIT, TimeBudget, lr_at

log = logging.getLogger("zerokit")


class StopRequest:
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM (preemption): finish the
    step, checkpoint, exit cleanly. Ranks agree on the step at the next log step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def num_targets(batch: dict) -> torch.Tensor:
    """Positions that carry a loss (label -100 means none): tokens for LMs, examples for classifiers."""
    labels = batch["targets"] if "targets" in batch else batch["labels"]
    return (labels != -100).sum()


def num_inputs(batch: dict) -> int:
    """Input tokens, the unit of throughput (padding excluded). Counted on the host copy: no sync."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def accumulate(backend, task, window: list[dict], info: DistInfo, scale: torch.Tensor) -> torch.Tensor:
    """Forward and backward of each micro-batch, the loss sum times `scale`; this rank's summed loss."""
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    for k, micro in enumerate(window):
        sync = k == len(window) - 1  # reduce gradients across ranks only after the last micro-batch
        micro = to_device(micro, info.device)
        with backend.micro_batch(sync):
            loss_sum, _ = task.loss(backend.model, micro)
            backend.backward(loss_sum * scale, sync)
        total += loss_sum.detach()
    return total


def train_step(backend, task, window: list[dict], info: DistInfo, lr: float, guard: NonFiniteGuard | None = None):
    """One optimizer step over an accumulation window of micro-batches. Returns this rank's
    summed loss, the window's target count over all ranks, and the gradient norm (tensors).
    With a `guard`, a non-finite loss or gradient is found before the update (zerokit/nonfinite.py):
    skipped (zero loss and targets, no norm returned) or raised as NonFiniteStep."""
    # Normalise by the target count of the whole window on all ranks: accumulation and padding exact.
    # (With tensor or pipeline parallelism each replica's ranks all count its targets: world_size / that count
    # is still data-parallel size / the data's count, matching the engines' mean over data-parallel ranks.)
    window_targets = all_reduce_sum(sum(num_targets(mb) for mb in window).to(info.device, torch.float64))
    backend.set_lr(lr)
    scale = info.world_size / window_targets
    run_window = getattr(backend, "run_window", None)  # pipeline parallel: the schedule runs the whole window
    total = run_window(window, scale) if run_window else accumulate(backend, task, window, info, scale)
    if guard is None:
        return total, window_targets, backend.step()
    bad = guard.check(backend, total)
    if bad:
        guard.handle(backend, bad)
        return torch.zeros_like(total), torch.zeros_like(window_targets), None
    engine_skips = backend.skipped_updates
    grad_norm = backend.step()
    guard.after_step(backend, engine_skips)
    return total, window_targets, grad_norm


def train(cfg, *, backend, task, loader, info: DistInfo, seq_len: int, write_extras=None) -> dict:
    """Train to `cfg.train.max_steps`, or for `train.max_minutes` of training time (then max_steps, if not 0,
    is an upper bound); returns the summary (also written to <run_dir>/summary.json), or
    {"preempted": True, ...} after a stop request, or {"nothing_to_do": True, ...} when the checkpoint
    resumed from is already at max_steps or has spent the time budget (then nothing is trained or written)."""
    t = cfg.train
    run_dir = Path(cfg.run_dir)
    step, tokens_seen, train_seconds = 0, 0, 0.0
    identity = checkpoint_identity(cfg, backend)
    resume_from = resolve_resume(cfg.resume, run_dir, info, identity)
    budget_s = 60.0 * (t.get("max_minutes") or 0)
    finished = resume_from and finished_run(resume_from, t.max_steps, budget_s)
    if finished:  # a finished run started again: leave it as it is
        if info.is_main:
            print(f"nothing to do: {run_dir} {finished}", flush=True)
        return {"nothing_to_do": True, "step": step_of(resume_from)}
    if info.is_main:  # only now: a run with nothing to do leaves run_dir as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if resume_from:
        state = load_checkpoint(resume_from, backend, info)
        step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        loader.load_state_dict(state["loader"])
        log.info("resumed from %s at step %d", resume_from, step)
    elif cfg.resume == "auto":
        log.info("resume=auto: no checkpoint in %s, starting at step 0", run_dir / "checkpoints")
    logger = MetricsLogger(run_dir, cfg.report_to, cfg.to_dict(), enabled=info.is_main, run_name=run_dir.name,
                           prometheus_port=cfg.prometheus_port, start_step=step)
    stop = StopRequest()
    flops_per_tok = model_flops_per_token(backend.module, seq_len)
    peak = peak_flops(info.device, t.peak_tflops)

    def checkpoint(at_step: int) -> Path:
        state = {"tokens_seen": tokens_seen, "train_seconds": train_seconds, "loader": loader.state_dict()}
        if budget is not None and at_step == end_step and budget.timed_out(end_step):  # a resume has nothing to do
            state["time_budget_spent_s"] = budget_s
        try:
            return save_checkpoint(run_dir, at_step, backend, state, info, keep=t.keep_checkpoints,
                                   write_extras=write_extras, identity=identity)
        except UsageError:  # e.g. disk full: the one-line error goes on a line of its own, not after the bar
            bar.close()
            raise

    def evaluate() -> dict:
        backend.module.eval()
        with torch.no_grad(), backend.autocast():
            metrics = task.evaluate(backend.module, info.dp_rank, info.dp_size)
        backend.module.train()
        return metrics

    # The last step: max_steps, or with a time budget as rank 0 predicts it at each log step (ranks agree
    # on it through the log step's gather, so no step needs a sync of its own).
    budget = TimeBudget(budget_s, t.max_steps, window=t.log_every) if budget_s else None
    end_step = t.max_steps if budget is None else budget.end
    schedule = {"lr": t.lr, "warmup_steps": t.warmup_steps, "min_lr": t.min_lr,
                "schedule": t.get("schedule", "cosine"), "decay_fraction": t.get("decay_fraction", 0.2)}
    bar = progress_bar(end_step if end_step < NO_LIMIT else None, step, info.is_main)
    decision = None  # a timed run's extra decision step near its end (TimeBudget.next_check)
    last_ckpt_time = time.time()
    # [loss sum, input tokens] of this rank since the last log, and the global target count.
    interval = torch.zeros(2, dtype=torch.float64, device=info.device)
    interval_targets = torch.zeros((), dtype=torch.float64, device=info.device)
    interval_start, paused = time.perf_counter(), 0.0  # eval and checkpoint time is not training time
    eval_metrics: dict = {}
    preempted = False
    backend.module.train()
    guard = NonFiniteGuard(t.nonfinite, info.is_main)
    while step < end_step:
        data_position = loader.state_dict()
        window = loader.next_window()
        # The horizon (where the schedule reaches its floor): max_steps, as always; where a time budget ends
        # the run first, the predicted last step itself, so the run ends at the floor.
        lr = lr_at(step, max_steps=end_step - 1 if budget is not None and budget.timed_out(end_step) else end_step,
                   **schedule)
        try:
            loss_sum, window_targets, grad_norm = train_step(backend, task, window, info, lr, guard)
        except NonFiniteStep as bad:  # nothing of this step was applied: save the state before it, then stop
            loader.load_state_dict(data_position)
            logger.log({"step": step + 1, "nonfinite": bad.what, "parameter": bad.parameter, **guard.counts()})
            bar.close()
            logger.close()
            raise bad.diagnosis(step + 1, data_position, checkpoint(step)) from None
        interval[0] += loss_sum
        interval[1] += sum(num_inputs(mb) for mb in window)
        step += 1
        interval_targets += window_targets  # device tensors: read only at log steps (no sync per step)
        bar.update(1)

        if step % t.log_every == 0 or step == end_step or step == decision:
            # The one host sync of the interval: losses, memory, and the stop/checkpoint/end decisions.
            loss_sum, n_inputs = all_reduce_sum(interval.clone()).tolist()
            n_inputs /= info.model_parallel  # a replica's ranks (tensor-parallel group, pipeline stages) all count its tokens
            interval_time = time.perf_counter() - interval_start - paused
            interval_start, paused = time.perf_counter(), 0.0
            ckpt_due = t.checkpoint_every_minutes > 0 and time.time() - last_ckpt_time > 60 * t.checkpoint_every_minutes
            tokens_seen += int(n_inputs)
            train_seconds += interval_time
            # The committed last step is not re-estimated: its lr was already the floor.
            predicted = end_step if budget is None or step == end_step else budget.update(step, train_seconds)
            ranks = all_gather_objects({"peak_mem_mb": peak_memory_mb(info.device), "stop": stop.requested,
                                        "ckpt_due": ckpt_due, "end_step": predicted})
            end_step = ranks[0]["end_step"]  # rank 0's clock decides for everyone, as for checkpoints
            if budget is not None:
                decision = budget.next_check(step, end_step, t.log_every)  # from agreed values: all ranks agree
                bar.total = end_step if end_step < NO_LIMIT else None
            tok_s = n_inputs / interval_time
            targets = float(interval_targets)  # 0 when every step of the interval was skipped (NaN is logged as null)
            record = {"step": step, "loss": loss_sum / targets if targets else float("nan"), "lr": backend_lr(backend),
                      "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_per_s": tok_s,
                      "peak_mem_mb": max(r["peak_mem_mb"] for r in ranks),
                      "peak_mem_mb_per_rank": [round(r["peak_mem_mb"], 1) for r in ranks],
                      "tokens_seen": tokens_seen, **guard.counts(), **system_stats(info.device),
                      **router_record(task, info.device)}
            if peak and flops_per_tok:
                record["mfu"] = flops_per_tok * tok_s / (peak * info.world_size)
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mem=f"{record['peak_mem_mb']:.0f}MB")
            interval.zero_()
            interval_targets.zero_()
            preempted = any(r["stop"] for r in ranks)
            time_for_checkpoint = ranks[0]["ckpt_due"]  # rank 0's clock decides for everyone
        else:
            time_for_checkpoint = False
        t0 = time.perf_counter()
        if t.eval_every and step % t.eval_every == 0 and step < end_step:
            eval_metrics = evaluate()
            logger.log({"step": step, **eval_metrics})
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        # With checkpoints on, the last step is always saved too: a finished run loses nothing and is not redone.
        last = step == end_step and (t.checkpoint_every > 0 or t.checkpoint_every_minutes > 0)
        if preempted or time_for_checkpoint or last or (t.checkpoint_every and step % t.checkpoint_every == 0):
            checkpoint(step)
            last_ckpt_time = time.time()
        paused += time.perf_counter() - t0
        if preempted:
            break
    bar.close()

    if preempted:
        if info.is_main:
            (run_dir / "PREEMPTED").write_text(str(step))
        log.warning("stop requested: checkpoint written at step %d; resume with resume=auto", step)
        logger.close()
        return {"preempted": True, "step": step}

    eval_metrics = evaluate()
    logger.log({"step": step, **eval_metrics})
    peak_mb = max(all_gather_objects(peak_memory_mb(info.device)))
    summary = {**eval_metrics, "step": step, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
               "tokens_per_s": tokens_seen / train_seconds if train_seconds else None, "peak_mem_mb": peak_mb,
               "world_size": info.world_size, "backend": backend.name, "final_lr": backend_lr(backend),
               **guard.counts()}
    if peak and flops_per_tok and summary["tokens_per_s"]:
        summary["mfu"] = flops_per_tok * summary["tokens_per_s"] / (peak * info.world_size)
    if info.is_main:
        (run_dir / "summary.json").write_text(json_line(summary, indent=1))
        (run_dir / "PREEMPTED").unlink(missing_ok=True)
    logger.close()
    return summary


def backend_lr(backend) -> float:
    return backend.optimizer.param_groups[0]["lr"]


def finished_run(ckpt: Path, max_steps: int, budget_s: float) -> str | None:
    """Why the run whose checkpoint this is has nothing left to do (None: it has)."""
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    done = state["step"]
    if (max_steps or not budget_s) and done >= max_steps:
        return (f"is at step {done} {'=' if done == max_steps else '>'} train.max_steps={max_steps}; "
                f"raise train.max_steps or pass resume=none")
    if budget_s and state.get("time_budget_spent_s") == budget_s:
        return (f"has spent its time budget train.max_minutes={budget_s / 60:g} ({state['train_seconds']:.1f} s of "
                f"training at step {done}); raise train.max_minutes or pass resume=none")
    return None
