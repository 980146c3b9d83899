"""`zerokit bench`: short real training runs over a sweep -> results.csv, two plots, report.md.

    zerokit bench --sweep stage=0,1,2,3 grad_ckpt=none,full micro_batch=1,4 --nproc 2 --steps 10

Each sweep point is a run of recipes/pretrain_gpt.py with the matching overrides:
stage -> ds_config=ds_configs/zero{stage}.json (`none`: plain PyTorch/DDP), offload=cpu -> the
*_offload JSON (ZeRO-2: optimizer; ZeRO-3: optimizer + parameters) or fsdp_offload,
fsdp -> fsdp=..., grad_ckpt -> model.grad_ckpt, micro_batch -> train.micro_batch_size,
seq -> data.block_size. Beside each measurement stands `zerokit.lab.memory.estimate` for the
same configuration (read back from the run's resolved config, so it models what ran).

Launches (`--launch`):
  per-point (default)  one `torchrun` per point, a fresh process group and fresh processes: each
                       run's peak memory is its own. Costs ~15-30 s of start-up per point on 2 cores.
  shared               all points in ONE `torchrun` launch of this module's worker, which calls the
                       recipe's `main(cfg)` once per point in one process group: start-up is paid
                       once. Before each run the worker resets the kernel's peak-RSS high-water mark
                       (/proc/self/clear_refs) and records the RSS at the run's start; a 2-step warm-up
                       per engine takes the one-off costs (lazy imports, DeepSpeed's JIT ops). But
                       memory is not fully returned between runs (DeepSpeed 0.19.8 keeps the last
                       ZeRO-3 model reachable from deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK),
                       so later points start higher: compare their growth, not their absolute peaks.
Peak memory: on CPU the loop reports the process's peak RSS (ru_maxrss), which includes ~400 MB of
imports and everything the run allocated, set-up included (the recipe builds the full model on every
rank before DeepSpeed partitions it).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from zerokit.errors import UsageError
from zerokit.resources import DS_CONFIGS, PACKAGE, RECIPE_CONFIGS, RECIPES

RECIPE = RECIPES / "pretrain_gpt.py"  # the packaged files: an installed zerokit has no repository
DEFAULTS = RECIPE_CONFIGS / "pretrain_gpt.yaml"
MiB = 2**20
SKIP_STEPS = 1  # the first step allocates optimizer state and warms caches: not steady-state throughput

# Short runs: no mid-run eval or checkpoints, a metrics line every step, a tiny final eval/sample.
BASE_OVERRIDES = ["resume=none", "report_to=none", "train.eval_every=0", "train.log_every=1",
                  "train.checkpoint_every=0", "data.eval_batches=2", "sample.max_new_tokens=8"]
SWEEP_KEYS = {  # key -> allowed values (None: positive integers)
    "stage": ("none", "0", "1", "2", "3"),
    "offload": ("none", "cpu"),
    "fsdp": ("none", "full_shard", "shard_grad_op"),
    "grad_ckpt": ("none", "full"),
    "micro_batch": None,
    "seq": None,
}
SHORT = {"stage": "z", "offload": "off-", "fsdp": "fsdp-", "grad_ckpt": "ckpt-", "micro_batch": "mb", "seq": "seq"}
EST_ITEMS = ("weights", "gradients", "optimizer_state", "master_weights", "activations", "logits_loss",
             "backward_temp", "zero_buffers")


# ---------------------------------------------------------------------------- the sweep
def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """["stage=0,1", "micro_batch=1,4"] -> {"stage": ["0", "1"], "micro_batch": ["1", "4"]}."""
    sweep = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UsageError(f"--sweep {item!r}: write key=v1,v2,... e.g. stage=0,1,2,3")
        if key not in SWEEP_KEYS:
            raise UsageError(f"--sweep key {key!r} unknown; choose from {', '.join(SWEEP_KEYS)} "
                             "(fixed recipe settings go after --set)")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        allowed = SWEEP_KEYS[key]
        bad = [v for v in vals if (v not in allowed if allowed else not (v.isdigit() and int(v) > 0))]
        if bad:
            raise UsageError(f"--sweep {key}: {', '.join(bad)} not allowed; use "
                             + (", ".join(allowed) if allowed else "positive integers"))
        sweep[key] = list(dict.fromkeys(vals))
    return sweep


def expand(sweep: dict[str, list[str]]) -> tuple[list[dict], list[str]]:
    """All combinations -> (points, reasons for the combinations not run). An FSDP point has no
    ZeRO stage (the stage values collapse into one point); CPU offload needs ZeRO-2/3 or FSDP."""
    keys = list(sweep)
    points, dropped, seen = [], [], set()
    for combo in itertools.product(*(sweep[k] for k in keys)):
        p = dict(zip(keys, combo))
        if p.get("fsdp", "none") != "none":
            p.pop("stage", None)
        elif p.get("offload") == "cpu" and p.get("stage", "none") not in ("2", "3"):
            dropped.append(f"{point_name(p)}: offload=cpu needs stage=2 or 3 (ds_configs has zero2_offload.json, "
                           "zero3_offload.json) or fsdp")
            continue
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen.add(key)
            points.append(p)
    return points, list(dict.fromkeys(dropped))


def point_name(p: dict) -> str:
    return "_".join(f"{SHORT[k]}{v}" for k, v in p.items()) or "default"


def point_overrides(p: dict) -> list[str]:
    """The recipe overrides of one sweep point."""
    out = []
    offload = p.get("offload", "none") == "cpu"
    if p.get("fsdp", "none") != "none":
        out += [f"fsdp={p['fsdp']}", f"fsdp_offload={str(offload).lower()}"]
    elif p.get("stage", "none") != "none":
        out.append(f"ds_config={DS_CONFIGS / ('zero' + p['stage'] + ('_offload' if offload else '') + '.json')}")
    if "grad_ckpt" in p:
        out.append(f"model.grad_ckpt={str(p['grad_ckpt'] == 'full').lower()}")
    if "micro_batch" in p:
        out.append(f"train.micro_batch_size={p['micro_batch']}")
    if "seq" in p:
        out.append(f"data.block_size={p['seq']}")
    return out


# ---------------------------------------------------------------------------- the estimate for a run
def engine_of(cfg) -> dict:
    """Engine, ZeRO stage and offload mode of a resolved recipe config (read from its DeepSpeed JSON)."""
    from zerokit.backends import deepspeed_config_path
    ds_path = deepspeed_config_path(cfg.ds_config)
    if cfg.fsdp != "none":
        # FSDP has no estimator of its own: full_shard ~ ZeRO-3, shard_grad_op ~ ZeRO-2 (approximate)
        return {"engine": f"fsdp:{cfg.fsdp}", "stage": 3 if cfg.fsdp == "full_shard" else 2,
                "offload": "params" if cfg.fsdp_offload else "none", "ds": None}
    if not ds_path:
        return {"engine": "ddp", "stage": 0, "offload": "none", "ds": None}
    from zerokit.backends.deepspeed import load_ds_json
    ds = load_ds_json(ds_path)
    z = ds.get("zero_optimization", {})
    dev = lambda key: (z.get(key) or {}).get("device", "none")
    offload = "params" if dev("offload_param") in ("cpu", "nvme") else \
        "optimizer" if dev("offload_optimizer") in ("cpu", "nvme") else "none"
    return {"engine": f"zero{z.get('stage', 0)}", "stage": int(z.get("stage", 0)), "offload": offload, "ds": ds}


def estimate_run(cfg, nproc: int) -> dict:
    """`zerokit.lab.memory.estimate` for what the run does, plus the bucket its DeepSpeed JSON really
    allocates (the estimator assumes the planner's buckets; see report notes)."""
    import torch

    from zerokit.backends import resolve_precision
    from zerokit.lab.memory import estimate
    from zerokit.models import model_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    eng = engine_of(cfg)
    precision = resolve_precision(cfg.train.precision, torch.device(device))
    config = model_config(cfg.model.preset, cfg.data.vocab_size, cfg.data.block_size, cfg.model.dropout)
    e = estimate(config, world_size=nproc, stage=eng["stage"], offload=eng["offload"],
                 micro_batch=cfg.train.micro_batch_size, seq=cfg.data.block_size,
                 grad_ckpt="full" if cfg.model.grad_ckpt else "none", precision=precision,
                 grad_accum=cfg.train.grad_accum, device=device)
    row = {"engine": eng["engine"], "precision": precision, "params": e.params,
           "est_total_mb": e.total / MiB, **{f"est_{k}_mb": getattr(e, k) / MiB for k in EST_ITEMS}}
    if eng["ds"] is not None and eng["stage"] >= 1:
        from zerokit.backends.deepspeed import resolve_ds_config
        ds = resolve_ds_config(eng["ds"], cfg.train, nproc, config.hidden_size, precision)
        row["ds_reduce_bucket"] = int(ds["zero_optimization"].get("reduce_bucket_size", 0))
    return row


# ---------------------------------------------------------------------------- the worker (under torchrun)
def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _mem_now_mb() -> float:
    """What the loop's peak is measured against: allocated CUDA memory on a GPU, else the RSS."""
    import torch
    return torch.cuda.memory_allocated() / MiB if torch.cuda.is_available() else _rss_mb()


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux >= 4.0); ru_maxrss follows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_heap() -> None:
    gc.collect()
    import torch
    if torch.cuda.is_available():  # the loop's GPU peak is the allocator's: make it per run too
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:  # return freed heap pages to the OS, so the next run starts from a lower RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_recipe(recipe: str | Path = RECIPE):
    """A recipe script as a module (its `main(cfg)`), and its defaults YAML (configs/<name>.yaml)."""
    import importlib.util
    recipe = Path(recipe) if Path(recipe).suffix else RECIPES / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe.stem}", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, recipe.parent / "configs" / f"{recipe.stem}.yaml"


def run_in_process(overrides: list[str], recipe: str | Path = RECIPE) -> dict:
    """One run of a recipe's main(cfg) in this process, as a single rank: what `python recipe
    key=value ...` does, for notebooks. Returns summary.json, the metrics lines, and this run's own
    RSS at its start and peak (MiB; the high-water mark is reset first)."""
    from zerokit.config import load_config
    module, defaults = load_recipe(recipe)
    cfg = load_config(defaults, overrides)
    _release_heap()
    reset = reset_peak_rss()
    start = _rss_mb()
    t0 = time.perf_counter()
    module.main(cfg)
    run_dir = Path(cfg.run_dir)
    return {"summary": json.loads((run_dir / "summary.json").read_text()),
            "metrics": [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "rss_start_mb": start, "rss_peak_mb": _rss_mb("VmHWM") if reset else float("nan"),
            "wall_s": time.perf_counter() - t0}


def worker_main(spec_path: str) -> int:
    """Run the recipe's main() once per run in `spec` (one process group), recording per-rank RSS."""
    from zerokit.config import load_config
    from zerokit.dist import shutdown
    from zerokit.recipe import setup_logging

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    recipe, defaults = load_recipe(RECIPE)
    try:
        for run in spec["runs"]:
            _release_heap()
            reset = reset_peak_rss()
            start = _mem_now_mb()
            print(f"[bench] rank {rank}: {run['name']} starting", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            recipe.main(load_config(defaults, run["overrides"]))
            run_dir = Path(run["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / f"bench_rank{rank}.json").write_text(json.dumps(
                {"mem_start_mb": start, "rss_hwm_mb": _rss_mb("VmHWM"), "peak_reset": reset,
                 "wall_s": time.perf_counter() - t0}))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


# ---------------------------------------------------------------------------- running and reading back
def launch_env() -> dict:
    import torch
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(runs: list[dict], nproc: int, out: Path, tag: str, timeout: float) -> float:
    """One torchrun launch of the worker over `runs`; returns its wall time. Output -> out/logs/."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec, log = logs / f"{tag}.json", logs / f"{tag}.log"
    spec.write_text(json.dumps({"runs": runs}, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "zerokit.lab.bench", "--worker", str(spec)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, env=launch_env(), stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if "return func(" not in ln]
        started = [ln for ln in lines if "[bench] rank 0:" in ln]
        raise RuntimeError(f"bench launch {tag} failed (exit {rc}) "
                           f"{'during ' + started[-1].split(': ', 1)[1] if started else 'before the first run'}; "
                           f"full log: {log}\n" + "\n".join(lines[-40:]))
    return time.perf_counter() - t0


def read_run(run_dir: Path, nproc: int) -> dict:
    """Measured numbers of one run from metrics.jsonl, summary.json and the worker's rank files."""
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    if len(steps) < 2:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has {len(steps)} training lines; need --steps >= {SKIP_STEPS + 2}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("world_size") != nproc:
        raise RuntimeError(f"{run_dir}: ran on {summary.get('world_size')} ranks, not {nproc}")
    steady = [m["tokens_per_s"] for m in steps[SKIP_STEPS:]]
    peak = steps[-1]["peak_mem_mb_per_rank"]  # the loop's peak (CPU: RSS) per rank over the training steps
    ranks = [json.loads((run_dir / f"bench_rank{r}.json").read_text()) for r in range(nproc)]
    row = {"backend": summary["backend"], "tokens_per_s": statistics.median(steady),
           "tokens_per_s_min": min(steady), "tokens_per_s_max": max(steady), "final_loss": steps[-1]["loss"],
           "peak_mem_mb": max(peak), "run_growth_mb": max(p - r["mem_start_mb"] for p, r in zip(peak, ranks)),
           "wall_s": ranks[0]["wall_s"]}
    for r in range(nproc):
        row[f"peak_mem_mb_rank{r}"] = peak[r]
        row[f"mem_start_mb_rank{r}"] = ranks[r]["mem_start_mb"]
    return row


# ---------------------------------------------------------------------------- outputs
def write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


def plot_memory(rows: list[dict], nproc: int, path: Path) -> None:
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
    # zero_buffers are drawn as a number, not a bar: the estimator sizes them from the planner's
    # 5e7-element buckets, which would dwarf everything else for a small model (see report).
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
    w = 0.8 / nproc
    for rk in range(nproc):
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
    bucket_rows = [r for r in rows if r.get("ds_reduce_bucket") and r["est_zero_buffers_mb"] > 0]
    if bucket_rows:
        r = bucket_rows[0]
        real = 2 * r["ds_reduce_bucket"] * 4 / MiB  # double-buffered fp32 reduce bucket
        obs.append(f"Caveat: the estimator's zero_buffers ({r['est_zero_buffers_mb']:.0f} MiB for {r['name']}) assume "
                   f"the planner's 5e7-element buckets; the ds_configs JSON used here resolves reduce_bucket_size=auto "
                   f"to {r['ds_reduce_bucket']:,} elements (~{real:.2f} MiB double-buffered), so for small models "
                   f"the estimate of ZeRO-1/2/3 is dominated by buffers that were not allocated.")
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
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=PACKAGE, capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "zerokit": commit}


def md_table(rows: list[dict], nproc: int) -> str:
    head = ["point", "engine", "tokens/s", "peak mem/rank (MiB)", "at start", "growth", "est. total",
            "est. zero_buffers", "final loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per = " / ".join(f"{r[f'peak_mem_mb_rank{k}']:.0f}" for k in range(nproc))
        start = " / ".join(f"{r[f'mem_start_mb_rank{k}']:.0f}" for k in range(nproc))
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
    text = f"""# zerokit bench: {args.model}, {args.nproc} rank(s), {len(rows)} sweep points

## Setup

- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']}; {m['platform']}
- Load average (1 min) at start / end: {setup['load'][0]:.1f} / {setup['load'][1]:.1f} (a shared machine: throughput varies run to run)
- Versions: Python {v['python']}, torch {v['torch']}, DeepSpeed {v['deepspeed']}, transformers {v['transformers']}, zerokit {v['zerokit']}
- Command: `zerokit bench {shlex.join(argv)}`
- Each point: `recipes/pretrain_gpt.py` for {args.steps} optimizer steps on {args.nproc} rank(s) with
  `{' '.join(BASE_OVERRIDES + [f'model.preset={args.model}'] + args.set)}` and the point's overrides
  (their exact list: `logs/*.json`); {launch_note(args.launch, timing)}
- Tokens/s: all ranks' input tokens per second, the median over steps {SKIP_STEPS + 1}-{args.steps}
  (step 1 allocates optimizer state); min-max in `results.csv`.
- Memory, measured: {memory_note(device, args.launch)}
- Memory, estimated: `zerokit.lab.memory.estimate` for the same model, ranks, ZeRO stage, offload, micro-batch,
  sequence, checkpointing and precision ({rows[0]['precision']}), device={'cpu' if device == 'CPU' else 'cuda'}: live tensor bytes per rank
  at the step's peak, itemised. FSDP points use the ZeRO-3 (full_shard) / ZeRO-2 (shard_grad_op) formulas.
{''.join(f'- Not run: {d}' + chr(10) for d in dropped)}
## Results

{md_table(rows, args.nproc)}

All numbers per rank in MiB unless marked; every column is in [results.csv](results.csv).

![memory per rank by component and stage](memory.png)

![throughput vs memory](throughput_vs_memory.png)

## Observations

<!-- Auto-derived from the table by zerokit bench: edit, extend or delete before publishing. -->
{chr(10).join('- ' + o for o in observations(rows))}
"""
    path.write_text(text)


# ---------------------------------------------------------------------------- the command
def bench_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="zerokit bench", description="Sweep short real runs of recipes/pretrain_gpt.py; "
                                "write results.csv, memory.png, throughput_vs_memory.png and report.md.")
    p.add_argument("--sweep", nargs="+", default=["stage=0,3"], metavar="KEY=V1,V2",
                   help=f"keys: {', '.join(SWEEP_KEYS)} (stage none = plain DDP; offload cpu = the *_offload JSON)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun --nproc_per_node)")
    p.add_argument("--model", default="gpt-tiny", help="model preset (zerokit/models.py)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per point")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe settings for every point")
    p.add_argument("--launch", choices=("per-point", "shared"), default="per-point",
                   help="per-point: a fresh torchrun launch for each point (clean memory numbers); shared: all points "
                        "in one launch (faster start-up; absolute peaks grow from point to point)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per launch")
    a = p.parse_args(argv)
    if a.steps < SKIP_STEPS + 2:
        raise UsageError(f"--steps {a.steps}: need at least {SKIP_STEPS + 2} (step 1 is excluded from tokens/s)")
    if a.nproc < 1:
        raise UsageError("--nproc must be >= 1")
    points, dropped = expand(parse_sweep(a.sweep))
    if not points:
        raise UsageError("the sweep has no runnable point: " + "; ".join(dropped))
    from zerokit.config import load_config

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    runs, rows = [], []
    for pt in points:
        name = point_name(pt)
        overrides = [*BASE_OVERRIDES, f"model.preset={a.model}", f"train.max_steps={a.steps}", *a.set,
                     *point_overrides(pt), f"run_dir={out / 'runs' / name}"]
        cfg = load_config(DEFAULTS, overrides)  # a bad key fails here, before anything launches
        runs.append({"name": name, "overrides": overrides, "run_dir": str(out / "runs" / name)})
        rows.append({"name": name, "point": pt, **{k: pt.get(k, "") for k in SWEEP_KEYS}, "nproc": a.nproc,
                     "model": a.model, "steps": a.steps, **estimate_run(cfg, a.nproc)})
    if a.launch == "shared":
        if not reset_peak_rss():
            raise UsageError("--launch shared needs to reset the peak RSS per run (/proc/self/clear_refs, Linux >= 4.0), "
                             "which this system refuses; use --launch per-point")
        # A 2-step warm-up run of each engine (DeepSpeed JSON / FSDP mode) first: their one-off costs
        # would otherwise land on whichever point happens to use that engine first.
        engine = lambda r: tuple(o for o in r["overrides"] if o.startswith(("ds_config=", "fsdp=", "fsdp_offload=")))
        firsts = {}
        for r in runs:
            firsts.setdefault(engine(r), r)
        warm = lambda r, i: {"name": f"warmup{i}", "run_dir": str(out / "runs" / f"_warmup{i}"), "overrides":
                             [*r["overrides"][:-1], "train.max_steps=2", f"run_dir={out / 'runs' / f'_warmup{i}'}"]}
        groups = [[*(warm(r, i) for i, r in enumerate(firsts.values())), *runs]]
    else:
        groups = [[r] for r in runs]
    launch_s = 0.0
    for i, group in enumerate(groups):
        print(f"bench: launch {i + 1}/{len(groups)}: {', '.join(r['name'] for r in group)} on {a.nproc} rank(s) "
              f"(log: {out / 'logs'})", file=sys.stderr, flush=True)
        try:
            launch_s += launch(group, a.nproc, out, "launch" if len(groups) == 1 else group[-1]["name"], a.timeout)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for run, row in zip(runs, rows):
        row.update(read_run(Path(run["run_dir"]), a.nproc))
    write_csv([{k: v for k, v in r.items() if k != "point"} for r in rows], out / "results.csv")
    plot_memory(rows, a.nproc, out / "memory.png")
    plot_throughput(rows, out / "throughput_vs_memory.png")
    timing = {"launches": len(groups), "launch_s": launch_s, "total_s": time.perf_counter() - t_start}
    setup = {"machine": machine(), "versions": versions(), "load": (load0, os.getloadavg()[0])}
    write_report(out / "report.md", rows, argv=argv, args=a, setup=setup, dropped=dropped, timing=timing)
    print(f"bench: {len(rows)} points in {timing['total_s']:.0f} s -> {out}/report.md, results.csv, memory.png, "
          f"throughput_vs_memory.png")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from zerokit.dist import exit_process
        exit_process(worker_main(sys.argv[2]))
    from zerokit.lab.memory import _run_cli
    raise SystemExit(_run_cli(bench_main))
