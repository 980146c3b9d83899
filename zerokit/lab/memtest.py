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

The formula is `zerokit.lab.zero_formula.model_states` (the one the estimate uses), device and
host together: with DS_ACCELERATOR=cpu the "device" is the host, so every in-memory byte
measured here is host memory and offload changes where DeepSpeed means a state to live, not the
per-rank total. Beside it stands the textbook ZeRO column (the paper's 4Ψ/N stage-2 gradients,
no boundary tensors, no offload copies). CPU runs are fp32; mixed precision makes weights and
gradients 2 bytes per parameter and keeps the 4-byte master.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

from zerokit.errors import UsageError
from zerokit.lab.build import resolve_config, training_model
from zerokit.lab.flags import MiB, add_gpus, add_json, add_micro_batch, add_model, add_seq, parser
from zerokit.lab.measure import ROLES, held_by_role
from zerokit.lab.workers import run_workers
from zerokit.lab.zero_formula import model_states, model_stats
from zerokit.resources import DS_CONFIGS
DEFAULT_CONFIGS = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")
# memtest role <- the formula's item
ITEMS = {"weights": "weights", "gradients": "gradients", "master": "master_weights", "moments": "optimizer_state"}


# ---- the formulas ---------------------------------------------------------------------------
def _offload(r: dict) -> str:
    opt, params = (r["offload"][k] != "none" for k in ("offload_optimizer", "offload_param"))
    return "all" if opt and params else "optimizer" if opt else "params" if params else "none"


def formula(r: dict, stats) -> dict[str, float]:
    """Bytes by role that rank record `r` should hold (fp32 Adam): the ZeRO formula, device + host."""
    ms = model_states(stats, world_size=r["world_size"], stage=r["stage"], offload=_offload(r), precision="fp32",
                      peft="none", rank=r["rank"], zero=r["zero"])
    return {role: ms[item] + ms["host"][item] for role, item in ITEMS.items()}


def textbook(r: dict, psi: int) -> dict[str, float]:
    """The ZeRO paper's partitioning of 16Ψ (fp32: 4 weights + 4 grads + 4 master + 8 moments), without
    DeepSpeed's layout (boundary tensors, persistent params, offload copies): the reference column."""
    stage, n = r["stage"], r["world_size"]
    return {"weights": 4 * psi / n if stage == 3 else 4 * psi, "gradients": 4 * psi / n if stage >= 2 else 4 * psi,
            "master": 4 * psi / n if stage >= 1 else 0, "moments": 8 * psi / n if stage >= 1 else 8 * psi}


# ---- measuring (runs inside each rank) ---------------------------------------------------
def _dir_bytes(path: str | None) -> int:
    if not path or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _measure_config(config: str, args, info) -> dict:
    """One config on this rank: build, train one step, measure mid-window of the next."""
    from zerokit.backends import make_backend
    from zerokit.config import Config
    from zerokit.dist import barrier
    torch.manual_seed(0)
    model = training_model(resolve_config(args.model))  # the preset's own shape, fp32
    # Two micro-batches per step: between them each stage holds its gradients as it keeps them through
    # an accumulation window (stage 0/1: full .grad, stage 2/3: the reduced partition).
    train = Config(micro_batch_size=args.micro_batch, grad_accum=2, grad_clip=1.0, precision="fp32", lr=1e-4,
                   betas=[0.9, 0.99], eps=1e-8, weight_decay=0.1)
    backend = make_backend(model, train, info, ds_config=config)
    zero = backend.ds_config["zero_optimization"]
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
    held = held_by_role(backend)
    micro_step(True)
    backend.step()
    # NVMe: every rank's swap files lie under nvme_path; rank 0 adds them up once all ranks are past
    # the step (a barrier mid-window could interleave with ZeRO's overlapped reductions).
    barrier()
    held["nvme_bytes"] = sum(_dir_bytes(p) for p in nvme) if info.is_main else 0
    held.update(rank=info.rank, world_size=info.world_size, stage=backend.stage, offload=offload,
                zero={k: v for k, v in zero.items() if k == "stage3_param_persistence_threshold"},
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


def run_one(configs: list[Path], world_size: int, model: str, seq: int, micro_batch: int,
            timeout: float = 900) -> list[list[dict]]:
    """Launch `world_size` CPU ranks that measure `configs` one after another; per config, each
    rank's measurement. (One config per launch keeps each peak RSS its own.)"""
    with tempfile.TemporaryDirectory(prefix="zerokit-memtest-") as out:
        run_workers("zerokit.lab.memtest", ["--config", *configs, "--model", model, "--seq", seq, "--micro-batch",
                                            micro_batch, "--out", out, "--worker-timeout", timeout], world_size,
                    timeout=timeout + 60,
                    what=f"memtest workers for {', '.join(c.stem for c in configs)} on {world_size} ranks")
        return [[json.loads(Path(out, f"{i}_rank{r}.json").read_text()) for r in range(world_size)]
                for i in range(len(configs))]


def summarize(name: str, ranks: list[dict], stats) -> dict:
    """Every rank against the formula; the row shows the rank holding the most model state."""
    for r in ranks:
        r["formula"] = formula(r, stats)
        r["total"] = sum(r[k] for k in ROLES)
        r["formula_total"] = sum(r["formula"].values())
        r["textbook_total"] = sum(textbook(r, stats.params).values())
        r["rel_err"] = r["total"] / r["formula_total"] - 1
    top = max(ranks, key=lambda r: r["total"])
    r0 = ranks[0]
    return {"config": name, "world_size": r0["world_size"], "stage": r0["stage"], "params": stats.params,
            "rank": top["rank"], "measured": {k: top[k] for k in ROLES}, "formula": top["formula"],
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
    p = parser("zerokit memtest", __doc__.split("\n\n")[0],
               "zerokit memtest --model gpt-tiny --gpus 2 4 --configs zero0 zero2 zero3 --seq 32")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="names in ds_configs/ (zero0 ... zero3_nvme) or JSON paths (default: all but NVMe)")
    add_gpus(p, default=2, many=True, old="--ranks")
    add_model(p, default="gpt-50m")
    p.add_argument("--preset", dest="model", help=argparse.SUPPRESS)  # the former spelling
    add_seq(p, 64)
    add_micro_batch(p)
    p.add_argument("--nvme-path", help="for NVMe configs: a local directory for the swap files (replaces nvme_path)")
    p.add_argument("--tolerance", type=float, default=0.10, help="exit 1 if a rank is further than this from the formula")
    add_json(p, to_file=True)
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
    if any(n < 1 for n in args.gpus):
        raise UsageError("--gpus must be positive world sizes, e.g. --gpus 2 4")
    stats = model_stats(resolve_config(args.model))
    rows = []
    with tempfile.TemporaryDirectory(prefix="zerokit-memtest-cfg-") as tmp:
        paths = [config_path(name, args.nvme_path, Path(tmp)) for name in args.configs]
        for n in args.gpus:
            batches = [paths] if args.one_launch else [[p] for p in paths]
            for batch in batches:
                for path, ranks in zip(batch, run_one(batch, n, args.model, args.seq, args.micro_batch)):
                    rows.append(summarize(path.stem, ranks, stats))
                    print(f"measured {path.stem} on {n} ranks: {100 * rows[-1]['worst_rel_err']:+.2f}% vs formula "
                          f"(worst rank)", file=sys.stderr)
    if args.one_launch:  # RSS peaks accumulate over the configs of one process: not reported
        for r in rows:
            r["peak_rss"] = None
    print(f"{args.model}: Ψ = {stats.params:,} parameters, fp32, Adam. MiB per rank, the rank holding the "
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
    from zerokit.lab.flags import run_cli
    raise SystemExit(run_cli(memtest_main, sys.argv[1:]))
