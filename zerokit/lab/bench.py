"""`zerokit bench`: short real training runs over a sweep -> results.csv, two plots, report.md.

    zerokit bench --sweep stage=0,1,2,3 grad_ckpt=none,full micro_batch=1,4 --gpus 2 --steps 10

Each sweep point is a run of recipes/pretrain_gpt.py with the matching overrides:
stage -> ds_config=ds_configs/zero{stage}.json (`none`: plain PyTorch/DDP), offload -> the
*_offload JSON (ZeRO-2: offload=optimizer; ZeRO-3: offload=all, optimizer + parameters) or,
for FSDP, fsdp_offload (offload=all); fsdp -> fsdp=..., grad_ckpt -> model.grad_ckpt,
micro_batch -> train.micro_batch_size, seq -> data.block_size. Beside each measurement stands
`zerokit.lab.estimate.estimate` for the same configuration (read back from the run's resolved
config, so it models what ran). The outputs are written by `zerokit.lab.bench_report`.

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

import ctypes
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

from zerokit.errors import UsageError
from zerokit.lab.bench_report import (BASE_OVERRIDES, EST_ITEMS, SKIP_STEPS, machine, plot_memory, plot_throughput,
                                      versions, write_csv, write_report)
from zerokit.lab.flags import MiB, add_gpus, add_model, parser, run_cli
from zerokit.lab.workers import run_workers

from zerokit.resources import DS_CONFIGS, RECIPE_CONFIGS, RECIPES

RECIPE = RECIPES / "pretrain_gpt.py"  # the packaged files: an installed zerokit has no repository
DEFAULTS = RECIPE_CONFIGS / "pretrain_gpt.yaml"

SWEEP_KEYS = {  # key -> allowed values (None: positive integers); offload "cpu": the former spelling
    "stage": ("none", "0", "1", "2", "3"),
    "offload": ("none", "optimizer", "params", "all", "cpu"),
    "fsdp": ("none", "full_shard", "shard_grad_op"),
    "grad_ckpt": ("none", "full"),
    "micro_batch": None,
    "seq": None,
}
SHORT = {"stage": "z", "offload": "off-", "fsdp": "fsdp-", "grad_ckpt": "ckpt-", "micro_batch": "mb", "seq": "seq"}


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
    ZeRO stage (the stage values collapse into one point). Offload runs what ds_configs/ holds:
    ZeRO-2 offload=optimizer (zero2_offload.json), ZeRO-3 offload=all (zero3_offload.json), FSDP
    offload=all (fsdp_offload); offload=cpu means whichever of these the point's engine has."""
    keys = list(sweep)
    points, dropped, seen = [], [], set()
    for combo in itertools.product(*(sweep[k] for k in keys)):
        p = dict(zip(keys, combo))
        fsdp = p.get("fsdp", "none") != "none"
        if fsdp:
            p.pop("stage", None)
        runnable = {"2": "optimizer", "3": "all"}.get(p.get("stage", "none"), "all" if fsdp else None)
        if p.get("offload") == "cpu":
            p["offload"] = runnable or "cpu"
        if p.get("offload", "none") not in ("none", runnable):
            dropped.append(f"{point_name(p)}: offload={p['offload']} has no configuration to run (ds_configs/ has "
                           "zero2_offload.json: stage=2 offload=optimizer, zero3_offload.json: stage=3 offload=all; "
                           "FSDP: offload=all)")
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
    out = ["optim.name=adamw"]  # the recipe's Muon runs on neither FSDP2, ZeRO-3 nor offload: every point steps AdamW
    offload = p.get("offload", "none") != "none"  # expand() keeps only the offload each engine's config has
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
                "offload": "all" if cfg.fsdp_offload else "none", "ds": None}
    if not ds_path:
        return {"engine": "ddp", "stage": 0, "offload": "none", "ds": None}
    from zerokit.backends.deepspeed import load_ds_json
    ds = load_ds_json(ds_path)
    z = ds.get("zero_optimization", {})
    dev = lambda key: (z.get(key) or {}).get("device", "none")
    opt, params = (dev(k) in ("cpu", "nvme") for k in ("offload_optimizer", "offload_param"))
    offload = "all" if opt and params else "optimizer" if opt else "params" if params else "none"
    return {"engine": f"zero{z.get('stage', 0)}", "stage": int(z.get("stage", 0)), "offload": offload, "ds": ds}


def estimate_run(cfg, gpus: int) -> dict:
    """`zerokit.lab.estimate.estimate` for what the run does, and the reduce bucket the estimate assumes
    beside the one the run's DeepSpeed JSON resolves to (they differ only if the JSON sets its own)."""
    import torch

    from zerokit.backends import resolve_precision
    from zerokit.lab.estimate import estimate
    from zerokit.lab.zero_formula import model_stats, zero_config
    from zerokit.models import model_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    eng = engine_of(cfg)
    precision = resolve_precision(cfg.train.precision, torch.device(device))
    config = model_config(cfg.model.preset, cfg.data.vocab_size, cfg.data.block_size, cfg.model.dropout)
    e = estimate(config, world_size=gpus, stage=eng["stage"], offload=eng["offload"],
                 micro_batch=cfg.train.micro_batch_size, seq=cfg.data.block_size,
                 grad_ckpt="full" if cfg.model.grad_ckpt else "none", precision=precision,
                 grad_accum=cfg.train.grad_accum, device=device)
    row = {"engine": eng["engine"], "precision": precision, "params": e.params,
           "est_total_mb": e.total / MiB, **{f"est_{k}_mb": getattr(e, k) / MiB for k in EST_ITEMS}}
    if eng["ds"] is not None and eng["stage"] >= 1:
        from zerokit.backends.deepspeed import resolve_ds_config
        ds = resolve_ds_config(eng["ds"], cfg.train, gpus, config.hidden_size, precision)
        row["ds_reduce_bucket"] = int(ds["zero_optimization"].get("reduce_bucket_size", 0))
        row["est_reduce_bucket"] = zero_config(eng["stage"], eng["offload"], model_stats(config))["reduce_bucket_size"]
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
def launch(runs: list[dict], gpus: int, out: Path, tag: str, timeout: float) -> float:
    """One torchrun launch of the worker over `runs`; returns its wall time. Output -> out/logs/."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = logs / f"{tag}.json"
    spec.write_text(json.dumps({"runs": runs}, indent=1))
    t0 = time.perf_counter()
    log = logs / f"{tag}.log"
    try:
        run_workers("zerokit.lab.bench", [spec], gpus, timeout=timeout, what=f"bench launch {tag}", log=log)
    except RuntimeError as e:
        started = [ln for ln in log.read_text(errors="replace").splitlines() if "[bench] rank 0:" in ln]
        where = "during " + started[-1].split(": ", 1)[1] if started else "before the first run"
        raise RuntimeError(f"{where}: {e}") from None
    return time.perf_counter() - t0


def read_run(run_dir: Path, gpus: int) -> dict:
    """Measured numbers of one run from metrics.jsonl, summary.json and the worker's rank files."""
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    if len(steps) < 2:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has {len(steps)} training lines; need --steps >= {SKIP_STEPS + 2}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("world_size") != gpus:
        raise RuntimeError(f"{run_dir}: ran on {summary.get('world_size')} ranks, not {gpus}")
    steady = [m["tokens_per_s"] for m in steps[SKIP_STEPS:]]
    peak = steps[-1]["peak_mem_mb_per_rank"]  # the loop's peak (CPU: RSS) per rank over the training steps
    ranks = [json.loads((run_dir / f"bench_rank{r}.json").read_text()) for r in range(gpus)]
    row = {"backend": summary["backend"], "tokens_per_s": statistics.median(steady),
           "tokens_per_s_min": min(steady), "tokens_per_s_max": max(steady), "final_loss": steps[-1]["loss"],
           "peak_mem_mb": max(peak), "run_growth_mb": max(p - r["mem_start_mb"] for p, r in zip(peak, ranks)),
           "wall_s": ranks[0]["wall_s"]}
    for r in range(gpus):
        row[f"peak_mem_mb_rank{r}"] = peak[r]
        row[f"mem_start_mb_rank{r}"] = ranks[r]["mem_start_mb"]
    return row


# ---------------------------------------------------------------------------- the command
def bench_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser("zerokit bench", "Sweep short real runs of recipes/pretrain_gpt.py; write results.csv, memory.png, "
               "throughput_vs_memory.png and report.md.",
               "zerokit bench --sweep stage=0,1,2,3 grad_ckpt=none,full --gpus 2 --model gpt-tiny --steps 8")
    p.add_argument("--sweep", nargs="+", default=["stage=0,3"], metavar="KEY=V1,V2",
                   help=f"keys: {', '.join(SWEEP_KEYS)} (stage none = plain DDP; offload: ZeRO-2 optimizer, "
                        "ZeRO-3 and FSDP all)")
    add_gpus(p, default=2, old="--nproc")
    add_model(p, default="gpt-tiny")
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
    if a.gpus < 1:
        raise UsageError("--gpus must be >= 1")
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
        rows.append({"name": name, "point": pt, **{k: pt.get(k, "") for k in SWEEP_KEYS}, "gpus": a.gpus,
                     "model": a.model, "steps": a.steps, **estimate_run(cfg, a.gpus)})
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
        print(f"bench: launch {i + 1}/{len(groups)}: {', '.join(r['name'] for r in group)} on {a.gpus} rank(s) "
              f"(log: {out / 'logs'})", file=sys.stderr, flush=True)
        try:
            launch_s += launch(group, a.gpus, out, "launch" if len(groups) == 1 else group[-1]["name"], a.timeout)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for run, row in zip(runs, rows):
        row.update(read_run(Path(run["run_dir"]), a.gpus))
    write_csv([{k: v for k, v in r.items() if k != "point"} for r in rows], out / "results.csv")
    plot_memory(rows, a.gpus, out / "memory.png")
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
    raise SystemExit(run_cli(bench_main))
