"""Attention kernels against sequence length: forward+backward time and peak memory of one block per
implementation (eager, sdpa's math kernel, sdpa's fused kernels), written as attention.csv, attention.png
(log-log) and report.md.  `bash bench/attention.sh` runs the CPU preset.

Peak memory is `zerokit.lab.measure.LiveBytes`: every tensor storage an op returns, live until freed, the
weights excluded. It sees the score matrix wherever one exists as a tensor (eager's matmul/softmax outputs,
the math kernel's decomposed ops, each an op output) and only the outputs of a fused kernel (output and
log-sum-exp: O(seq)), whose per-thread tiles never leave the kernel and do not grow with the length.
RSS would add the allocator's caching and other processes' noise; CPU torch keeps no allocator statistics.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch

from zerokit.errors import UsageError
from zerokit.lab.bench_report import machine, versions, write_csv
from zerokit.lab.flags import MiB, parser, run_cli
from zerokit.lab.measure import LiveBytes

# name -> (model.attn, model.sdpa_backend). sdpa-flash is the CPU's memory-efficient kernel (a tiled
# flash-attention); sdpa-efficient and sdpa-cudnn exist on CUDA only.
IMPLS = {"eager": ("eager", "auto"), "sdpa-math": ("sdpa", "math"), "sdpa-flash": ("sdpa", "flash"),
         "sdpa-efficient": ("sdpa", "efficient"), "sdpa-cudnn": ("sdpa", "cudnn"), "flash": ("flash", "auto")}
CPU_IMPLS = ("eager", "sdpa-math", "sdpa-flash")


def build(preset: str, layers: int, max_len: int, impl: str, device: torch.device):
    """A `layers`-block model of `preset`'s shape with `impl`'s attention, as training builds it."""
    from transformers import AutoModelForCausalLM

    from zerokit.attention import attn_implementation, pin_sdpa_backend
    from zerokit.models import model_config

    attn, backend = IMPLS[impl]
    cfg = model_config(preset, block_size=max_len, dropout=0.0)
    cfg.num_hidden_layers, cfg.use_cache = layers, False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation(attn, backend))
    return pin_sdpa_backend(model, backend).to(device).train()


def fwd_bwd(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def measure(model, seq: int, batch: int, repeats: int) -> dict:
    """The best forward+backward seconds of `repeats` (after one warm-up: on a shared machine the least disturbed
    pass is the closest to the kernel's own cost), and the peak live bytes of one more pass."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq)).to(device)
    fwd_bwd(model, ids)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd(model, ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    gc.collect()
    counter = LiveBytes()
    with counter:
        fwd_bwd(model, ids)
    return {"seconds": min(times), "peak_mib": counter.peak / MiB, "tokens": batch * seq}


def score_matrix_mib(model, seq: int, batch: int) -> float:
    """One fp32 score matrix of one block: batch x heads x seq x seq x 4 bytes (what eager materialises)."""
    return batch * model.config.num_attention_heads * seq * seq * 4 / MiB


def run(impls, lengths, *, preset: str = "llama-tiny", layers: int = 1, batch: int = 1, repeats: int = 3,
        device: str | None = None) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for impl in impls:
        if impl not in IMPLS:
            raise UsageError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
        model = build(preset, layers, max(lengths), impl, dev)
        for seq in lengths:
            m = measure(model, seq, batch, repeats)
            rows.append({"impl": impl, "seq": seq, "batch": batch, "layers": layers, **m,
                         "tokens_per_s": m["tokens"] / m["seconds"],
                         "score_matrix_mib": score_matrix_mib(model, seq, batch)})
            print(f"{impl:<14} seq {seq:>5}: {m['seconds'] * 1e3:9.1f} ms  peak {m['peak_mib']:9.1f} MiB", flush=True)
        del model
        gc.collect()
    for r in rows:  # growth over the previous (half) length: ~4 quadratic, ~2 linear
        prev = next((p for p in rows if p["impl"] == r["impl"] and p["seq"] * 2 == r["seq"]), None)
        r["mem_growth_per_doubling"] = r["peak_mib"] / prev["peak_mib"] if prev else None
        r["time_growth_per_doubling"] = r["seconds"] / prev["seconds"] if prev else None
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "peak_mib", "peak live memory, fwd+bwd (MiB)"),
                           (axes[1], "seconds", "forward+backward time (s)")):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["seq"], r[key]) for r in rows if r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=impl)
        seqs = sorted({r["seq"] for r in rows})
        top = max(r[key] for r in rows if r["seq"] == seqs[-1])
        for power, style in ((1, ":"), (2, "--")):  # reference slopes through the largest value
            ax.plot(seqs, [top * (s / seqs[-1]) ** power for s in seqs], style, color="gray", label=f"∝ seq^{power}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(rows: list[dict], path: Path, argv: list[str], load: tuple) -> None:
    head = "| impl | seq | fwd+bwd ms | tokens/s | peak MiB | x per doubling | one score matrix MiB |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        g = r["mem_growth_per_doubling"]
        lines.append(f"| {r['impl']} | {r['seq']} | {r['seconds'] * 1e3:,.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_mib']:,.1f} | {'' if g is None else f'{g:.2f}'} | {r['score_matrix_mib']:,.1f} |")
    longest = max(r["seq"] for r in rows)
    growth = {r["impl"]: r["mem_growth_per_doubling"] for r in rows if r["seq"] == longest}
    m, v = machine(), versions()
    text = ["# Attention: forward+backward time and peak memory vs sequence length", "",
            f"`python -m zerokit.lab.attention_bench {' '.join(argv)}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
            f"{m['cpu']}, {m['cores']} cores, GPU {m['gpu']}; torch {v['torch']}, transformers {v['transformers']}; "
            f"load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min).", "",
            "Peak memory: live tensor storages during one forward+backward (`zerokit.lab.measure.LiveBytes`), weights "
            "excluded; it sees every materialised score matrix (op outputs) and a fused kernel's outputs only. Times: "
            "best of the repeats, wall clock, noisy on a shared machine; memory figures are exact and repeatable.", "",
            *lines, "", "![memory and time vs length](attention.png)", "",
            f"Memory growth from {longest // 2} to {longest} tokens: "
            + ", ".join(f"{k} x{g:.2f}" for k, g in growth.items() if g) + " (x4: quadratic, x2: linear).", ""]
    path.write_text("\n".join(text))


def attention_bench_main(argv: list[str] | None = None) -> int:
    p = parser("python -m zerokit.lab.attention_bench", __doc__.split("\n\n")[0],
               "python -m zerokit.lab.attention_bench --out bench/results/attention --lengths 128,256,512,1024,2048,4096")
    p.add_argument("--out", default="bench/results/attention", help="folder for attention.csv, attention.png, report.md")
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)} (default: CPU {','.join(CPU_IMPLS)}; "
                                                 "CUDA adds sdpa-efficient)")
    p.add_argument("--lengths", default="128,256,512,1024,2048,4096", help="comma list of sequence lengths")
    p.add_argument("--preset", default="llama-tiny", help="the block's shape (rotary presets take any length)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per point (after one warm-up)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        lengths = sorted(int(x) for x in a.lengths.split(","))
    except ValueError:
        raise UsageError(f"--lengths {a.lengths!r}: give a comma list of integers, e.g. 128,256,512") from None
    cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    impls = a.impls.split(",") if a.impls else [*CPU_IMPLS, *(["sdpa-efficient"] if cuda else [])]
    load = os.getloadavg()
    rows = run(impls, lengths, preset=a.preset, layers=a.layers, batch=a.batch, repeats=a.repeats, device=a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "attention.csv")
    plot(rows, out / "attention.png")
    report(rows, out / "report.md", sys.argv[1:] if argv is None else argv, load)
    print(f"wrote {out / 'attention.csv'}, {out / 'attention.png'}, {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(attention_bench_main))
