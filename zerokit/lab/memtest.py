"""`zerokit memtest`: the model-state bytes each rank really holds, per DeepSpeed config, next to
the ZeRO formula.

For every config (ds_configs/zero*.json) and world size it launches `torchrun` with N CPU
(gloo) ranks. Each rank builds the GPT preset, wraps it with zerokit's own backend
(`make_backend`, the code a recipe runs), trains one real step of two micro-batches (so
Adam's state exists), then runs the first micro-batch of a second step and, in the middle of
that accumulation window (weights, gradients and optimizer state all held), walks the engine:
module parameters (and ZeRO-3's `ds_tensor` partitions), every tensor the ZeRO optimizer
holds (flat buffers, fp32 partitions, gradient partitions, buckets) and the torch optimizer's
state. Each tensor storage is counted once (views share a storage) under one role: weights,
gradients, fp32 master, Adam moments, or buffers (buckets and staging copies: reported, not
model state). NVMe offload: the bytes of the swap files each rank wrote are counted too.

The formula (fp32, Adam; Ψ parameters, N ranks), per rank:
    weights    4Ψ                  ZeRO-3: 4Ψ/N + 4Ψ_persist (params under the persistence
                                   threshold are partitioned *and* kept whole on every rank)
    gradients  4Ψ (stage 0, 1)     stage 1 reduces only at the window's end: full grads meanwhile
               4Ψ_r (stage 2)      Ψ_r: every tensor that overlaps rank r's flat partition, whole
                                   (DeepSpeed keeps whole gradients of boundary tensors; = Ψ/N
                                   when no tensor straddles, up to 2 tensors more when they do)
               4Ψ/N (stage 3)      each tensor is split evenly, so no boundary effect
    master     0 (stage 0)         stage 1-3: 4Ψ/N -- the ZeRO optimizer keeps its own fp32
                                   partition even when the model is fp32 (measured)
    moments    8Ψ (stage 0)        stage 1-3: 8Ψ/N
    offload    + 4Ψ/N gradients    the fp32 gradient partition on the host, beside what the
                                   device keeps (ZeRO-2: its Ψ_r accumulation moves to the host;
                                   ZeRO-3: the device partition stays)
The textbook ZeRO column uses 4Ψ/N for stage-2 gradients and no offload copy; the table shows
both. Mixed precision (not measured: CPU runs fp32) makes weights and gradients 2 bytes per
parameter and keeps the 4-byte master. Offload moves master and moments (offload_param: also
the ZeRO-3 weight partition) to host memory, NVMe to swap files. With DS_ACCELERATOR=cpu the
"device" is the host, so every in-memory byte measured here is host memory.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from zerokit.errors import UsageError
from zerokit.resources import DS_CONFIGS
from zerokit.lab.memory import partition_overlap

DEFAULT_CONFIGS = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")
ROLES = ("weights", "gradients", "master", "moments")
MiB = 2**20


# ---- the formula ------------------------------------------------------------------------
def formula(r: dict, textbook: bool = False) -> dict[str, float]:
    """Bytes per rank by role (fp32 Adam) for one rank's record `r` (stage, params, ...).
    textbook: the ZeRO paper's partitioning (+ the fp32 master), without DeepSpeed's layout terms."""
    stage, p, n = r["stage"], r["params"], r["world_size"]
    offloaded = r["offload"]["offload_optimizer"] != "none"
    grads = {0: 4 * p, 1: 4 * p, 2: 4 * p / n if textbook else 4 * r["overlap"], 3: 4 * p / n}[stage]
    if offloaded and not textbook:
        grads += 4 * p / n
    return {
        "weights": 4 * p / n + 4 * r["persistent"] if stage == 3 else 4 * p,
        "gradients": grads,
        "master": 4 * p / n if stage >= 1 else 0,
        "moments": 8 * p / n if stage >= 1 else 8 * p,
    }


# ---- measuring (runs inside each rank) ---------------------------------------------------
def _walk(obj, path: str, out: list, seen: set, depth: int = 0) -> None:
    """Every tensor reachable from `obj` through lists, dicts and DeepSpeed objects, with its path."""
    if depth > 8 or id(obj) in seen:
        return
    if torch.is_tensor(obj):  # not marked seen: a tensor reached by several paths is listed under each
        out.append((path, obj))
        if getattr(obj, "grad", None) is not None:
            out.append((path + ".grad", obj.grad))
        if torch.is_tensor(getattr(obj, "ds_tensor", None)):  # ZeRO-3: this rank's partition
            out.append((path + ".ds_tensor", obj.ds_tensor))
        return
    if isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen, depth + 1)
    elif isinstance(obj, dict):
        seen.add(id(obj))
        for i, (k, v) in enumerate(obj.items()):
            _walk(v, f"{path}[{k if isinstance(k, (str, int)) else i}]", out, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            return  # the module's parameters are walked on their own
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", out, seen, depth + 1)


# Role of a storage, from the paths that reach it (first rule that matches any path wins).
_RULES = (
    ("gradients", (".grad", "averaged_gradients", "all_grad_tensors", "grads_in_partition", "accumulated_grads_in_cpu",
                   "grad_partitions_flat_buffer", "param_id_to_grad_partition")),
    ("moments", (".state[",)),
    ("master", ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")),
    ("weights", ("param:", "bit16_groups", "fp16_groups", "fp16_partitioned_groups", "ds_tensor")),
)


def role_of(paths: list[str]) -> str:
    for role, needles in _RULES:
        if any(n in p for p in paths for n in needles):
            return role
    return "buffers"


def measure(backend) -> dict:
    """Bytes per role held by this rank's engine, storages deduplicated."""
    found: list = []
    seen: set = set()
    for name, p in backend.module.named_parameters():
        _walk(p, f"param:{name}", found, seen)
    _walk(backend.engine.optimizer, "opt", found, seen)
    storages: dict = {}
    for path, t in found:
        s = t.untyped_storage()
        if s.nbytes() == 0 or t.device.type == "meta":  # released ZeRO-3 storages; shape-only tensors
            continue
        entry = storages.setdefault((t.device.type, s.data_ptr()), {"bytes": s.nbytes(), "paths": [],
                                                                     "device": t.device.type})
        entry["paths"].append(path)
    held = {r: 0 for r in (*ROLES, "buffers")}
    held["by_device"] = {}
    for entry in storages.values():
        held[role_of(entry["paths"])] += entry["bytes"]
        held["by_device"][entry["device"]] = held["by_device"].get(entry["device"], 0) + entry["bytes"]
    # every storage, largest first: what was counted, under which role, reached how
    held["storages"] = sorted(((e["bytes"], role_of(e["paths"]), e["paths"][:3]) for e in storages.values()),
                              reverse=True)
    return held


def _dir_bytes(path: str | None) -> int:
    if not path or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _measure_config(config: str, args, info) -> dict:
    """One config on this rank: build, train one step, measure mid-window of the next."""
    from zerokit.backends import make_backend
    from zerokit.config import Config
    from zerokit.dist import barrier
    from zerokit.models import build_causal_lm, count_params
    from zerokit.optim import param_groups
    model = build_causal_lm(args.preset, None, None, None, 0.0, seed=0)  # the preset's own shape
    params = count_params(model)
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, 0.1)]  # the order DeepSpeed flattens
    # Two micro-batches per step: between them each stage holds its gradients as it keeps them through
    # an accumulation window (stage 0/1: full .grad, stage 2/3: the reduced partition).
    train = Config(micro_batch_size=args.micro_batch, grad_accum=2, grad_clip=1.0, precision="fp32", lr=1e-4,
                   betas=[0.9, 0.99], eps=1e-8, weight_decay=0.1)
    backend = make_backend(model, train, info, ds_config=config)
    zero = backend.ds_config["zero_optimization"]
    threshold = zero.get("stage3_param_persistence_threshold", 0) if backend.stage == 3 else 0
    persistent = sum(p.ds_numel for p in backend.module.parameters() if p.ds_numel < threshold) if threshold else 0
    offload = {k: (zero.get(k) or {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    nvme = sorted({(zero.get(k) or {}).get("nvme_path") for k in offload if offload[k] == "nvme"})
    gen = torch.Generator().manual_seed(info.rank)
    vocab = backend.module.config.vocab_size

    def micro_step(sync: bool) -> None:  # what the training loop does per micro-batch
        ids = torch.randint(0, vocab, (args.micro_batch, args.seq), generator=gen)
        with backend.micro_batch(sync):
            loss = backend.model(input_ids=ids, labels=ids).loss
            backend.backward(loss, sync)

    micro_step(False)
    micro_step(True)
    backend.step()          # step 1: Adam's moments now exist
    micro_step(False)       # step 2, first micro-batch: gradients held for the window
    held = measure(backend)
    micro_step(True)
    backend.step()
    # NVMe: every rank's swap files lie under nvme_path; rank 0 adds them up once all ranks are past
    # the step (a barrier mid-window could interleave with ZeRO's overlapped reductions).
    barrier()
    held["nvme_bytes"] = sum(_dir_bytes(p) for p in nvme) if info.is_main else 0
    held.update(rank=info.rank, world_size=info.world_size, stage=backend.stage, params=params, persistent=persistent,
                overlap=partition_overlap(groups, info.world_size, info.rank), offload=offload,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return held


def _worker(args) -> int:
    from zerokit.dist import exit_process, init_distributed
    # A stuck rank (a collective one rank never joins) becomes a traceback and an exit, not a hang.
    # (Generous: the first DeepSpeed start on a machine JIT-compiles its CPU ops for minutes.)
    faulthandler.dump_traceback_later(args.worker_timeout, exit=True)
    info = init_distributed()
    for i, config in enumerate(args.config):
        held = _measure_config(config, args, info)
        Path(args.out, f"{i}_rank{info.rank}.json").write_text(json.dumps(held))
    exit_process(0)  # this rank's results are written; see zerokit.dist.exit_process


# ---- driving (the CLI) -------------------------------------------------------------------
def config_path(name: str, nvme_path: str | None, tmp: Path) -> Path:
    """A name in ds_configs/ or a JSON path; NVMe configs get `nvme_path` rewritten in a temp copy."""
    path = Path(name)
    if not path.suffix:
        path = DS_CONFIGS / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"DeepSpeed config {name!r} not found ({path}); give a name from ds_configs/ or a JSON path")
    ds = json.loads(path.read_text())
    zero = ds.get("zero_optimization", {})
    uses_nvme = [k for k in ("offload_optimizer", "offload_param") if (zero.get(k) or {}).get("device") == "nvme"]
    if not uses_nvme:
        return path
    if not nvme_path:
        raise UsageError(f"{path.name} offloads to NVMe: pass --nvme-path DIR (a fast local disk; needs libaio)")
    for k in uses_nvme:
        zero[k]["nvme_path"] = str(Path(nvme_path) / path.stem)
    copy = tmp / path.name
    copy.write_text(json.dumps(ds))
    return copy


def run_one(configs: list[Path], world_size: int, preset: str, seq: int, micro_batch: int,
            timeout: float = 900) -> list[list[dict]]:
    """Launch `world_size` CPU ranks that measure `configs` one after another; per config, each
    rank's measurement. (One config per launch keeps each peak RSS its own.)"""
    with tempfile.TemporaryDirectory(prefix="zerokit-memtest-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
               "-m", "zerokit.lab.memtest", "--worker", "--config", *map(str, configs), "--preset", preset,
               "--seq", str(seq), "--micro-batch", str(micro_batch), "--out", out, "--worker-timeout", str(timeout)]
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        run_workers(cmd, env, timeout, f"memtest workers for {', '.join(c.stem for c in configs)} on {world_size} ranks")
        return [[json.loads(Path(out, f"{i}_rank{r}.json").read_text()) for r in range(world_size)]
                for i in range(len(configs))]


def run_workers(cmd: list[str], env: dict, timeout: float, what: str) -> None:
    """Run a torchrun command line; raise with its stderr's tail if it fails or outlives `timeout`."""
    # Own session: on a timeout the launcher *and* its ranks go, not just the launcher.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{stderr[-4000:]}")


def summarize(name: str, ranks: list[dict]) -> dict:
    """Every rank against the formula; the row shows the rank holding the most model state."""
    for r in ranks:
        r["total"] = sum(r[k] for k in ROLES)
        r["formula_total"] = sum(formula(r).values())
        r["textbook_total"] = sum(formula(r, textbook=True).values())
        r["rel_err"] = r["total"] / r["formula_total"] - 1
    top = max(ranks, key=lambda r: r["total"])
    r0 = ranks[0]
    return {"config": name, "world_size": r0["world_size"], "stage": r0["stage"], "params": r0["params"],
            "rank": top["rank"], "measured": {k: top[k] for k in ROLES}, "formula": formula(top),
            "measured_total": top["total"], "formula_total": top["formula_total"],
            "textbook_total": top["textbook_total"], "rel_err": top["rel_err"],
            "worst_rel_err": max((r["rel_err"] for r in ranks), key=abs), "buffers": top["buffers"],
            "nvme_per_rank": r0["nvme_bytes"] / r0["world_size"], "peak_rss": [r["peak_rss"] for r in ranks],
            "offload": r0["offload"], "by_device": top["by_device"]}


def format_table(rows: list[dict]) -> str:
    head = ("| config | N | weights | grads | master | Adam m+v | **measured** | formula | diff | textbook ZeRO "
            "| diff | buffers | NVMe files | peak RSS | offloaded |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["measured"]
        off = ", ".join(f"{k.split('_')[1]}→{v}" for k, v in r["offload"].items() if v != "none") or "-"
        rss = f"{max(r['peak_rss']) / MiB:.0f}" if r["peak_rss"] else "-"
        lines.append(
            f"| {r['config']} | {r['world_size']} | " + " | ".join(f"{m[k] / MiB:.1f}" for k in ROLES)
            + f" | **{r['measured_total'] / MiB:.1f}** | {r['formula_total'] / MiB:.1f} | {100 * r['rel_err']:+.1f}%"
            + f" | {r['textbook_total'] / MiB:.1f} | {100 * (r['measured_total'] / r['textbook_total'] - 1):+.1f}%"
            + f" | {r['buffers'] / MiB:.1f} | {r['nvme_per_rank'] / MiB:.1f} | {rss} | {off} |")
    return "\n".join(lines)


def memtest_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="zerokit memtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="names in ds_configs/ (zero0 ... zero3_nvme) or JSON paths (default: all but NVMe)")
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4], help="world sizes to measure")
    p.add_argument("--preset", default="gpt-50m", help="model preset (zerokit/models.py)")
    p.add_argument("--seq", type=int, default=64, help="sequence length of the measured micro-batches")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--nvme-path", help="for NVMe configs: a local directory for the swap files (replaces nvme_path)")
    p.add_argument("--tolerance", type=float, default=0.10, help="exit 1 if a rank is further than this from the formula")
    p.add_argument("--json", help="also write every measurement here")
    p.add_argument("--one-launch", action="store_true",
                   help="measure all configs in one launch per world size (faster; no per-config peak RSS)")
    # internal: one rank of one measurement, started by torchrun
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker-timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    if any(n < 1 for n in args.ranks):
        raise UsageError("--ranks must be positive world sizes, e.g. --ranks 2 4")
    rows = []
    with tempfile.TemporaryDirectory(prefix="zerokit-memtest-cfg-") as tmp:
        paths = [config_path(name, args.nvme_path, Path(tmp)) for name in args.configs]
        for n in args.ranks:
            batches = [paths] if args.one_launch else [[p] for p in paths]
            for batch in batches:
                for path, ranks in zip(batch, run_one(batch, n, args.preset, args.seq, args.micro_batch)):
                    rows.append(summarize(path.stem, ranks))
                    print(f"measured {path.stem} on {n} ranks: {100 * rows[-1]['worst_rel_err']:+.2f}% vs formula "
                          f"(worst rank)", file=sys.stderr)
    if args.one_launch:  # RSS peaks accumulate over the configs of one process: not reported
        for r in rows:
            r["peak_rss"] = None
    print(f"{args.preset}: Ψ = {rows[0]['params']:,} parameters, fp32, Adam. MiB per rank, the rank holding the "
          f"most; measured mid-window (2 micro-batches per step). Formula and textbook: see `zerokit.lab.memtest`.\n")
    print(format_table(rows))
    print("\nEvery in-memory byte here is host memory: with DS_ACCELERATOR=cpu the accelerator is the CPU, "
          "so offload changes where DeepSpeed means the states to live, not the per-rank total.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if abs(r["worst_rel_err"]) > args.tolerance]
    for r in bad:
        print(f"FAIL {r['config']} N={r['world_size']}: a rank is {100 * r['worst_rel_err']:+.1f}% from the formula",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(memtest_main(sys.argv[1:]))
