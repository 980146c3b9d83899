"""`zerokit plan`: the DeepSpeed configurations that fit, ranked by predicted step time.

Memory comes from `zerokit.lab.estimate.estimate` (the same numbers `zerokit estimate` prints).
Time comes from a deliberately simple cost model, stated here so it can be argued with:

  compute   = FLOPs / (peak_flops x mfu)
              FLOPs per token = 2 x matmul params per forward, x2 more for backward
              (x1 under LoRA: frozen weights need no weight gradient), + attention
              4 x layers x hidden x seq per forward; checkpointing adds one more forward
              of the recomputed blocks (all of them for full, half for selective)
  comm      = bytes each rank moves / bus bandwidth (NVLink in one node, InfiniBand across):
              stage 0/1: all-reduce (stage 1: reduce-scatter + all-gather) of grads once per step, 2(N-1)/N x grads
              stage 2:   reduce-scatter of grads every micro-step + all-gather of params once per step
              stage 3:   all-gather params in forward and again in backward + reduce-scatter grads, every micro-step
  offload   = PCIe bytes / pcie_bw + CPU Adam time: optimizer offload moves each micro-step's grad
              partition down and the updated params up once per step; params offload also fetches
              each rank's param partition for forward and backward every micro-step
  latency   = a fixed MICRO_STEP_LATENCY_S per micro-step (kernel launches, Python, ZeRO hooks): what
              makes larger micro-batches faster when FLOPs and bytes are equal
  step      = grad_accum x (compute + comm + offload + latency per micro-step) + per-step comm/offload,
              no overlap of communication with compute (an upper bound; overlap_comm hides some)

Hardware numbers are parameters (`Hardware`); the defaults are rounded datasheet figures.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from zerokit.errors import UsageError
from zerokit.lab import verify as real_steps
from zerokit.lab.build import default_seq, resolve_config
from zerokit.lab.estimate import CKPTS, PHASES, Estimate, add_model_args, estimate
from zerokit.lab.flags import STAGES, fmt_bytes, offload_parts, parse_bytes, parser, run_cli
from zerokit.lab.zero_formula import BYTES, STATE_ITEMS, ModelStats, model_states, model_stats, zero_config


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float   # dense bf16/fp16 FLOP/s per GPU (fp32 runs at tf32_flops)
    tf32_flops: float
    intra_bw: float     # bytes/s per GPU, achievable collective bus bandwidth inside a node (NVLink)
    inter_bw: float     # bytes/s per GPU across nodes (InfiniBand)
    pcie_bw: float      # bytes/s host <-> GPU per GPU
    mfu: float = 0.40   # fraction of peak the model's matmuls reach (a typical well-tuned value)
    cpu_adam: float = 1e9  # parameters/s one rank's DeepSpeed CPUAdam updates


HARDWARE = {
    # A100 SXM: 312 TFLOP/s bf16, NVLink3 ~150 GB/s bus bw, 200 Gb/s IB per GPU, PCIe4 ~20 GB/s
    "a100": Hardware("A100 SXM", 312e12, 156e12, 150e9, 25e9, 20e9),
    # H100 SXM: 989 TFLOP/s bf16 dense, NVLink4 ~300 GB/s bus bw, 400 Gb/s IB per GPU, PCIe5 ~40 GB/s
    "h100": Hardware("H100 SXM", 989e12, 495e12, 300e9, 50e9, 40e9),
}

USABLE_FRACTION = 0.95     # plan to at most this share of GPU / host memory (estimates are +-15%)
DEFAULT_GLOBAL_TOKENS = 2**19  # 524,288 tokens per optimizer step (GPT-3-small-like) unless --global-batch
MAX_MICRO_BATCH = 256
MICRO_STEP_LATENCY_S = 0.02  # per forward+backward, independent of its size (an assumption, not measured)


@dataclass
class Candidate:
    stage: int
    offload: str
    grad_ckpt: str
    micro_batch: int
    grad_accum: int
    est: Estimate
    time: dict            # seconds per optimizer step: compute, comm, offload, total
    tokens: int           # tokens per optimizer step (all ranks)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time["total"]


def step_time(config, stats: ModelStats, *, world_size, nodes, stage, offload, grad_ckpt, micro_batch,
              grad_accum, seq, precision, peft, hw: Hardware) -> dict:
    """Seconds per optimizer step from the cost model in the module docstring."""
    N, w = world_size, BYTES[precision]
    tokens_micro = micro_batch * seq
    L, H = config.num_hidden_layers, config.hidden_size
    fwd = 2 * stats.matmul_params + 4 * L * H * seq          # FLOPs per token, one forward
    bwd = (1 if peft != "none" else 2) * 2 * stats.matmul_params + 2 * 4 * L * H * seq
    recompute = {"none": 0, "full": 1, "selective": 0.5}[grad_ckpt] * fwd
    flops = (fwd + bwd + recompute) * tokens_micro
    compute = flops / ((hw.peak_flops if precision != "fp32" else hw.tf32_flops) * hw.mfu)

    bw = hw.inter_bw if nodes > 1 else hw.intra_bw
    ring = (N - 1) / N if N > 1 else 0.0
    params_b, grads_b = stats.params * w, stats.trainable * w
    if stage <= 1:
        comm_micro, comm_step = 0.0, 2 * ring * grads_b
    elif stage == 2:
        comm_micro, comm_step = ring * grads_b, ring * params_b
    else:
        comm_micro, comm_step = ring * (2 * params_b + grads_b), 0.0

    pcie_micro = pcie_step = cpu = 0.0
    off_opt, off_params = offload_parts(offload)
    if off_opt:
        pcie_micro += grads_b / N            # this rank's grad partition down, every micro-step
        pcie_step += stats.trainable * w / N  # updated params back up
        cpu = stats.trainable / N / hw.cpu_adam
    if off_params:
        pcie_micro += 2 * params_b / N       # fetch the param partition for forward and backward
    micro = compute + comm_micro / bw + pcie_micro / hw.pcie_bw + MICRO_STEP_LATENCY_S
    total = grad_accum * micro + comm_step / bw + pcie_step / hw.pcie_bw + cpu
    return {"compute": grad_accum * compute,
            "latency": grad_accum * MICRO_STEP_LATENCY_S,
            "comm": (grad_accum * comm_micro + comm_step) / bw,
            "offload": (grad_accum * pcie_micro + pcie_step) / hw.pcie_bw + cpu,
            "total": total}


def valid_offloads(stage: int) -> tuple:
    return {0: ("none",), 1: ("none", "optimizer"), 2: ("none", "optimizer"),
            3: ("none", "optimizer", "params", "all")}[stage]


def plan(config, *, gpus: int, nodes: int = 1, gpu_mem: int, host_mem: int, seq: int, precision: str = "bf16",
         peft: str = "none", attn: str = "sdpa", global_tokens: int = DEFAULT_GLOBAL_TOKENS,
         ckpt_modes=("none", "full"), hw: Hardware = HARDWARE["h100"], lora_r: int = 16):
    """All (stage x offload x grad-ckpt x micro-batch) that fit, best throughput first; and the nearest misses.

    Returns (fits, misses): `misses` holds, per stage/offload/ckpt, the micro-batch-1 candidate
    that did not fit, so the caller can say why.
    """
    N = gpus * nodes
    stats = model_stats(config, peft, lora_r)
    fits, misses = [], []
    for stage in STAGES:
        for offload in valid_offloads(stage):
            if peft == "qlora" and stage == 3:
                continue
            for ckpt in ckpt_modes:
                b = 1
                while b <= MAX_MICRO_BATCH and b * seq * N <= max(global_tokens, seq * N):
                    accum = max(1, math.ceil(global_tokens / (b * seq * N)))
                    est = estimate(config, world_size=N, stage=stage, offload=offload, micro_batch=b, seq=seq,
                                          grad_ckpt=ckpt, precision=precision, peft=peft, attn=attn,
                                          grad_accum=accum, gpus_per_node=gpus, lora_r=lora_r)
                    t = step_time(config, stats, world_size=N, nodes=nodes, stage=stage, offload=offload,
                                  grad_ckpt=ckpt, micro_batch=b, grad_accum=accum, seq=seq, precision=precision,
                                  peft=peft, hw=hw)
                    c = Candidate(stage, offload, ckpt, b, accum, est, t, b * seq * N * accum)
                    if est.total > USABLE_FRACTION * gpu_mem or est.host_per_node > USABLE_FRACTION * host_mem:
                        if b == 1:
                            misses.append(c)
                        break  # memory only grows with the micro-batch
                    fits.append(c)
                    b *= 2
    fits.sort(key=lambda c: (-c.tokens_per_s, c.est.total))  # ties: more memory headroom first
    return fits, misses


def deepspeed_config(c: Candidate, precision: str, stats: ModelStats) -> dict:
    """A plain DeepSpeed config for candidate `c` (zero section shared with the estimator)."""
    N = c.est.inputs["world_size"]
    ds = {
        "train_micro_batch_size_per_gpu": c.micro_batch,
        "gradient_accumulation_steps": c.grad_accum,
        "train_batch_size": c.micro_batch * c.grad_accum * N,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero_config(c.stage, c.offload, stats),
        "steps_per_print": 100,
    }
    if c.offload != "none":
        # lets the recipe's torch AdamW run on the CPU partitions; DeepSpeedCPUAdam would be faster
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def launch_command(model: str, c: Candidate, gpus: int, nodes: int, seq: int, precision: str, config,
                   ds_path: str) -> str:
    N = gpus * nodes
    multi = f" --num_machines {nodes} --machine_rank $NODE_RANK --main_process_ip $MASTER_ADDR" if nodes > 1 else ""
    dropout = getattr(config, "resid_pdrop", None) if config.model_type == "gpt2" else getattr(config, "attention_dropout", None)
    extra = f" model.dropout={dropout}" if dropout is not None else ""
    return (f"accelerate launch --num_processes {N}{multi} --use_deepspeed --deepspeed_config_file {ds_path} "
            f"recipes/pretrain_gpt.py model.preset={model} data.block_size={seq} data.vocab_size={config.vocab_size} "
            f"train.micro_batch_size={c.micro_batch} train.grad_accum={c.grad_accum} "
            f"model.grad_ckpt={'true' if c.grad_ckpt == 'full' else 'false' if c.grad_ckpt == 'none' else c.grad_ckpt}"
            f"{extra} train.precision={precision} optim.name=adamw")  # the plan counts AdamW's state


def check_verifiable(nodes: int, peft: str) -> None:
    if nodes > 1:
        raise UsageError("--verify runs on this node only: plan with --nodes 1 to verify, then scale out")
    if peft == "qlora":
        raise UsageError("--verify measures full and LoRA runs only: use --peft lora (same activations, 16-bit base)")


def verify_top(cands: list[Candidate], *, model: str, config, stats: ModelStats, gpus: int, nodes: int,
               seq: int, precision: str, peft: str, hw: Hardware) -> list[dict]:
    """`--verify K`: real steps of the top K candidates on this node's ranks (`zerokit.lab.verify`,
    with the DeepSpeed zero section the plan writes), measured peak and step time beside the
    prediction for what ran (a window of `verify.GRAD_ACCUM` micro-batches)."""
    check_verifiable(nodes, peft)
    run_precision = precision if torch.cuda.is_available() else "fp32"  # CPU ranks measure fp32
    points = [dict(stage=c.stage, offload=c.offload, grad_ckpt=c.grad_ckpt, micro_batch=c.micro_batch, peft=peft)
              for c in cands]
    rows = real_steps.run_points(model, points, gpus, seq, run_precision, small_buckets=False, timed_steps=3)
    for c, r in zip(cands, rows):
        r["predicted_step_s"] = step_time(config, stats, world_size=gpus, nodes=1, stage=c.stage, offload=c.offload,
                                          grad_ckpt=c.grad_ckpt, micro_batch=c.micro_batch,
                                          grad_accum=real_steps.GRAD_ACCUM, seq=seq, precision=precision, peft=peft,
                                          hw=hw)["total"]
    return rows


def format_verify(rows: list[dict], hw: Hardware) -> str:
    lines = [f"  {'configuration':<52} {'peak est.':>11} {'measured':>11} {'diff':>7} {'step s pred.':>12} "
             f"{'measured':>9}"]
    for r in rows:
        lines.append(f"  {real_steps.label(r['point']):<52} "
                     f"{fmt_bytes(r['estimate_peak']):>11} {fmt_bytes(r['measured_peak']):>11} "
                     f"{100 * r['peak_rel_err']:>+6.1f}% {r['predicted_step_s']:>12.4f} {r['step_s']:>9.4f}")
    if rows and rows[0]["device"] == "cpu":
        lines.append(f"  (no GPU here: ran on CPU ranks in fp32, so memory is compared with the CPU estimate of the "
                     f"same configuration; predicted step times are for {hw.name} and do not apply to the CPU)")
    return "\n".join(lines)


def _label(c: Candidate) -> str:
    return f"ZeRO-{c.stage} offload={c.offload} ckpt={c.grad_ckpt} micro-batch={c.micro_batch}"


def model_state_table(stats: ModelStats, N: int, precision: str, peft: str) -> list[str]:
    """Per-rank model states by stage/offload: the 2+2+12 bytes/param (ZeRO paper) with this model's counts."""
    lines = []
    for stage in STAGES:
        for offload in valid_offloads(stage):
            if peft == "qlora" and stage == 3:
                continue
            ms = model_states(stats, world_size=N, stage=stage, offload=offload, precision=precision, peft=peft)
            gpu = sum(ms[k] for k in STATE_ITEMS)
            lines.append(f"  ZeRO-{stage} offload={offload:<9} weights+grads+Adam+master {fmt_bytes(gpu):>12} per GPU")
    return lines


def plan_main(argv: list[str] | None = None) -> int:
    p = parser("zerokit plan", "DeepSpeed configurations that fit, fastest first.",
               "zerokit plan --model llama-7b --gpus 8 --gpu-mem 80GB --seq 2048 --out plan.json")
    add_model_args(p)
    p.add_argument("--gpu-mem", required=True, help="memory per GPU, e.g. 80GB")
    p.add_argument("--host-mem", default="512GB", help="CPU RAM per node (default 512GB)")
    p.add_argument("--global-batch", type=int, default=DEFAULT_GLOBAL_TOKENS, help="tokens per optimizer step")
    p.add_argument("--gpu", choices=sorted(HARDWARE), default="h100", help="peak FLOP/s and bandwidths")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation (default 0.40)")
    p.add_argument("--ckpt-modes", default="none,full",
                   help="comma list from none,full,selective (the recipe's model.grad_ckpt is on/off)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default="plan.json", help="where to write the recommended DeepSpeed JSON")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="run real steps of the top K on this node's GPUs (CPU ranks without one): measured vs predicted")
    a = p.parse_args(argv)
    if a.verify:
        check_verifiable(a.nodes, a.peft)  # fail before planning, not after
    config = resolve_config(a.model)
    seq = default_seq(config, a.seq)
    hw = HARDWARE[a.gpu] if a.mfu is None else replace(HARDWARE[a.gpu], mfu=a.mfu)
    modes = tuple(m.strip() for m in a.ckpt_modes.split(","))
    for m in modes:
        if m not in CKPTS:
            raise UsageError(f"--ckpt-modes: {m!r} is not one of {', '.join(CKPTS)}")
    gpu_mem, host_mem, N = parse_bytes(a.gpu_mem), parse_bytes(a.host_mem), a.gpus * a.nodes
    stats = model_stats(config, a.peft, a.lora_r)
    fits, misses = plan(config, gpus=a.gpus, nodes=a.nodes, gpu_mem=gpu_mem, host_mem=host_mem, seq=seq,
                        precision=a.precision, peft=a.peft, attn=a.attn, global_tokens=a.global_batch,
                        ckpt_modes=modes, hw=hw, lora_r=a.lora_r)
    print(f"zerokit plan: {a.model} ({stats.params / 1e9:.2f}B params, {stats.trainable / 1e9:.3f}B trainable), "
          f"{a.nodes} node(s) x {a.gpus} GPU(s) of {fmt_bytes(gpu_mem)}, host {fmt_bytes(host_mem)}/node, "
          f"{a.precision}, peft {a.peft}, seq {seq}, global batch {a.global_batch:,} tokens")
    print(f"cost model: {hw.name}, {hw.peak_flops / 1e12:.0f} TFLOP/s x MFU {hw.mfu:.2f}, "
          f"{(hw.inter_bw if a.nodes > 1 else hw.intra_bw) / 1e9:.0f} GB/s collectives, PCIe {hw.pcie_bw / 1e9:.0f} GB/s, "
          f"{MICRO_STEP_LATENCY_S * 1e3:.0f} ms latency per micro-step, no comm/compute overlap; "
          f"memory limit {USABLE_FRACTION:.0%} of GPU and host")
    print("model states per rank (before activations):")
    print("\n".join(model_state_table(stats, N, a.precision, a.peft)))
    if not fits:
        print("\nnothing fits. Smallest need per stage/offload (micro-batch 1):")
        for c in sorted(misses, key=lambda c: c.est.total)[:6]:
            print(f"  {_label(c):<52} GPU {fmt_bytes(c.est.total):>11}   host/node {fmt_bytes(c.est.host_per_node):>11}")
        print("more GPUs, a higher stage with offload, more host memory, --peft lora, or a shorter --seq would help")
        return 1
    print(f"\n{len(fits)} configurations fit; fastest first:")
    print(f"  {'#':>2} {'stage':>5} {'offload':<9} {'ckpt':<9} {'micro':>5} {'accum':>5} {'GPU/rank':>11} "
          f"{'host/node':>11} {'compute':>8} {'comm':>7} {'offload':>7} {'step s':>7} {'tok/s':>9}")
    for i, c in enumerate(fits[: a.top], 1):
        t = c.time
        print(f"  {i:>2} {c.stage:>5} {c.offload:<9} {c.grad_ckpt:<9} {c.micro_batch:>5} {c.grad_accum:>5} "
              f"{fmt_bytes(c.est.total):>11} {fmt_bytes(c.est.host_per_node):>11} {t['compute']:>8.2f} "
              f"{t['comm']:>7.2f} {t['offload']:>7.2f} {t['total']:>7.2f} {c.tokens_per_s:>9,.0f}")
    best = fits[0]
    print(f"\nrecommended: {_label(best)}, grad-accum {best.grad_accum} "
          f"({best.tokens:,} tokens/step): {fmt_bytes(best.est.total)} of {fmt_bytes(gpu_mem)} per GPU "
          f"(peak at {PHASES.get(best.est.peak_phase, best.est.peak_phase)})")
    print("by stage/offload (the best that fits, or the smallest need):")
    for stage in STAGES:
        for offload in valid_offloads(stage):
            ok = [c for c in fits if c.stage == stage and c.offload == offload]
            if ok:
                c = ok[0]
                print(f"  ZeRO-{stage} offload={offload:<9} fits: ckpt={c.grad_ckpt} micro-batch={c.micro_batch}, "
                      f"{fmt_bytes(c.est.total)}, {c.tokens_per_s:,.0f} tok/s")
                continue
            miss = [c for c in misses if c.stage == stage and c.offload == offload]
            if miss:
                c = min(miss, key=lambda c: c.est.total)
                short = "host" if c.est.host_per_node > USABLE_FRACTION * host_mem else "GPU"
                print(f"  ZeRO-{stage} offload={offload:<9} does not fit: needs {fmt_bytes(c.est.total)} GPU, "
                      f"{fmt_bytes(c.est.host_per_node)} host/node at the least (micro-batch 1, ckpt={c.grad_ckpt}): {short} short")
    ds = deepspeed_config(best, a.precision, stats)
    Path(a.out).write_text(json.dumps(ds, indent=2) + "\n")
    print(f"wrote {a.out}")
    print("launch:\n  " + launch_command(a.model, best, a.gpus, a.nodes, seq, a.precision, config, a.out))
    if a.verify:
        print(f"\nverify: a window of {real_steps.GRAD_ACCUM} micro-batches of the top {min(a.verify, len(fits))} "
              f"on {a.gpus} local rank(s):")
        rows = verify_top(fits[: a.verify], model=a.model, config=config, stats=stats, gpus=a.gpus, nodes=a.nodes,
                          seq=seq, precision=a.precision, peft=a.peft, hw=hw)
        print(format_verify(rows, hw))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(plan_main))
