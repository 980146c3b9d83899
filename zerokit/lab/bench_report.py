"""`zerokit bench`'s outputs: results.csv, the two plots and report.md, from the rows a sweep measured
(`zerokit.lab.bench` runs it). Nothing here runs training."""
from __future__ import annotations

import csv
import os
import platform
import shlex
import statistics
import subprocess
from pathlib import Path

from zerokit.lab.flags import MiB

SKIP_STEPS = 1  # the first step allocates optimizer state and warms caches: not steady-state throughput
EST_ITEMS = ("weights", "gradients", "optimizer_state", "master_weights", "activations", "logits_loss",
             "backward_temp", "zero_buffers")
BASE_OVERRIDES = ["resume=none", "report_to=none", "train.eval_every=0", "train.log_every=1",
                  "train.checkpoint_every=0", "data.eval_batches=2", "sample.max_new_tokens=8"]


def write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


def plot_memory(rows: list[dict], gpus: int, path: Path) -> None:
    """Left: the estimator's per-rank itemisation (stacked) with the measured growth during
    the run; right: the measured peak per rank, split into what was held at the run's start and growth."""
    # A bare Figure (no pyplot): no global backend switch, so a notebook calling this keeps its inline plots.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig = Figure(figsize=(max(10, 1.3 * len(rows) + 6), 5))
    a, b = fig.subplots(1, 2)
    bottom = [0.0] * len(rows)
    colors = colormaps["tab10"].colors
    # zero_buffers are drawn as a number, not a bar: for a large bucket they would dwarf everything else
    for i, item in enumerate(EST_ITEMS[:-1]):
        vals = [r[f"est_{item}_mb"] for r in rows]
        if any(vals):
            a.bar(x, vals, bottom=bottom, label=item, color=colors[i % 10])
            bottom = [s + v for s, v in zip(bottom, vals)]
    growth = [r["run_growth_mb"] for r in rows]
    a.scatter(x, growth, marker="D", color="black", zorder=3, label="measured: growth in the run")
    for i, r in enumerate(rows):
        if r["est_zero_buffers_mb"]:
            a.annotate(f"+{r['est_zero_buffers_mb']:.0f}\nzero_buffers", (i, max(bottom[i], growth[i])),
                       textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    a.set_title("per rank: estimate by component vs measured growth")
    a.set_ylabel("MiB")
    a.legend(fontsize=7, loc="best")
    w = 0.8 / gpus
    for rk in range(gpus):
        xs = [i - 0.4 + w * (rk + 0.5) for i in x]
        start = [r[f"mem_start_mb_rank{rk}"] for r in rows]
        grow = [r[f"peak_mem_mb_rank{rk}"] - s for r, s in zip(rows, start)]
        b.bar(xs, start, w, color="lightgray", edgecolor="gray", label="at run start" if rk == 0 else None)
        b.bar(xs, grow, w, bottom=start, color=colors[rk % 10], label=f"rank {rk}: growth to peak")
    b.set_title("measured peak per rank (CPU: RSS, incl. ~400 MB imports)")
    b.set_ylabel("MiB")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_throughput(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    xs, ys = [r["peak_mem_mb"] for r in rows], [r["tokens_per_s"] for r in rows]
    err = [[y - r["tokens_per_s_min"] for y, r in zip(ys, rows)], [r["tokens_per_s_max"] - y for y, r in zip(ys, rows)]]
    ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3)
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("peak memory per rank, max over ranks (MiB; CPU: RSS)")
    ax.set_ylabel("tokens/s, all ranks (median step; bars: min-max)")
    ax.set_title("throughput vs memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pairs(rows: list[dict], key: str, a: str, b: str) -> list[tuple[dict, dict]]:
    """Points that differ only in `key` (value a vs b)."""
    rest = lambda r: tuple((k, v) for k, v in r["point"].items() if k != key)
    by = {}
    for r in rows:
        by.setdefault(rest(r), {})[r["point"].get(key)] = r
    return [(g[a], g[b]) for g in by.values() if a in g and b in g]


def observations(rows: list[dict]) -> list[str]:
    """A few facts read off the table (the report marks them as text to edit)."""
    obs = []
    mean = statistics.mean
    stages = sorted({r["point"]["stage"] for r in rows if "stage" in r["point"]} - {"none"})
    if len(stages) > 1:
        lo, hi = stages[0], stages[-1]
        per = {s: [r for r in rows if r["point"].get("stage") == s] for s in stages}
        meas = {s: mean(r["peak_mem_mb"] for r in per[s]) for s in stages}
        grow = {s: mean(r["run_growth_mb"] for r in per[s]) for s in stages}
        est = {s: mean(r["est_total_mb"] for r in per[s]) for s in stages}
        best = min(meas, key=meas.get)
        saved = f"{meas[lo] - meas[best]:.0f} MiB below ZeRO-{lo}" if best != lo else \
            f"ZeRO-{hi} {meas[hi] - meas[lo]:+.0f} MiB vs ZeRO-{lo}"
        obs.append("Measured peak memory per rank, mean by stage: " + ", ".join(f"ZeRO-{k} {meas[k]:.0f} MiB" for k in stages)
                   + f" (lowest: ZeRO-{best}; {saved}); growth during the run: "
                   + ", ".join(f"ZeRO-{k} {grow[k]:.0f} MiB" for k in stages) + ".")
        states = 16 * rows[0]["params"] / MiB  # fp32 weights + grads + Adam m, v per parameter
        obs.append(f"The model's full training state is {states:.1f} MiB ({rows[0]['params'] / 1e6:.2f}M params x 16 B); "
                   f"ZeRO can save at most that per rank, so differences smaller than the measurement noise of a few MiB "
                   f"are not resolved by this measurement.")
        tok = {s: mean(r["tokens_per_s"] for r in per[s]) for s in stages}
        obs.append("Throughput relative to ZeRO-" + lo + ": " + ", ".join(f"ZeRO-{k} {tok[k] / tok[lo]:.0%}" for k in stages)
                   + " (ZeRO-3 gathers each block's parameters in forward and again in backward).")
        best_e = min(est, key=est.get)
        obs.append(f"Estimator: ZeRO-{best_e} lowest ({est[best_e]:.1f} MiB); ZeRO-{hi} {est[hi]:.1f} MiB vs "
                   f"ZeRO-{lo} {est[lo]:.1f} MiB per rank.")
    # the estimate models the bucket zerokit's backend gives "auto"; a JSON that sets its own differs
    bucket_rows = [r for r in rows if r.get("ds_reduce_bucket") and r.get("est_reduce_bucket")
                   and r["ds_reduce_bucket"] != r["est_reduce_bucket"]]
    if bucket_rows:
        r = bucket_rows[0]
        obs.append(f"Caveat: the estimator's zero_buffers for {r['name']} assume a reduce bucket of "
                   f"{r['est_reduce_bucket']:,} elements; the run's DeepSpeed JSON resolves it to "
                   f"{r['ds_reduce_bucket']:,}.")
    ck = _pairs(rows, "grad_ckpt", "none", "full")
    if ck:
        ratio = mean(f["tokens_per_s"] / n["tokens_per_s"] for n, f in ck)
        act = mean(n["est_activations_mb"] + n["est_logits_loss_mb"] - f["est_activations_mb"] - f["est_logits_loss_mb"]
                   - f["est_backward_temp_mb"] + n["est_backward_temp_mb"] for n, f in ck)
        dmem = mean(f["run_growth_mb"] - n["run_growth_mb"] for n, f in ck)
        obs.append(f"Full activation checkpointing ran at {ratio:.0%} of the throughput without it "
                   f"({1 - ratio:+.0%} cost, mean of {len(ck)} pair(s)); the estimator says it saves {act:.1f} MiB "
                   f"of activations per rank, measured growth changed by {dmem:+.1f} MiB.")
    mbs = sorted({int(r["point"]["micro_batch"]) for r in rows if "micro_batch" in r["point"]})
    if len(mbs) > 1:
        pr = _pairs(rows, "micro_batch", str(mbs[0]), str(mbs[-1]))
        if pr:
            ratio = mean(b["tokens_per_s"] / a["tokens_per_s"] for a, b in pr)
            obs.append(f"Micro-batch {mbs[-1]} vs {mbs[0]}: {ratio:.1f}x the tokens/s (small batches leave the "
                       f"cores waiting on per-step overhead and communication).")
    fastest = max(rows, key=lambda r: r["tokens_per_s"])
    obs.append(f"Fastest point: {fastest['name']} at {fastest['tokens_per_s']:,.0f} tokens/s.")
    return obs


def machine() -> dict:
    import psutil
    import torch
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu}


def versions() -> dict:
    import deepspeed
    import torch
    import transformers
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent, capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "zerokit": commit}


def md_table(rows: list[dict], gpus: int) -> str:
    head = ["point", "engine", "tokens/s", "peak mem/rank (MiB)", "at start", "growth", "est. total",
            "est. zero_buffers", "final loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per = " / ".join(f"{r[f'peak_mem_mb_rank{k}']:.0f}" for k in range(gpus))
        start = " / ".join(f"{r[f'mem_start_mb_rank{k}']:.0f}" for k in range(gpus))
        lines.append(f"| {r['name']} | {r['engine']} | {r['tokens_per_s']:,.0f} | {per} | {start} | "
                     f"{r['run_growth_mb']:.1f} | {r['est_total_mb']:.2f} | {r['est_zero_buffers_mb']:.1f} | "
                     f"{r['final_loss']:.3f} |")
    return "\n".join(lines)


def launch_note(launch: str, timing: dict) -> str:
    how = ("one `torchrun` launch per point (fresh processes)" if launch == "per-point" else
           "all points in one `torchrun` launch (one process group), after a 2-step warm-up run of each engine")
    return f"{how}. Bench wall time {timing['total_s']:.0f} s, of which launches {timing['launch_s']:.0f} s."


def memory_note(device: str, launch: str) -> str:
    if device != "CPU":
        return ("the CUDA allocator's peak (max_memory_allocated) per rank, reset before each run; "
                "“at start” is what was allocated when the run began.")
    note = ("on CPU the loop reports each process’s peak resident set (ru_maxrss), which includes ~400 MB of "
            "Python, torch, DeepSpeed and transformers imports, and the set-up (the recipe builds the full model "
            "on every rank before DeepSpeed partitions it). “RSS at start” is what the process held before the run "
            "began and “growth” is peak minus start, the closest measured counterpart of the estimate.")
    if launch == "shared":
        note += (" In the shared launch the high-water mark is reset before each run, but memory is not fully "
                 "returned between runs (DeepSpeed keeps the last ZeRO-3 model alive), so later points start "
                 "higher: compare growth, not absolute peaks.")
    return note


def write_report(path: Path, rows: list[dict], *, argv: list[str], args, setup: dict, dropped: list[str],
                 timing: dict) -> None:
    m, v = setup["machine"], setup["versions"]
    device = "GPU" if m["gpu"] != "none" else "CPU"
    text = f"""# zerokit bench: {args.model}, {args.gpus} rank(s), {len(rows)} sweep points

## Setup

- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']}; {m['platform']}
- Load average (1 min) at start / end: {setup['load'][0]:.1f} / {setup['load'][1]:.1f} (a shared machine: throughput varies run to run)
- Versions: Python {v['python']}, torch {v['torch']}, DeepSpeed {v['deepspeed']}, transformers {v['transformers']}, zerokit {v['zerokit']}
- Command: `zerokit bench {shlex.join(argv)}`
- Each point: `recipes/pretrain_gpt.py` for {args.steps} optimizer steps on {args.gpus} rank(s) with
  `{' '.join(BASE_OVERRIDES + [f'model.preset={args.model}'] + args.set)}` and the point's overrides
  (their exact list: `logs/*.json`); {launch_note(args.launch, timing)}
- Tokens/s: all ranks' input tokens per second, the median over steps {SKIP_STEPS + 1}-{args.steps}
  (step 1 allocates optimizer state); min-max in `results.csv`.
- Memory, measured: {memory_note(device, args.launch)}
- Memory, estimated: `zerokit.lab.estimate.estimate` for the same model, ranks, ZeRO stage, offload, micro-batch,
  sequence, checkpointing and precision ({rows[0]['precision']}), device={'cpu' if device == 'CPU' else 'cuda'}: live tensor bytes per rank
  at the step's peak, itemised. FSDP points use the ZeRO-3 (full_shard) / ZeRO-2 (shard_grad_op) formulas.
{''.join(f'- Not run: {d}' + chr(10) for d in dropped)}
## Results

{md_table(rows, args.gpus)}

All numbers per rank in MiB unless marked; every column is in [results.csv](results.csv).

![memory per rank by component and stage](memory.png)

![throughput vs memory](throughput_vs_memory.png)

## Observations

<!-- Auto-derived from the table by zerokit bench: edit, extend or delete before publishing. -->
{chr(10).join('- ' + o for o in observations(rows))}
"""
    path.write_text(text)
