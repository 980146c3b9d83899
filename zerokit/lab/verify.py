"""`zerokit verify`: real training steps against the estimate, per rank: peak memory and step time.

    zerokit verify --model gpt-tiny --gpus 2 --seq 128 --sweep stage=0,1,2,3 grad_ckpt=none,full \\
        micro_batch=1,4 peft=none,lora

Every point runs in ONE `torchrun` launch of N local ranks (gloo on CPU, NCCL on GPUs), through
zerokit's own DeepSpeed backend (`make_backend`, the code a recipe runs) with the zero section
the estimate models (`zero_formula.zero_config`, the one `zerokit plan` writes). In each rank:
build the model from its config (random weights: memory does not depend on them) with the
estimate's LoRA and checkpointing, run one unmeasured step (Adam allocates its state), then
one measured step of `grad_accum` micro-batches:
  - peak, CPU: allocator-level counting (`measure.LiveBytes`): every storage the engine holds
    before the step (walked as `zerokit memtest` does) plus every storage an op returns during
    the step, until it is freed. GPU: torch.cuda.max_memory_allocated over the step.
  - model states: weights, gradients, fp32 master and Adam moments the engine holds in the
    middle of the window (after its first micro-batch), as `zerokit memtest` walks them.
  - step time: the mean of `--timed-steps` further steps, uncounted.
Beside each: `estimate.estimate` for the same point and the same zero section; the worst rank
of each is compared (the estimate is for the busiest rank). `zerokit plan --verify K` runs
its top K choices through `run_points`.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from zerokit.errors import UsageError
from zerokit.lab.build import resolve_config, training_model
from zerokit.lab.estimate import CKPTS, CUDA_CONTEXT_BYTES, estimate
from zerokit.lab.flags import (OFFLOADS, add_gpus, add_json, add_model, add_precision, add_seq,
                               check_offload, fmt_bytes, parser, run_cli)
from zerokit.lab.measure import LiveBytes, engine_storages, held_by_role
from zerokit.lab.workers import run_workers
from zerokit.lab.zero_formula import model_states, model_stats, zero_config

MiB = 2**20
GRAD_ACCUM = 2          # two micro-batches: the window holds gradients between them (stage 0/1 full, 2/3 partitions)
STATE_TOLERANCE = 0.01  # model-state terms: exact up to padding
PEAK_TOLERANCE = {"cpu": 0.15, "cuda": 0.10}
PROCESS_BYTES = 600 * MiB  # one CPU rank's python + torch + DeepSpeed, before any tensor
POINT_KEYS = {"stage": (0, 1, 2, 3), "offload": OFFLOADS, "grad_ckpt": CKPTS,
              "micro_batch": None, "peft": ("none", "lora")}
STATE_PAIRS = (("weights", "weights"), ("gradients", "gradients"), ("master_weights", "master"),
               ("optimizer_state", "moments"))  # estimate item -> memtest role


def point_defaults(p: dict) -> dict:
    return {"stage": 0, "offload": "none", "grad_ckpt": "none", "micro_batch": 1, "peft": "none", **p}


def zero_section(config, p: dict, precision: str, small_buckets: bool) -> dict:
    """The zero section a point runs with; small_buckets sizes DeepSpeed's buckets to the model
    (the defaults are sized for billions of parameters and would be most of a small model's peak)."""
    stats = model_stats(config, p["peft"])
    zero = zero_config(p["stage"], p["offload"], stats)
    if small_buckets:
        bucket = max(stats.largest_trainable, stats.trainable // 4)
        zero["reduce_bucket_size"] = bucket
        if "allgather_bucket_size" in zero:
            zero["allgather_bucket_size"] = bucket
    return zero


def estimate_point(config, p: dict, world_size: int, seq: int, precision: str, device: str, zero: dict):
    return estimate(config, world_size=world_size, stage=p["stage"], offload=p["offload"],
                    micro_batch=p["micro_batch"], seq=seq, grad_ckpt=p["grad_ckpt"], precision=precision,
                    peft=p["peft"], grad_accum=GRAD_ACCUM, device=device, zero=zero)


# ---- in each rank ---------------------------------------------------------------------------
def _measure_point(config, p: dict, seq: int, precision: str, zero: dict, info, timed_steps: int) -> dict:
    from zerokit.backends import make_backend
    from zerokit.config import Config

    torch.manual_seed(0)
    model = training_model(config, precision=precision, peft=p["peft"], grad_ckpt=p["grad_ckpt"])
    model.to(info.device)
    ds = {"train_micro_batch_size_per_gpu": p["micro_batch"], "gradient_accumulation_steps": GRAD_ACCUM,
          "zero_optimization": zero}
    if p["offload"] != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the host partitions: no JIT-built op
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds, f)
    train = Config(micro_batch_size=p["micro_batch"], grad_accum=GRAD_ACCUM, grad_clip=1.0, precision=precision,
                   lr=1e-4, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.1)
    try:
        backend = make_backend(model, train, info, ds_config=f.name)
    finally:
        os.unlink(f.name)
    gen = torch.Generator().manual_seed(info.rank)  # each rank its own data
    vocab = config.vocab_size
    batches = [torch.randint(0, vocab, (p["micro_batch"], seq), generator=gen).to(info.device)
               for _ in range(GRAD_ACCUM)]

    def micro_step(i: int, phase=lambda name: None) -> None:  # what the training loop does per micro-batch
        sync = i == GRAD_ACCUM - 1
        with backend.micro_batch(sync):
            phase(f"forward {i + 1}")
            loss = backend.model(input_ids=batches[i], labels=batches[i]).loss / GRAD_ACCUM
            phase(f"backward {i + 1}")
            backend.backward(loss, sync)

    def step() -> None:
        for i in range(GRAD_ACCUM):
            micro_step(i)
        backend.step()

    step()  # Adam's state now exists
    gc.collect()
    counter = LiveBytes()
    for t in engine_storages(backend) + batches:
        counter.track(t)
    baseline = counter.current
    on_cuda = info.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with counter:
        micro_step(0, counter.set_phase)
    held = held_by_role(backend)  # mid-window (walking allocates nothing, so outside the counter)
    with counter:
        for i in range(1, GRAD_ACCUM):
            micro_step(i, counter.set_phase)
        counter.set_phase("optimizer")
        backend.step()
    out = {"rank": info.rank, "peak_bytes": counter.peak, "peak_phase": counter.peak_phase,
           "baseline_bytes": baseline, **{role: held[role] for _, role in STATE_PAIRS}}
    if on_cuda:
        torch.cuda.synchronize()
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(timed_steps):
        if on_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["step_s"] = sum(times) / len(times) if times else None
    backend.engine.destroy()
    del backend, model
    gc.collect()
    return out


def _worker(spec_path: str) -> int:
    import faulthandler

    from zerokit.dist import exit_process, init_distributed
    spec = json.loads(Path(spec_path).read_text())
    # A stuck rank (a collective one rank never joins) becomes a traceback and an exit, not a hang.
    faulthandler.dump_traceback_later(spec["timeout"], exit=True)
    info = init_distributed()
    config = resolve_config(spec["model"])
    for i, (p, zero) in enumerate(zip(spec["points"], spec["zero"])):
        result = _measure_point(config, p, spec["seq"], spec["precision"], zero, info, spec["timed_steps"])
        Path(spec["out"], f"{i}_rank{info.rank}.json").write_text(json.dumps(result))
    exit_process(0)  # this rank's results are written; see zerokit.dist.exit_process


# ---- driving ----------------------------------------------------------------------------------
def run_points(model: str, points: list[dict], world_size: int, seq: int, precision: str = "fp32",
               small_buckets: bool = True, timed_steps: int = 2, timeout: float = 900) -> list[dict]:
    """Measure `points` on `world_size` local ranks (one launch); per point, the comparison row."""
    config = resolve_config(model)
    points = [point_defaults(p) for p in points]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world_size > torch.cuda.device_count():
        raise UsageError(f"--gpus {world_size}: this node has {torch.cuda.device_count()} GPU(s); verify runs on "
                         "one node, so use at most that many (the estimate scales to more)")
    if device == "cpu" and precision != "fp32":
        raise UsageError(f"--precision {precision} on CPU: verify measures fp32 there (bf16 CPU kernels keep "
                         "other temporaries than the GPU ones the estimate models)")
    zeros = [zero_section(config, p, precision, small_buckets) for p in points]
    if device == "cpu":  # every rank's bytes are host memory here: refuse what cannot fit
        need = world_size * max(estimate_point(config, p, world_size, seq, precision, device, z).total
                                for p, z in zip(points, zeros))
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need + world_size * PROCESS_BYTES > 0.8 * avail:
            raise UsageError(f"{model} on {world_size} CPU rank(s) needs ~{fmt_bytes(need)} of tensors "
                             f"(+{fmt_bytes(PROCESS_BYTES)} per process); {fmt_bytes(avail)} is free: "
                             "verify a smaller --model, --seq or --micro-batch here, or run on the GPUs it is for")
    with tempfile.TemporaryDirectory(prefix="zerokit-verify-") as out:
        spec = Path(out, "spec.json")
        spec.write_text(json.dumps({"model": model, "points": points, "zero": zeros, "seq": seq,
                                    "precision": precision, "timed_steps": timed_steps, "out": out,
                                    "timeout": timeout}))
        run_workers("zerokit.lab.verify", [spec], world_size, timeout=timeout + 60,
                    what=f"verify ranks on {world_size} rank(s)")
        ranks = [[json.loads(Path(out, f"{i}_rank{r}.json").read_text()) for r in range(world_size)]
                 for i in range(len(points))]
    return [compare(config, p, rs, world_size, seq, precision, device, z) for p, rs, z in zip(points, ranks, zeros)]


def compare(config, p: dict, ranks: list[dict], world_size: int, seq: int, precision: str, device: str,
            zero: dict) -> dict:
    """The busiest rank's measurement beside the estimate, with relative errors."""
    e = estimate_point(config, p, world_size, seq, precision, device, zero)
    top = max(ranks, key=lambda r: r["peak_bytes"])
    if device == "cuda":  # the allocator's peak; the CUDA context is outside it
        measured_peak, predicted_peak = top["cuda_peak_allocated_bytes"], e.total - CUDA_CONTEXT_BYTES
    else:
        measured_peak, predicted_peak = top["peak_bytes"], e.total
    states = {}
    for item, role in STATE_PAIRS:
        m = max(r[role] for r in ranks)
        # the estimate's gradients item is what is live at the peak; held mid-window is the model state
        est = model_states(model_stats(config, p["peft"]), world_size=world_size, stage=p["stage"],
                           offload=p["offload"], precision=precision, peft=p["peft"], zero=zero)[item]
        states[item] = {"measured": m, "estimate": est, "rel_err": (est - m) / m if m else float(est != 0)}
    return {"point": p, "world_size": world_size, "seq": seq, "device": device,
            "measured_peak": measured_peak, "estimate_peak": predicted_peak,
            "peak_rel_err": predicted_peak / measured_peak - 1, "peak_phase": top["peak_phase"],
            "estimate_phase": e.peak_phase, "states": states, "estimate_items": e.items(),
            "step_s": max(r["step_s"] for r in ranks if r["step_s"] is not None) if ranks[0]["step_s"] else None,
            "zero": zero}


def label(p: dict) -> str:
    return (f"ZeRO-{p['stage']}{'' if p['offload'] == 'none' else ' off=' + p['offload']} ckpt={p['grad_ckpt']} "
            f"mb={p['micro_batch']} peft={p['peft']}")


def format_table(rows: list[dict]) -> str:
    head = ("| point | measured peak MiB | estimate MiB | diff | states: weights / grads / master / Adam (est vs "
            "measured) | peak phase (measured / est) | step ms |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        st = " / ".join(f"{100 * r['states'][k]['rel_err']:+.1f}%" for k, _ in STATE_PAIRS)
        step = f"{1e3 * r['step_s']:.0f}" if r["step_s"] else "-"
        lines.append(f"| {label(r['point'])} | {r['measured_peak'] / MiB:.2f} | {r['estimate_peak'] / MiB:.2f} | "
                     f"{100 * r['peak_rel_err']:+.1f}% | {st} | {r['peak_phase']} / {r['estimate_phase']} | {step} |")
    return "\n".join(lines)


def failures(rows: list[dict], peak_tolerance: float) -> list[str]:
    bad = []
    for r in rows:
        for k, s in r["states"].items():
            if abs(s["rel_err"]) > STATE_TOLERANCE:
                bad.append(f"{label(r['point'])}: {k} estimate {s['estimate']:,.0f} vs measured {s['measured']:,} B")
        if abs(r["peak_rel_err"]) > peak_tolerance:
            bad.append(f"{label(r['point'])}: peak estimate {r['estimate_peak']:,} vs measured {r['measured_peak']:,} B "
                       f"({100 * r['peak_rel_err']:+.1f}%)")
    return bad


def parse_points(items: list[str]) -> list[dict]:
    """["stage=0,1", "micro_batch=1,4"] -> every combination, as point dicts."""
    import itertools
    sweep = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in POINT_KEYS:
            raise UsageError(f"--sweep {item!r}: write key=v1,v2 with key one of {', '.join(POINT_KEYS)}")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        allowed = POINT_KEYS[key]
        try:
            vals = [int(v) for v in vals] if key in ("stage", "micro_batch") else vals
        except ValueError:
            raise UsageError(f"--sweep {key}: integers only, got {values!r}") from None
        bad = [v for v in vals if (v not in allowed if allowed else v < 1)]
        if bad or not vals:
            raise UsageError(f"--sweep {key}: {bad or values!r} not allowed; use "
                             + (", ".join(map(str, allowed)) if allowed else "positive integers"))
        sweep[key] = vals
    points = [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
    for p in map(point_defaults, points):
        try:
            check_offload(p["stage"], p["offload"])
        except UsageError as e:
            raise UsageError(f"{label(p)}: {e}") from None
    return points


def verify_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one rank, started by run_points' torchrun
        return _worker(argv[1])
    ap = parser("zerokit verify", __doc__.split("\n\n")[0],
                "zerokit verify --model gpt-tiny --gpus 2 --seq 128 --sweep stage=0,3 grad_ckpt=none,full")
    add_model(ap)
    add_gpus(ap, default=2)
    add_seq(ap, 128)
    add_precision(ap, None, "default: bf16 on GPUs, fp32 on CPU")
    ap.add_argument("--sweep", nargs="+", default=["stage=0,1,2,3"], help="key=v1,v2 ... over " + ", ".join(POINT_KEYS))
    ap.add_argument("--default-buckets", action="store_true",
                    help="keep the reduce bucket zerokit plan writes (DeepSpeed's \"auto\": hidden_size^2 elements) "
                         "instead of sizing it to the model's parameters")
    ap.add_argument("--timed-steps", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=None, help="peak tolerance (default 0.15 CPU, 0.10 GPU)")
    add_json(ap, to_file=True)
    a = ap.parse_args(argv)
    precision = a.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    rows = run_points(a.model, parse_points(a.sweep), a.gpus, a.seq, precision, small_buckets=not a.default_buckets,
                      timed_steps=a.timed_steps)
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    bad = failures(rows, a.tolerance if a.tolerance is not None else PEAK_TOLERANCE[rows[0]["device"]])
    for b in bad:
        print(f"outside tolerance: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(verify_main))
