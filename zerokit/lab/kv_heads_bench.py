"""MHA vs GQA vs MQA on one Llama shape: the same short pre-training for each model.kv_heads (validation
bits per byte, training tokens/s), then the exported model's KV cache per token (the estimator's formula and
a real DynamicCache) and its decode speed (`zerokit generate --benchmark`'s dynamic-cache rows).
Decode speed at a size where the cache matters: a randomly initialised larger preset per kv_heads.
Writes kv_heads.csv, kv_heads_scale.csv and report.md; `bash bench/kv_heads.sh` runs the CPU preset."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from zerokit.errors import UsageError
from zerokit.lab.bench_report import machine, versions, write_csv
from zerokit.lab.flags import parser, run_cli


def train_export(run_dir: Path, overrides: list[str]) -> tuple[dict, Path]:
    """One pre-training run in this process (a checkpoint at its last step), exported as a model folder."""
    from zerokit.export import export_main
    from zerokit.lab.bench import run_in_process

    result = run_in_process([f"run_dir={run_dir}", *overrides])
    export_main([str(run_dir), str(run_dir / "model")])
    return result["summary"], run_dir / "model"


def measure(kv_heads: int, out: Path, *, preset: str, steps: int, threads: int, batch_sizes: list[int],
            new_tokens: int, prompt_tokens: int, extra: list[str]) -> list[dict]:
    from zerokit.generate import load_for_generation
    from zerokit.generate_bench import benchmark_prompts, pad_id_of, run_benchmark
    from zerokit.lab.estimate import kv_cache_bytes_per_token
    from zerokit.models import count_params

    overrides = [f"model.preset={preset}", f"model.kv_heads={kv_heads}", f"train.max_steps={steps}",
                 f"train.checkpoint_every={steps}", "train.eval_every=0", "report_to=none", "resume=none",
                 f"train.cpu_threads={threads}", "sample.max_new_tokens=8", *extra]
    summary, model_dir = train_export(out / f"kv{kv_heads}", overrides)
    model, tok = load_for_generation(str(model_dir), device="cpu")
    torch.set_num_threads(threads)
    prompts = benchmark_prompts(tok, None, prompt_tokens)
    gen = run_benchmark(model, prompts, batch_sizes, new_tokens, pad_id_of(tok), ("dynamic",))
    per_token = kv_cache_bytes_per_token(model.config, "fp32")
    rows = []
    for g in gen:
        cached = g["batch"] * (prompt_tokens + new_tokens - 1)  # every token but the last generated one
        rows.append({"kv_heads": kv_heads, "heads": model.config.num_attention_heads, "params": count_params(model),
                     "steps": steps, "val_bpb": summary["val_bpb"], "val_loss": summary["val_loss"],
                     "train_tokens_per_s": summary["tokens_per_s"], "kv_bytes_per_token_fp32": per_token,
                     "kv_bytes_per_token_measured": g["kv_cache_bytes"] / cached, "batch": g["batch"],
                     "prefill_tok_s": g["prefill_tok_s"], "decode_tok_s": g["decode_tok_s"]})
    return rows


def decode_at_scale(kv_heads: int, preset: str, batch: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Decode speed and KV cache of a randomly initialised larger preset (speed needs no training): at this
    size a decode step reads the weights and the whole cache, so fewer K/V heads read less."""
    from zerokit.generate_bench import run_benchmark
    from zerokit.lab.estimate import kv_cache_bytes_per_token
    from zerokit.models import build_causal_lm, count_params

    model = build_causal_lm(preset, None, None, None, dropout=0.0, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, model.config.vocab_size, (batch, prompt_tokens), generator=g).tolist()
    row = run_benchmark(model, prompts, [batch], new_tokens, 0, ("dynamic",))[0]
    return {"preset": preset, "kv_heads": kv_heads, "heads": model.config.num_attention_heads,
            "params": count_params(model), "batch": batch, "context": prompt_tokens + new_tokens,
            "kv_bytes_per_token_fp32": kv_cache_bytes_per_token(model.config, "fp32"),
            "kv_cache_mib": row["kv_cache_bytes"] / 2**20, "prefill_tok_s": row["prefill_tok_s"],
            "decode_tok_s": row["decode_tok_s"]}


def scale_table(rows: list[dict]) -> list[str]:
    head = ["preset", "kv_heads", "params", "batch x context", "KV bytes/token", "KV cache MiB", "prefill tok/s",
            "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['kv_heads']} of {r['heads']} | {r['params']:,} | {r['batch']} x {r['context']} | "
                     f"{r['kv_bytes_per_token_fp32']:,} | {r['kv_cache_mib']:,.1f} | {r['prefill_tok_s']:,.0f} | "
                     f"{r['decode_tok_s']:,.1f} |")
    return lines


def report(rows: list[dict], path: Path, argv: list[str], load: tuple, scale: list[dict] | None = None) -> None:
    head = ["kv_heads", "params", "val bpb", "train tok/s", "KV bytes/token (formula)", "measured", "batch",
            "prefill tok/s", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        lines.append(f"| {r['kv_heads']} of {r['heads']} | {r['params']:,} | {r['val_bpb']:.4f} | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['kv_bytes_per_token_fp32']:,} | "
                     f"{r['kv_bytes_per_token_measured']:,.0f} | {r['batch']} | {r['prefill_tok_s']:,.0f} | "
                     f"{r['decode_tok_s']:,.0f} |")
    m, v = machine(), versions()
    path.write_text("\n".join([
        "# MHA / GQA / MQA: quality, training speed, KV cache, decode speed", "",
        f"`python -m zerokit.lab.kv_heads_bench {' '.join(argv)}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
        f"{m['cpu']}, {m['cores']} cores; torch {v['torch']}, transformers {v['transformers']}; load average at the "
        f"start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.", "",
        "Each kv_heads: the same pre-training (pretrain_gpt recipe, same data, seed and steps), validation bits per "
        "byte on the whole held-out split, training tokens/s (the run's tokens over its training seconds; noisy on a shared "
        "machine). "
        "KV bytes/token: 2 x layers x kv_heads x head_dim x 4 (fp32), and the measured DynamicCache after "
        "`generate` divided by the tokens it holds. Decode: greedy, eos ignored, dynamic cache.", "",
        *lines, "",
        *(["Decode at a larger size (random weights: speed needs no training; greedy, eos ignored, dynamic cache):", "",
           *scale_table(scale), ""] if scale else [])]))


def kv_heads_bench_main(argv: list[str] | None = None) -> int:
    p = parser("python -m zerokit.lab.kv_heads_bench", __doc__.split("\n")[0],
               "python -m zerokit.lab.kv_heads_bench --kv-heads 4,2,1 --steps 300 --out bench/results/kv_heads")
    p.add_argument("--kv-heads", default="4,2,1", help="comma list of model.kv_heads values (divisors of the head count)")
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training and generation")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--out", default="bench/results/kv_heads", help="kv_heads.csv and report.md")
    p.add_argument("--runs", default="runs/kv_heads_bench", help="the training runs and exported models go in a new "
                                                                 "<runs>/<date-time>/ folder")
    p.add_argument("--scale-preset", default="llama-120m", help="a larger preset for decode speed (random weights); "
                                                                "'none' skips it")
    p.add_argument("--scale-kv-heads", default="12,4,1", help="its kv_heads values")
    p.add_argument("--scale-batch", type=int, default=8)
    p.add_argument("--scale-prompt-tokens", type=int, default=256)
    p.add_argument("--scale-new-tokens", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="more recipe key=value overrides (e.g. data.cache_dir=...)")
    a = p.parse_args(argv)
    try:
        kvs, sizes = [int(k) for k in a.kv_heads.split(",")], [int(b) for b in a.batch_sizes.split(",")]
    except ValueError:
        raise UsageError("--kv-heads and --batch-sizes take comma lists of integers, e.g. 4,2,1") from None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    # a new folder per invocation: equal fresh budgets, and no earlier run or checkpoint is touched
    runs = Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for kv in kvs:
        rows += measure(kv, runs, preset=a.preset, steps=a.steps, threads=a.threads, batch_sizes=sizes,
                        new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens, extra=a.overrides)
    write_csv(rows, out / "kv_heads.csv")
    scale = []
    if a.scale_preset != "none":
        torch.set_num_threads(a.threads)
        scale = [decode_at_scale(int(kv), a.scale_preset, a.scale_batch, a.scale_prompt_tokens, a.scale_new_tokens)
                 for kv in a.scale_kv_heads.split(",")]
        write_csv(scale, out / "kv_heads_scale.csv")
    report(rows, out / "report.md", sys.argv[1:] if argv is None else argv, load, scale)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(kv_heads_bench_main))
